"""Greedy k-center coreset selection, the memory-bank subsampling of PatchCore.

Greedy k-center picks, one at a time, the point farthest from everything already picked; the
selected set then covers the full set with a radius at most twice the optimum. Distances are computed
on a random Gaussian projection of the features (Johnson-Lindenstrauss: pairwise distances are kept
up to a small factor), which makes each of the ``n`` passes over the data cheap; the selected indices
refer to the original, unprojected features.

The cost is still ``N x n`` distance updates, quadratic in the data when ``n`` is a fraction of
``N``. :func:`chunked_greedy_coreset` runs the greedy pass on contiguous chunks (groups of whole
images, since patches are stored image by image) with each chunk's share of ``n``: ``c`` chunks cost
``1 / c`` of one global pass, and every training image still contributes, unlike a random subsample
of the patches taken before a global pass.
"""

from __future__ import annotations

import logging

import torch

from threecad.progress import progress

log = logging.getLogger(__name__)


def random_projection(features: torch.Tensor, dim: int | None, seed: int = 0) -> torch.Tensor:
    """``features`` (N, D) times a seeded Gaussian (D, dim) / sqrt(dim); unchanged when dim is None or >= D."""
    if dim is None or dim <= 0 or dim >= features.shape[1]:
        return features
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=generator) / dim**0.5
    return features @ matrix.to(device=features.device, dtype=features.dtype)


def greedy_coreset(
    features: torch.Tensor,
    n: int,
    projection_dim: int | None = 128,
    seed: int = 0,
) -> torch.Tensor:
    """Indices (n,) of a greedy k-center coreset of ``features`` (N, D), in selection order.

    The first centre is drawn with ``seed``; ties in the farthest-point step go to the lowest index,
    so results are deterministic. Each step costs one (N, projection_dim) matrix-vector product.
    """
    total = features.shape[0]
    if n >= total:
        return torch.arange(total, device=features.device)
    if n <= 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    points = random_projection(features.float(), projection_dim, seed)
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(total, (1,), generator=generator))
    selected = torch.empty(n, dtype=torch.long, device=features.device)
    sq_norms = (points * points).sum(1)
    min_dist = torch.full((total,), float("inf"), device=points.device)
    current = first
    for i in progress(range(n), desc="coreset", total=n):
        selected[i] = current
        centre = points[current]
        # ||p - c||^2 = ||p||^2 - 2 p.c + ||c||^2: one matrix-vector product per step.
        dist = sq_norms - 2.0 * (points @ centre) + sq_norms[current]
        torch.minimum(min_dist, dist, out=min_dist)
        current = int(torch.argmax(min_dist))
    return selected


def chunked_greedy_coreset(
    features: torch.Tensor,
    n: int,
    chunk_size: int | None,
    projection_dim: int | None = 128,
    seed: int = 0,
) -> torch.Tensor:
    """Indices (n,) of greedy k-center coresets of contiguous chunks of ``features`` (N, D), concatenated.

    ``ceil(N / chunk_size)`` chunks of near-equal size each get ``n`` in proportion to their size
    (largest remainders first). One shared projection; chunk ``i`` starts from a centre drawn with
    ``seed + i``. ``chunk_size`` None, or at least N, is :func:`greedy_coreset` itself.
    """
    total = features.shape[0]
    if chunk_size is None or total <= chunk_size or n >= total:
        return greedy_coreset(features, n, projection_dim, seed)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    points = random_projection(features.float(), projection_dim, seed)
    parts = torch.tensor_split(torch.arange(total, device=features.device), -(-total // chunk_size))
    exact = torch.tensor([n * len(part) / total for part in parts], dtype=torch.float64)
    shares = exact.floor().long()
    shares[torch.argsort(exact - shares, descending=True, stable=True)[: n - int(shares.sum())]] += 1
    chosen = []
    for i, (part, share) in enumerate(zip(parts, shares.tolist())):
        if share:
            chosen.append(part[greedy_coreset(points[part], share, None, seed + i)])
    return torch.cat(chosen)
