"""Batches of images from a dataset of per-image dicts, split wherever the image size changes.

With ``resize="aspect"`` (or native sizes) consecutive images can differ in shape and cannot be
stacked; rather than padding (which would put artificial borders into the features), a batch is cut
into runs of equal shape. Squashed datasets give full batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from threecad.progress import progress


def _as_list(items: list) -> list:
    return items


def iter_batches(
    dataset: torch.utils.data.Dataset, batch_size: int = 16, desc: str | None = None, num_workers: int = 0
) -> Iterator[tuple[torch.Tensor, list[dict]]]:
    """Yield ``(images (B, 3, H, W), items)`` with equal-shaped images; ``items`` are the dataset dicts."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=max(1, batch_size), shuffle=False, num_workers=num_workers, collate_fn=_as_list
    )
    for items in progress(loader, desc=desc, total=len(loader)):
        run: list[dict] = []
        for item in items:
            if run and item["image"].shape != run[0]["image"].shape:
                yield torch.stack([r["image"] for r in run]), run
                run = []
            run.append(item)
        if run:
            yield torch.stack([r["image"] for r in run]), run


def train_subset(data: torch.utils.data.Dataset, count: int, seed: int) -> torch.utils.data.Dataset:
    """A seeded subset of ``count`` items of ``data`` in index order (reduced training budgets);
    ``count`` <= 0 or >= ``len(data)``: ``data`` itself."""
    if count <= 0 or count >= len(data):
        return data
    keep = np.random.default_rng(seed).choice(len(data), size=count, replace=False)
    return torch.utils.data.Subset(data, sorted(keep.tolist()))
