"""Streaming, exact per-category pixel accumulators (numpy on the CPU, torch on any device).

Memory never holds pixels as floats. What is kept depends on the widest map dtype seen:

* float16 maps: a dense histogram over the 65,536 possible values (normal count, anomalous count,
  summed PRO weight): O(1) memory, exact, one ``bincount`` per batch;
* float32 / float64 maps: every normal pixel as one 4- or 8-byte integer key, in large blocks each
  sorted in place once (ranks are sums of per-block binary searches, so nothing is ever concatenated),
  anomalous pixels reduced per batch to (distinct key, count, weight).
  For a 3CAD-ANI-sized category (323 M pixels) that is about 1.3 GB for float32, still exact.

A wider map arriving later converts what is stored (keys are order-preserving and every float16
value is exactly a float32 and a float64 value, so nothing is rounded).
"""

from __future__ import annotations

import numpy as np

from threecad.metrics.ranking import RankStats, float_keys, keys_to_float

_HIST = 1 << 16
_NP_FLOAT = {2: np.float16, 4: np.float32, 8: np.float64}


BLOCK = 1 << 24  # keys per block: 64 MB (float32) or 128 MB (float64)


class _SortedBlocks:
    """Normal-pixel keys in large preallocated blocks, each sorted in place once it is full.

    Ranks are sums of per-block ``searchsorted``: no concatenation, so the peak is the keys
    themselves (about 4 bytes per float32 pixel) plus one batch, never twice the keys.
    """

    def __init__(self, backend: str, device=None):
        self.backend, self.device = backend, device
        self.blocks: list = []  # [buffer, filled, sorted]

    def _empty(self, size: int, dtype):
        if self.backend == "numpy":
            return np.empty(size, dtype=dtype)
        import torch

        return torch.empty(size, dtype=dtype, device=self.device)

    def append(self, keys) -> None:
        position = 0
        total = keys.shape[0]
        while position < total:
            if not self.blocks or self.blocks[-1][1] == self.blocks[-1][0].shape[0]:
                self.blocks.append([self._empty(max(BLOCK, total - position), keys.dtype), 0, False])
            block = self.blocks[-1]
            take = min(total - position, block[0].shape[0] - block[1])
            block[0][block[1] : block[1] + take] = keys[position : position + take]
            block[1] += take
            block[2] = False
            position += take
            if block[1] == block[0].shape[0]:
                self._sort(block)

    def _sort(self, block) -> None:
        if block[2]:
            return
        if self.backend == "numpy":
            block[0][: block[1]].sort()
        else:
            import torch

            block[0][: block[1]] = torch.sort(block[0][: block[1]]).values
        block[2] = True

    def filled(self) -> list:
        """The filled part of every block (unsorted parts are sorted first)."""
        for block in self.blocks:
            self._sort(block)
        return [block[0][: block[1]] for block in self.blocks]

    def replace(self, arrays: list, already_sorted: bool) -> None:
        self.blocks = [[a, a.shape[0], already_sorted] for a in arrays if a.shape[0]]

    @property
    def count(self) -> int:
        return int(sum(block[1] for block in self.blocks))

    def ranks(self, queries, right: bool):
        """Number of stored keys < query (or <= query when ``right``), as int64 numpy."""
        out = np.zeros(queries.shape[0], dtype=np.int64)
        for block in self.filled():
            if self.backend == "numpy":
                out += np.searchsorted(block, queries, side="right" if right else "left")
            else:
                import torch

                out += torch.searchsorted(block, queries, right=right).cpu().numpy()
        return out


class PixelAccumulator:
    """Accumulates (score, is_anomalous, PRO weight) of the pixels of one category."""

    def __init__(self, backend: str = "numpy", device=None):
        if backend not in ("numpy", "torch"):
            raise ValueError(f"backend must be 'numpy' or 'torch', not {backend!r}")
        self.backend = backend
        self.device = device
        self.width = 0  # bytes per key; 0 before the first update
        self.hist = None  # float16 mode: counts, normal pixels then anomalous pixels (2 * 65,536)
        self.hist_weight = None
        self.normal = _SortedBlocks(backend, device)  # wider modes: normal-pixel keys
        self.anomalous: list = []  # wider modes: (keys, counts, weights) per batch
        self.n_components = 0

    # ------------------------------------------------------------------ update
    def add(self, values, masks, weights: np.ndarray | None, n_components: int) -> None:
        """One batch: ``values`` float scores and ``masks`` bool of the same shape (same backend).

        ``weights`` are the PRO weights of ``values[masks]`` in that order (None: not needed).
        """
        keys = float_keys(values) if self.backend == "numpy" else torch_keys(values)
        self.add_keys(keys, masks, weights, n_components)

    def add_keys(self, keys, masks, weights: np.ndarray | None, n_components: int) -> None:
        """:meth:`add` for scores already turned into keys (:func:`float_keys` / :func:`torch_keys`)."""
        size = keys.dtype.itemsize if self.backend == "numpy" else keys.element_size()
        if self.width and size < self.width:
            keys = self._rekey(self._to_numpy(keys), self.width)
            size = self.width
        elif self.width and size > self.width:
            self._widen(size)
        self.width = size
        self.n_components += int(n_components)
        if self.backend == "numpy":
            self._add_numpy(keys, masks, weights)
        else:
            self._add_torch(keys, masks, weights)

    def _add_numpy(self, keys: np.ndarray, masks: np.ndarray, weights: np.ndarray | None) -> None:
        keys = keys.ravel()
        flat = masks.ravel()
        if self.width == 2:
            if self.hist is None:
                self.hist = np.zeros(2 * _HIST, dtype=np.int64)
                self.hist_weight = np.zeros(_HIST, dtype=np.float64)
            index = (keys.view(np.uint16) ^ np.uint16(0x8000)).astype(np.int32)  # key + 32768
            anomalous_index = index[flat]
            index += flat.view(np.uint8).astype(np.int32) << 16
            self.hist += np.bincount(index, minlength=2 * _HIST)
            if weights is not None and weights.size:
                self.hist_weight += np.bincount(anomalous_index, weights=weights, minlength=_HIST)
            return
        self.normal.append(keys[~flat])
        anomalous = keys[flat]
        if anomalous.size:
            unique, inverse, counts = np.unique(anomalous, return_inverse=True, return_counts=True)
            summed = (
                np.bincount(inverse, weights=weights, minlength=unique.size)
                if weights is not None
                else np.zeros(unique.size)
            )
            self.anomalous.append((unique, counts.astype(np.int64), summed))

    def _add_torch(self, keys, masks, weights: np.ndarray | None) -> None:
        import torch

        keys = keys.reshape(-1)
        flat = masks.reshape(-1)
        w = None if weights is None else torch.as_tensor(weights, dtype=torch.float64, device=keys.device)
        if self.width == 2:
            if self.hist is None:
                self.hist = torch.zeros(2 * _HIST, dtype=torch.int64, device=keys.device)
                self.hist_weight = torch.zeros(_HIST, dtype=torch.float64, device=keys.device)
            index = keys.long() + (_HIST // 2) + flat.long() * _HIST
            self.hist += torch.bincount(index, minlength=2 * _HIST)
            if w is not None and w.numel():
                self.hist_weight += torch.bincount(keys[flat].long() + _HIST // 2, weights=w, minlength=_HIST)
            return
        self.normal.append(keys[~flat])
        anomalous = keys[flat]
        if anomalous.numel():
            unique, inverse, counts = torch.unique(
                anomalous, sorted=True, return_inverse=True, return_counts=True
            )
            summed = torch.zeros(unique.numel(), dtype=torch.float64, device=keys.device)
            if w is not None:
                summed.index_add_(0, inverse, w)
            self.anomalous.append((unique, counts.long(), summed))

    # ------------------------------------------------------------------ dtype changes
    def _widen(self, size: int) -> None:
        """Re-key what is stored for a wider float type (exact: the narrower values embed)."""
        if self.width == 2:
            hist = self._to_numpy(self.hist)
            weight = self._to_numpy(self.hist_weight)
            normal_counts, anomalous_counts = hist[:_HIST], hist[_HIST:]
            keys = np.arange(-(_HIST // 2), _HIST // 2, dtype=np.int16)
            normal = np.repeat(keys, normal_counts)
            present = np.flatnonzero(anomalous_counts)
            self.normal.replace([self._rekey(normal, size)], already_sorted=True)
            self.anomalous = []
            if present.size:
                counts, summed = anomalous_counts[present], weight[present]
                self.anomalous = [
                    (self._rekey(keys[present], size), self._backend(counts), self._backend(summed))
                ]
            self.hist = self.hist_weight = None
        else:
            # Re-keying preserves order, so sorted blocks stay sorted.
            self.normal.replace([self._rekey(self._to_numpy(b), size) for b in self.normal.filled()], True)
            self.anomalous = [(self._rekey(self._to_numpy(k), size), c, w) for k, c, w in self.anomalous]

    def _rekey(self, keys: np.ndarray, size: int):
        """Keys of one width to this backend's keys of a wider width, via the float values."""
        return self._backend(float_keys(keys_to_float(keys).astype(_NP_FLOAT[size])))

    def _to_numpy(self, array) -> np.ndarray:
        return array if self.backend == "numpy" else array.cpu().numpy()

    def _backend(self, array: np.ndarray):
        if self.backend == "numpy":
            return array
        import torch

        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    # ------------------------------------------------------------------ results
    def stats(self) -> RankStats:
        """Counts per distinct anomalous score (ascending); may be called again after more updates."""
        if self.width == 0:
            return RankStats(0, *(np.zeros(0, dtype=np.int64) for _ in range(3)), np.zeros(0), 0)
        if self.width == 2:
            hist = self._to_numpy(self.hist)
            weight = self._to_numpy(self.hist_weight)
            normal, anomalous = hist[:_HIST], hist[_HIST:]
            present = np.flatnonzero(anomalous)
            below_eq = np.cumsum(normal)[present]
            return RankStats(
                n_normal=int(normal.sum()),
                below=below_eq - normal[present],
                below_eq=below_eq,
                count=anomalous[present],
                weight=weight[present],
                n_components=self.n_components,
            )
        keys, counts, weights = self._merged_anomalous()
        if self.backend == "torch":
            counts, weights = counts.cpu().numpy(), weights.cpu().numpy()
        return RankStats(
            n_normal=self.normal.count,
            below=self.normal.ranks(keys, right=False),
            below_eq=self.normal.ranks(keys, right=True),
            count=counts.astype(np.int64),
            weight=weights.astype(np.float64),
            n_components=self.n_components,
        )

    def _merged_anomalous(self):
        """(distinct keys ascending, counts, summed weights) over all batches."""
        if self.backend == "torch":
            import torch

            if not self.anomalous:
                empty = torch.zeros(0, dtype=torch.int64, device=self.device)
                return empty.to(torch.int32 if self.width == 4 else torch.int64), empty, empty.double()
            keys = torch.cat([k for k, _, _ in self.anomalous])
            counts = torch.cat([c for _, c, _ in self.anomalous])
            weights = torch.cat([w for _, _, w in self.anomalous])
            unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
            merged_counts = torch.zeros(unique.numel(), dtype=torch.int64, device=keys.device).index_add_(
                0, inverse, counts
            )
            merged_weights = torch.zeros(unique.numel(), dtype=torch.float64, device=keys.device).index_add_(
                0, inverse, weights
            )
        else:
            dtype = np.int32 if self.width == 4 else np.int64
            if not self.anomalous:
                return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64), np.zeros(0)
            keys = np.concatenate([k for k, _, _ in self.anomalous])
            counts = np.concatenate([c for _, c, _ in self.anomalous])
            weights = np.concatenate([w for _, _, w in self.anomalous])
            unique, inverse = np.unique(keys, return_inverse=True)
            merged_counts = (
                np.bincount(inverse, weights=counts, minlength=unique.size).round().astype(np.int64)
            )
            merged_weights = np.bincount(inverse, weights=weights, minlength=unique.size)
        self.anomalous = [(unique, merged_counts, merged_weights)]
        return unique, merged_counts, merged_weights


def torch_keys(values):
    """:func:`threecad.metrics.ranking.float_keys` for torch tensors on any device (same keys)."""
    import torch

    ints = {torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}
    if values.dtype not in ints:
        values = values.to(torch.float32)
    bits = values.contiguous().view(ints[values.dtype])
    low = (1 << (8 * values.element_size() - 1)) - 1
    keys = torch.where(bits < 0, bits ^ low, bits)
    return torch.where(keys == -1, torch.zeros_like(keys), keys)  # -0.0 equals +0.0


def torch_keys_to_float(keys):
    """Inverse of :func:`torch_keys` (the bit flip is its own inverse)."""
    import torch

    floats = {torch.int16: torch.float16, torch.int32: torch.float32, torch.int64: torch.float64}
    low = (1 << (8 * keys.element_size() - 1)) - 1
    return torch.where(keys < 0, keys ^ low, keys).view(floats[keys.dtype])
