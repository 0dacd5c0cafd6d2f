"""A tiny normal-texture stand-in shared by the training tests (RD, CFRG)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SmoothImages(torch.utils.data.Dataset):
    """Smooth random colour fields plus a little noise: a stand-in for a normal texture."""

    def __init__(self, n: int = 8, size: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        base = torch.rand(3, size // 8, size // 8, generator=g)
        self.images = [
            (F.interpolate(base[None], size=(size, size), mode="bilinear")[0] * 0.6 + 0.2
             + 0.05 * torch.rand(3, size, size, generator=g)).clamp(0, 1)
            for _ in range(n)
        ]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "path": f"{index}.png", "category": "c"}
