"""Nearest-neighbour distances from query features to a memory bank, with bounded memory.

The full query-by-bank distance matrix of PatchCore (e.g. 1024 patches x 50,000 bank entries per
image, times the batch) does not fit in memory for large banks, so distances are computed block by
block (queries x bank chunk) and only the running k smallest per query are kept.
"""

from __future__ import annotations

import torch

#: Default budget of one distance block, in bytes (float32 entries).
DEFAULT_BLOCK_BYTES = 64 * 2**20


def _squared_distances(queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor) -> torch.Tensor:
    """||q - b||^2 via the expansion ||q||^2 + ||b||^2 - 2 q.b, clamped at 0 (rounding can go below)."""
    q_sq = (queries * queries).sum(1, keepdim=True)
    out = torch.addmm(bank_sq[None, :], queries, bank.T, alpha=-2.0)  # one fused pass: ||b||^2 - 2 q.b
    return out.add_(q_sq).clamp_min_(0.0)


def nearest_in_bank(queries: torch.Tensor, bank: torch.Tensor, k: int, bank_chunk: int,
                    bank_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances (Q, k) and indices (Q, k) of the k nearest bank rows of every query, sorted ascending.

    The bank is scanned in chunks of ``bank_chunk`` rows, so memory is about ``Q x bank_chunk``
    floats; all queries go at once. The loop runs over the bank only, whose size is fixed once
    fitted, so this is also the graph :mod:`threecad.export` traces for PatchCore with a dynamic
    batch. ``bank_sq``: the bank's squared norms, when the caller has them.
    """
    if bank.shape[0] == 0:
        raise ValueError("empty memory bank")
    k = min(k, bank.shape[0])
    queries = queries.float()
    bank = bank.float()
    n_b = bank.shape[0]
    bank_chunk = max(k, min(n_b, int(bank_chunk)))
    if bank_sq is None:
        bank_sq = (bank * bank).sum(1)
    best_d = best_i = None
    for bs in range(0, n_b, bank_chunk):
        d = _squared_distances(queries, bank[bs : bs + bank_chunk], bank_sq[bs : bs + bank_chunk])
        kk = min(k, d.shape[1])
        if kk == 1:  # min is several times faster than topk for the common k = 1
            d_k, i_k = d.min(dim=1, keepdim=True)
        else:
            d_k, i_k = torch.topk(d, kk, dim=1, largest=False)
        i_k = i_k + bs
        if best_d is None:
            best_d, best_i = d_k, i_k
        else:
            cat_d, cat_i = torch.cat([best_d, d_k], 1), torch.cat([best_i, i_k], 1)
            best_d, order = torch.topk(cat_d, min(k, cat_d.shape[1]), dim=1, largest=False)
            best_i = torch.gather(cat_i, 1, order)
    # The expansion loses precision when distances are small next to the norms: recompute the
    # k winners directly, which makes the returned distances exact to float32 rounding.
    exact = (queries[:, None, :] - bank[best_i]).pow(2).sum(-1)
    exact, order = exact.sort(1)
    return exact.sqrt(), torch.gather(best_i, 1, order)


def nearest_neighbors(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances (Q, k) and bank indices (Q, k) of the k nearest bank rows of each query.

    Sorted ascending per query. Memory stays below about ``block_bytes`` plus the outputs, whatever
    the sizes of ``queries`` and ``bank``: queries go in chunks to :func:`nearest_in_bank`.
    """
    if bank.shape[0] == 0:
        raise ValueError("empty memory bank")
    k = min(k, bank.shape[0])
    queries = queries.float()
    bank = bank.float()
    n_q, n_b = queries.shape[0], bank.shape[0]
    entries = max(1, block_bytes // 4)
    bank_chunk = max(k, min(n_b, entries // max(1, min(n_q, 4096))))
    query_chunk = max(1, min(n_q, entries // bank_chunk, entries // (k * queries.shape[1])))
    bank_sq = (bank * bank).sum(1)
    out_d = torch.empty(n_q, k, device=queries.device)
    out_i = torch.empty(n_q, k, dtype=torch.long, device=queries.device)
    for qs in range(0, n_q, query_chunk):
        d, i = nearest_in_bank(queries[qs : qs + query_chunk], bank, k, bank_chunk, bank_sq)
        out_d[qs : qs + query_chunk] = d
        out_i[qs : qs + query_chunk] = i
    return out_d, out_i
