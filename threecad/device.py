"""Device selection shared by every method and the leaderboard."""

from __future__ import annotations

import torch

from threecad.errors import ThreecadError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when available; asking for CUDA without one is a user error, not a crash."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ThreecadError(f"--device {device} requested but no CUDA GPU is available; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ThreecadError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from None
