"""Streaming, exact per-category pixel accumulators (numpy on the CPU, torch on any device).

Memory never holds pixels as floats. What is kept depends on the widest map dtype seen:

* float16 maps: a dense histogram over the 65,536 possible values (normal count, anomalous count,
  summed PRO weight): O(1) memory, exact, one ``bincount`` per batch;
* float32 / float64 maps: every normal pixel as one 4- or 8-byte integer key, in large blocks each
  sorted in place once (ranks are sums of per-block binary searches, so nothing is ever concatenated),
  anomalous pixels reduced per batch to (distinct key, count, weight).

With a ``memory_budget`` (bytes), float32 / float64 keys beyond it are *spilled*: appended, unsorted,
to files in a private temporary folder, with a count per bucket (the top 12 bits of the
order-preserving key, so buckets are ordered) kept in memory. :meth:`PixelAccumulator.slices`
then partitions the keys of the buckets that hold an anomalous key into bucket files and visits
them from the highest down: each bucket's anomalous records are merged in memory and its normal
keys streamed past them in chunks (normal-pixel ranks are counts, so a bucket of a billion equal
normal keys costs one pass); a bucket with more anomalous records than fit is split by the next 8
key bits, recursively, down to single keys (which are just counted); when every anomalous record
fits in memory at once, one pass over the normal keys replaces the bucket files. The ranks are the same
integers the in-memory path computes, so every metric is exactly what it would be without a budget.

A wider map arriving later converts what is stored (keys are order-preserving and every float16
value is exactly a float32 and a float64 value, so nothing is rounded).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from threecad.errors import ThreecadError
from threecad.metrics.ranking import RankStats, float_keys, keys_to_float

_HIST = 1 << 16
_NP_FLOAT = {2: np.float16, 4: np.float32, 8: np.float64}
_NP_INT = {2: np.int16, 4: np.int32, 8: np.int64}


BLOCK = 1 << 24  # keys per block: 64 MB (float32) or 128 MB (float64)
TOP_BITS = 12  # spilled keys are bucketed by their top 12 bits: 4,096 ordered buckets
SPLIT_BITS = 8  # a bucket with too many anomalous records is split into 256 by the next bits
# Bytes charged per buffered anomalous record (key, count, weight): the record itself plus what
# merging (concatenate, unique, bincount) and the rank arrays need for it at compute time.
RECORD_BYTES = 64


def parse_memory_budget(value: int | float | str | None) -> int | None:
    """A memory budget in bytes from ``4e9``, ``"4GB"``, ``"512MiB"``, ``"2G"`` (None or ``"none"``: unlimited).

    Units: B, kB / KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of 1024); K, M,
    G, T alone are taken as powers of 1000.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not match:
            raise ThreecadError(f"memory budget {value!r} is not a size such as 4GB, 512MiB or 2e9")
        number, unit = float(match.group(1)), match.group(2).lower()
    scale = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}.get(unit)
    if scale is None:
        raise ThreecadError(f"memory budget {value!r}: unknown unit {unit!r} (use B, kB, MB, GB, TB, KiB, MiB, GiB)")
    budget = int(number * scale)
    if budget <= 0:
        raise ThreecadError(f"memory budget {value!r} must be positive")
    return budget


class _SortedBlocks:
    """Normal-pixel keys in large preallocated blocks, each sorted in place when ranks are first needed
    (never if the keys spill to disk first: spilled keys are not sorted).

    Ranks are sums of per-block ``searchsorted``: no concatenation, so the peak is the keys
    themselves (about 4 bytes per float32 pixel) plus one batch, never twice the keys.
    ``max_block`` caps the block size (keys) under a memory budget.
    """

    def __init__(self, backend: str, device=None, max_block: int | None = None):
        self.backend, self.device = backend, device
        self.max_block = max_block
        self.blocks: list = []  # [buffer, filled, sorted]

    def _empty(self, size: int, dtype):
        if self.backend == "numpy":
            return np.empty(size, dtype=dtype)
        import torch

        return torch.empty(size, dtype=dtype, device=self.device)

    def append(self, keys) -> None:
        position = 0
        total = keys.shape[0]
        block_size = BLOCK if self.max_block is None else max(1, min(BLOCK, self.max_block))
        while position < total:
            if not self.blocks or self.blocks[-1][1] == self.blocks[-1][0].shape[0]:
                self.blocks.append([self._empty(max(block_size, total - position), keys.dtype), 0, False])
            block = self.blocks[-1]
            take = min(total - position, block[0].shape[0] - block[1])
            block[0][block[1] : block[1] + take] = keys[position : position + take]
            block[1] += take
            block[2] = False
            position += take

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

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys (block capacity, filled or not)."""
        return int(sum(block[0].shape[0] * block[0].element_size() if self.backend == "torch" else block[0].nbytes
                       for block in self.blocks))

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


def _merge_records(keys: np.ndarray, counts: np.ndarray, weights: np.ndarray):
    """(distinct keys ascending, summed counts, summed weights) of records that may repeat a key."""
    unique, inverse = np.unique(keys, return_inverse=True)
    merged_counts = np.bincount(inverse, weights=counts, minlength=unique.size).round().astype(np.int64)
    merged_weights = np.bincount(inverse, weights=weights, minlength=unique.size)
    return unique, merged_counts, merged_weights


def _descending_slices(stats_of, size: int, step: int) -> Iterator[RankStats]:
    """``stats_of(start, stop)`` for consecutive index ranges of ``size`` entries, highest first."""
    for stop in range(size, 0, -step):
        yield stats_of(max(0, stop - step), stop)


class _Appender:
    """Files opened for appending and kept open (the ``limit`` most recently used), written buffered."""

    def __init__(self, limit: int = 256):
        self.limit = limit
        self.handles: dict[str, object] = {}

    def write(self, path: str, array: np.ndarray) -> None:
        handle = self.handles.pop(path, None)
        if handle is None:
            if len(self.handles) >= self.limit:
                self.handles.pop(next(iter(self.handles))).close()
            handle = open(path, "ab")  # noqa: SIM115 - closed by close() or on eviction
        self.handles[path] = handle  # most recently used last
        handle.write(np.ascontiguousarray(array).data)

    def __enter__(self) -> _Appender:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


class _SpillStore:
    """Spilled keys of one accumulator, in a private temporary folder.

    While evaluating, writing costs next to nothing per pixel: normal keys are appended, in any
    order, to ``normal.bin`` and anomalous records (key, count, PRO weight) to ``records.bin``; only
    a count per bucket (the top ``TOP_BITS`` bits of the key's unsigned image, so buckets are
    ordered) is kept in memory. :meth:`slices` then partitions the keys of the *mixed* buckets (those
    holding an anomalous key; the others only need their count) into bucket files, chunk by sorted
    chunk, and visits the mixed buckets from the highest down: a bucket's distinct anomalous keys are
    merged in memory and its normal keys streamed past them (ranks are counts, so a bucket of a
    billion equal normal keys costs one pass). A bucket with too many anomalous records for the
    working memory is split by the next ``SPLIT_BITS`` bits, recursively, down to single keys, which
    are just counted.

    Files are scratch data, never a result a user sees, so they are appended to directly rather
    than through :mod:`threecad.io`'s atomic writes; the folder is removed by :meth:`close`, at
    garbage collection or at interpreter exit (``TemporaryDirectory``), also after an error.
    ``spill_dir`` names the folder to create it in (default: the system temporary folder).
    """

    def __init__(self, width: int, spill_dir: str | Path | None = None):
        if spill_dir is not None and not Path(spill_dir).is_dir():
            raise ThreecadError("spill folder not found (create it first)", Path(spill_dir))
        self._tmp = tempfile.TemporaryDirectory(prefix="threecad-metrics-", dir=spill_dir)
        self.root = Path(self._tmp.name)
        self.spill_dir = spill_dir
        self.width = width
        self.dtype = np.dtype(_NP_INT[width])
        self.unsigned = np.dtype(f"u{width}")
        self.record = np.dtype([("key", self.dtype), ("count", np.int64), ("weight", np.float64)])
        self.top = TOP_BITS
        self.shift = 8 * width - self.top
        self.lowest = int(np.iinfo(self.dtype).min)
        self.normal_counts = np.zeros(1 << self.top, dtype=np.int64)
        self.record_counts = np.zeros(1 << self.top, dtype=np.int64)
        self.normal_path = self.root / "normal.bin"
        self.record_path = self.root / "records.bin"
        self._splits = 0

    def _unsigned(self, keys: np.ndarray) -> np.ndarray:
        """The keys' order-preserving unsigned image (sign bit flipped)."""
        return keys.view(self.unsigned) ^ self.unsigned.type(1 << (8 * self.width - 1))

    def _bucket_of(self, keys: np.ndarray) -> np.ndarray:
        return (self._unsigned(keys) >> self.unsigned.type(self.shift)).astype(np.intp)

    def add_normal(self, keys: np.ndarray) -> None:
        """Normal keys, any order."""
        keys = np.ascontiguousarray(keys, dtype=self.dtype)
        with open(self.normal_path, "ab") as handle:
            keys.tofile(handle)
        for start in range(0, keys.shape[0], 1 << 20):  # bucket numbers are 8 bytes a key: a chunk at a time
            self.normal_counts += np.bincount(self._bucket_of(keys[start : start + (1 << 20)]), minlength=1 << self.top)

    def add_records(self, keys: np.ndarray, counts: np.ndarray, weights: np.ndarray) -> None:
        """Anomalous keys with their counts and summed PRO weights, any order."""
        records = np.empty(keys.shape[0], dtype=self.record)
        records["key"], records["count"], records["weight"] = keys, counts, weights
        with open(self.record_path, "ab") as handle:
            records.tofile(handle)
        self.record_counts += np.bincount(self._bucket_of(records["key"]), minlength=1 << self.top)

    @property
    def n_normal(self) -> int:
        return int(self.normal_counts.sum())

    @staticmethod
    def _chunks(path: str | Path, dtype: np.dtype, length: int) -> Iterator[np.ndarray]:
        if not os.path.exists(path):
            return
        with open(path, "rb") as handle:
            while True:
                chunk = np.fromfile(handle, dtype=dtype, count=length)
                if not chunk.size:
                    return
                yield chunk

    def rekeyed(self, width: int, rekey, work_bytes: int) -> _SpillStore:
        """A new store holding every key re-keyed for a wider float (order-preserving); closes this one."""
        wider = _SpillStore(width, self.spill_dir)
        length = max(1, work_bytes // (4 * self.record.itemsize))
        try:
            for chunk in self._chunks(self.normal_path, self.dtype, length):
                wider.add_normal(rekey(chunk))
            for chunk in self._chunks(self.record_path, self.record, length):
                wider.add_records(rekey(chunk["key"]), chunk["count"], chunk["weight"])
        except BaseException:
            wider.close()
            raise
        self.close()
        return wider

    # ------------------------------------------------------------------ reading back
    def slices(self, work_bytes: int, n_components: int) -> Iterator[RankStats]:
        """RankStats slices of every distinct anomalous key, highest first, in about ``work_bytes``."""
        yield from self._bucket_slices(work_bytes, n_components)

    def _edges(self, low: int, shift: int, count: int) -> np.ndarray:
        """First key of each of ``count`` consecutive buckets of ``2**shift`` keys from ``low``."""
        return np.array([low + (b << shift) for b in range(count)], dtype=self.dtype)

    def _path(self, kind: str, bucket: int, folder: Path) -> str:
        return os.path.join(folder, f"{kind}{bucket:04d}.bin")

    @staticmethod
    def _write_split(array: np.ndarray, keys: np.ndarray, edges: np.ndarray, path_of, counts: np.ndarray,
                     files: _Appender) -> None:
        """Append the runs of ``array`` (sorted by ``keys``) to their buckets' files."""
        starts = np.searchsorted(keys, edges, side="left")
        ends = np.append(starts[1:], keys.shape[0])
        for bucket in np.flatnonzero(ends > starts):
            files.write(path_of(int(bucket)), array[starts[bucket] : ends[bucket]])
            counts[bucket] += ends[bucket] - starts[bucket]

    def _split(self, normal_path: str | Path, record_path: str | Path, edges: np.ndarray, folder: Path, work: int,
               wanted: np.ndarray | None = None):
        """Partition a normal-key file and a record file by ``edges`` into ``folder``; the counts per part.

        ``wanted`` (bool per top-level bucket): normal keys of other buckets are not written (only
        their count matters, and it is known).
        """
        normal_counts = np.zeros(edges.size, dtype=np.int64)
        record_counts = np.zeros(edges.size, dtype=np.int64)
        length = max(1, work // 32)  # a normal key, its bucket, the mask and the kept copy: < 32 bytes
        with _Appender() as files:
            for chunk in self._chunks(normal_path, self.dtype, length):
                if wanted is not None:
                    chunk = chunk[wanted[self._bucket_of(chunk)]]
                chunk.sort()
                self._write_split(chunk, chunk, edges, lambda b: self._path("n", b, folder), normal_counts, files)
            for chunk in self._chunks(record_path, self.record, max(1, work // 64)):
                chunk = chunk[np.argsort(chunk["key"], kind="stable")]
                self._write_split(chunk, chunk["key"], edges, lambda b: self._path("a", b, folder), record_counts,
                                  files)
        return normal_counts, record_counts

    def _global_slices(self, work: int, n_components: int) -> Iterator[RankStats]:
        """All anomalous records fit in memory: one pass, no bucket files.

        The normal keys of the mixed buckets stream past all distinct anomalous keys at once
        (chunks sorted first: ``searchsorted`` is several times faster on sorted queries); the
        normal keys of the other buckets are only counted, and lie wholly below or above each
        anomalous key.
        """
        records = np.fromfile(self.record_path, dtype=self.record)
        keys, counts, weights = _merge_records(records["key"], records["count"], records["weight"])
        del records
        m = keys.shape[0]
        mixed = self.record_counts > 0
        left_hist = np.zeros(m + 1, dtype=np.int64)
        right_hist = np.zeros(m + 1, dtype=np.int64)
        for chunk in self._chunks(self.normal_path, self.dtype, max(1, work // 32)):
            chunk = chunk[mixed[self._bucket_of(chunk)]]
            chunk.sort()
            left = np.searchsorted(keys, chunk, side="left")
            left_hist += np.bincount(left, minlength=m + 1)
            left += keys[np.minimum(left, m - 1)] == chunk
            right_hist += np.bincount(left, minlength=m + 1)
            del left, chunk
        # normal keys of unmixed buckets below each anomalous key's (mixed) bucket
        unmixed = np.concatenate(([0], np.cumsum(np.where(mixed, 0, self.normal_counts))))[self._bucket_of(keys)]
        below = unmixed + np.cumsum(right_hist)[:m]
        below_eq = unmixed + np.cumsum(left_hist)[:m]
        n_normal = self.n_normal
        yield from _descending_slices(
            lambda a, b: RankStats(n_normal, below[a:b], below_eq[a:b], counts[a:b], weights[a:b], n_components),
            m, max(1, work // 256),
        )

    def _bucket_slices(self, work: int, n_components: int) -> Iterator[RankStats]:
        if int(self.record_counts.sum()) * RECORD_BYTES <= work:
            yield from self._global_slices(work, n_components)
            return
        edges = self._edges(self.lowest, self.shift, 1 << self.top)
        folder = self.root / "buckets"
        folder.mkdir(exist_ok=True)
        try:
            mixed = self.record_counts > 0
            normal_counts, record_counts = self._split(self.normal_path, self.record_path, edges, folder, work, mixed)
            normal_counts = self.normal_counts  # counted as they were written, every bucket included
            below = np.concatenate(([0], np.cumsum(normal_counts)))
            n_normal = self.n_normal
            for bucket in np.flatnonzero(record_counts)[::-1]:
                bucket = int(bucket)
                yield from self._bucket(
                    self._path("n", bucket, folder), int(normal_counts[bucket]), self._path("a", bucket, folder),
                    int(record_counts[bucket]), int(edges[bucket]), self.shift, int(below[bucket]),
                    n_normal, n_components, work,
                )
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _bucket(self, normal_path: str | Path, n_bucket: int, record_path: str | Path, n_records: int, low: int, shift: int,
                offset: int, n_normal: int, n_components: int, work: int) -> Iterator[RankStats]:
        """Slices of one bucket whose normal keys below it number ``offset``."""
        if shift == 0 or n_records * RECORD_BYTES <= work:
            yield from self._bucket_in_memory(normal_path, n_bucket, record_path, offset, n_normal, n_components,
                                              work, single=shift == 0)
            return
        # Too many anomalous records: split by the next bits into a subfolder, highest part first.
        bits = min(SPLIT_BITS, shift)
        sub_shift = shift - bits
        edges = self._edges(low, sub_shift, 1 << bits)
        self._splits += 1
        folder = self.root / f"split{self._splits}"
        folder.mkdir()
        try:
            normal_counts, record_counts = self._split(normal_path, record_path, edges, folder, work)
            below = offset + np.concatenate(([0], np.cumsum(normal_counts)))
            for sub in np.flatnonzero(record_counts)[::-1]:
                sub = int(sub)
                yield from self._bucket(
                    self._path("n", sub, folder), int(normal_counts[sub]), self._path("a", sub, folder),
                    int(record_counts[sub]), int(edges[sub]), sub_shift, int(below[sub]),
                    n_normal, n_components, work,
                )
                for kind in "na":  # done with this part: free its disk space now
                    if os.path.exists(self._path(kind, sub, folder)):
                        os.remove(self._path(kind, sub, folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _bucket_in_memory(self, normal_path: str | Path, n_bucket: int, record_path: str | Path, offset: int, n_normal: int,
                          n_components: int, work: int, single: bool) -> Iterator[RankStats]:
        length = max(1, work // (4 * self.record.itemsize))
        if single:
            # One key value: its records are summed as they stream past, its normal keys only counted.
            count, weight = 0, 0.0
            for chunk in self._chunks(record_path, self.record, length):
                count += int(chunk["count"].sum())
                weight += float(chunk["weight"].sum())
            yield RankStats(n_normal, np.array([offset]), np.array([offset + n_bucket]), np.array([count]),
                            np.array([weight]), n_components)
            return
        records = np.fromfile(record_path, dtype=self.record)
        keys, counts, weights = _merge_records(records["key"], records["count"], records["weight"])
        del records
        m = keys.shape[0]
        # below(a_i) = #{n < a_i} = #{n : #(keys <= n) <= i}; below_eq(a_i) = #{n : #(keys < n) <= i}
        left_hist = np.zeros(m + 1, dtype=np.int64)
        right_hist = np.zeros(m + 1, dtype=np.int64)
        for chunk in self._chunks(normal_path, self.dtype, max(1, work // 64)):
            left = np.searchsorted(keys, chunk, side="left")
            left_hist += np.bincount(left, minlength=m + 1)
            left += keys[np.minimum(left, m - 1)] == chunk
            right_hist += np.bincount(left, minlength=m + 1)
            del left
        below = offset + np.cumsum(right_hist)[:m]
        below_eq = offset + np.cumsum(left_hist)[:m]
        step = max(1, work // 256)
        yield from _descending_slices(
            lambda a, b: RankStats(n_normal, below[a:b], below_eq[a:b], counts[a:b], weights[a:b], n_components),
            m, step,
        )

    def close(self) -> None:
        self._tmp.cleanup()


class PixelAccumulator:
    """Accumulates (score, is_anomalous, PRO weight) of the pixels of one category.

    ``memory_budget`` (bytes, None: unlimited) bounds what float32 / float64 keys may hold in
    memory: past it, :meth:`spill` moves them to bucket files (in a temporary folder, created in
    ``spill_dir`` when given), and :meth:`slices` reads them back bucket by bucket in
    :attr:`work_bytes` of working memory. Results are identical with or without a budget.
    """

    def __init__(self, backend: str = "numpy", device=None, memory_budget: int | None = None,
                 spill_dir: str | Path | None = None):
        if backend not in ("numpy", "torch"):
            raise ValueError(f"backend must be 'numpy' or 'torch', not {backend!r}")
        self.backend = backend
        self.device = device
        self.memory_budget = memory_budget
        self.spill_dir = spill_dir
        self.width = 0  # bytes per key; 0 before the first update
        self.hist = None  # float16 mode: counts, normal pixels then anomalous pixels (2 * 65,536)
        self.hist_weight = None
        self.normal = _SortedBlocks(backend, device)  # wider modes: normal-pixel keys
        self.anomalous: list = []  # wider modes: (keys, counts, weights) per batch
        self.n_components = 0
        self.n_normal = 0
        self.n_anomalous = 0
        self._store: _SpillStore | None = None  # spilled keys, once the budget was exceeded

    @property
    def work_bytes(self) -> int:
        """Working memory of :meth:`slices`: half the budget (the keys are on disk by then), at least
        64 kB; 512 MB without a budget."""
        return max(1 << 16, (self.memory_budget or 1 << 30) // 2)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory for the keys (what the budget bounds)."""
        if self.width == 2:
            return 3 * _HIST * 8  # two int64 counts and one float64 weight per float16 value
        return self.normal.nbytes + RECORD_BYTES * sum(int(k.shape[0]) for k, _, _ in self.anomalous)

    @property
    def spilled(self) -> bool:
        return self._store is not None

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
        if self.memory_budget is not None:
            self.normal.max_block = max(1, self.memory_budget // (4 * size))
        self.n_components += int(n_components)
        anomalous = int(masks.sum())
        self.n_anomalous += anomalous
        self.n_normal += int(np.prod(tuple(masks.shape))) - anomalous
        if self.backend == "numpy":
            self._add_numpy(keys, masks, weights)
        else:
            self._add_torch(keys, masks, weights)
        if self.memory_budget is not None and self.width > 2 and self.nbytes > self.memory_budget:
            self.spill()

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
        self._add_normal(keys[~flat])
        anomalous = keys[flat]
        if anomalous.size:
            unique, inverse, counts = np.unique(anomalous, return_inverse=True, return_counts=True)
            summed = (
                np.bincount(inverse, weights=weights, minlength=unique.size)
                if weights is not None
                else np.zeros(unique.size)
            )
            self.anomalous.append((unique, counts.astype(np.int64), summed))

    def _add_normal(self, keys) -> None:
        """Normal keys of one batch: to the blocks, or once spilling, a large batch straight to disk."""
        if self._store is not None and keys.shape[0] >= (self.normal.max_block or BLOCK):
            self._store.add_normal(self._to_numpy(keys))
            return
        self.normal.append(keys)

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
        self._add_normal(keys[~flat])
        anomalous = keys[flat]
        if anomalous.numel():
            unique, inverse, counts = torch.unique(
                anomalous, sorted=True, return_inverse=True, return_counts=True
            )
            summed = torch.zeros(unique.numel(), dtype=torch.float64, device=keys.device)
            if w is not None:
                summed.index_add_(0, inverse, w)
            self.anomalous.append((unique, counts.long(), summed))

    def spill(self) -> None:
        """Move the float32 / float64 keys held in memory to the bucket files (no-op for float16)."""
        if self.width <= 2 or (not self.normal.blocks and not self.anomalous):
            return
        if self._store is None:
            self._store = _SpillStore(self.width, self.spill_dir)
        for buffer, filled, _ in self.normal.blocks:  # unsorted: the store needs no order
            self._store.add_normal(self._to_numpy(buffer[:filled]))
        self.normal.replace([], True)
        if self.anomalous:
            keys, counts, weights = self._merged_anomalous()
            self.anomalous = []
            self._store.add_records(self._to_numpy(keys), self._to_numpy(counts), self._to_numpy(weights))

    def close(self) -> None:
        """Remove the spilled keys (their temporary folder); what is in memory stays."""
        if self._store is not None:
            self._store.close()
            self._store = None

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
            if self._store is not None:
                self._store = self._store.rekeyed(
                    size, lambda k: float_keys(keys_to_float(k).astype(_NP_FLOAT[size])), self.work_bytes
                )

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
    def slices(self) -> Iterator[RankStats]:
        """RankStats over consecutive distinct anomalous scores, highest scores first (see
        :class:`threecad.metrics.ranking.Sweep`); may be called again after more updates.

        In memory the slices hold at most ``work_bytes / 256`` scores each; spilled keys are read
        bucket by bucket (:class:`_SpillStore`), so memory stays within the budget however many
        distinct scores there are.
        """
        step = max(1, self.work_bytes // 256)
        if self.width == 0:
            return
        if self.width == 2:
            hist = self._to_numpy(self.hist)
            weight = self._to_numpy(self.hist_weight)
            normal, anomalous = hist[:_HIST], hist[_HIST:]
            present = np.flatnonzero(anomalous)
            below_eq = np.cumsum(normal)[present]
            below = below_eq - normal[present]
            count, weight = anomalous[present], weight[present]
            n_normal = int(normal.sum())
            yield from _descending_slices(
                lambda a, b: RankStats(n_normal, below[a:b], below_eq[a:b], count[a:b], weight[a:b],
                                       self.n_components),
                present.size, step,
            )
            return
        if self._store is not None:
            self.spill()
            yield from self._store.slices(self.work_bytes, self.n_components)
            return
        keys, counts, weights = self._merged_anomalous()
        if self.backend == "torch":
            counts, weights = counts.cpu().numpy(), weights.cpu().numpy()
        n_normal = self.normal.count

        def stats_of(start: int, stop: int) -> RankStats:
            part = keys[start:stop]
            return RankStats(
                n_normal=n_normal,
                below=self.normal.ranks(part, right=False),
                below_eq=self.normal.ranks(part, right=True),
                count=counts[start:stop].astype(np.int64),
                weight=weights[start:stop].astype(np.float64),
                n_components=self.n_components,
            )

        yield from _descending_slices(stats_of, int(keys.shape[0]), step)

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
            unique, merged_counts, merged_weights = _merge_records(
                np.concatenate([k for k, _, _ in self.anomalous]),
                np.concatenate([c for _, c, _ in self.anomalous]),
                np.concatenate([w for _, _, w in self.anomalous]),
            )
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
