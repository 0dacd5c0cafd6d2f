"""Time and peak memory of the evaluation engine against scikit-learn and a sort-based AU-PRO.

    python benchmarks/metrics.py                      # 1,000 maps of 256x256, all three contenders
    python benchmarks/metrics.py --maps 4936 --contenders ours   # a 3CAD-ANI-sized category
    # native size: float32 within a 1 GB key budget (spilling) vs float16 vs float32 all in memory
    python benchmarks/metrics.py --size 1024 --pixels 1e9 --memory-budget 1GB --contenders ours,f16,inmemory
    python benchmarks/metrics.py --size 1024 --pixels 4e9 --contenders ours,f16   # ANI at native size

The data (smooth maps with blob-shaped defects, ~80 % of images defective) is generated once into
memory-mapped .npy files. Every contender then runs in its own fresh Python process, so its peak
resident memory (VmHWM) is its own and is measured, not estimated:

* ``ours``: ``threecad.metrics.Evaluator`` fed in batches straight from the memory map (streaming,
  as a real evaluation reads one file at a time), all six metrics, with ``--memory-budget``
  (default: the library's) so float32 keys beyond it spill to disk;
* ``inmemory``: the same with ``memory_budget=None`` (every float32 key in memory);
* ``f16``: the same as ``ours`` on a float16 copy of the maps (the dense-histogram path);
* ``sklearn``: ``roc_auc_score`` + ``average_precision_score`` on all pixels, loaded into memory
  (what their API needs), P-AUROC and AP only;
* ``sortpro``: a straightforward exact AU-PRO by sorting all pixels (argsort, cumulative sums).

The headline ratios compare ours (six metrics) with scikit-learn's two calls, and ours (float32,
bounded) with ``f16`` (time) and ``inmemory`` (peak memory). Set ``OMP_NUM_THREADS=1`` to measure
one core's worth of work, as the figures in ``docs/metrics.md`` were.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH = 64
BATCH_PIXELS = 64 * 256 * 256  # default batch: 64 maps of 256x256, 4 maps of 1024x1024


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """Current resident memory of this process in MB."""
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """Peak resident memory of this process in MB.

    VmHWM, not ``ru_maxrss``: on Linux ``ru_maxrss`` survives ``exec`` and would charge a child
    with the peak of the (vforked) parent, which holds the generated data.
    """
    return _status_mb("VmHWM")


# --------------------------------------------------------------------------- data
def generate(folder: Path, maps: int, size: int, defective: float, dtype: str, seed: int) -> None:
    """Smooth background maps (upsampled low-resolution noise plus fine noise) with elliptic defects."""
    import torch

    rng = np.random.default_rng(seed)
    scores = np.lib.format.open_memmap(folder / "maps.npy", mode="w+", dtype=dtype, shape=(maps, size, size))
    masks = np.lib.format.open_memmap(folder / "masks.npy", mode="w+", dtype=bool, shape=(maps, size, size))
    for start in range(0, maps, BATCH):
        count = min(BATCH, maps - start)
        coarse = torch.from_numpy(rng.standard_normal((count, 1, 16, 16), dtype=np.float32))
        smooth = torch.nn.functional.interpolate(
            coarse, size=(size, size), mode="bicubic", align_corners=False
        )
        batch = 0.3 * smooth[:, 0].numpy() + 0.05 * rng.standard_normal((count, size, size), dtype=np.float32)
        batch_masks = np.zeros((count, size, size), dtype=bool)
        for i in range(count):
            if rng.random() >= defective:
                continue
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.uniform(0, size, 2)
                ry, rx = rng.uniform(2, size / 12, 2)
                # The bump spills past the mask edge; compute it in a window of 3 radii around the centre.
                y0, y1 = max(0, int(cy - 3 * ry)), min(size, int(cy + 3 * ry) + 1)
                x0, x1 = max(0, int(cx - 3 * rx)), min(size, int(cx + 3 * rx) + 1)
                yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
                distance = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
                batch_masks[i, y0:y1, x0:x1] |= distance <= 1
                batch[i, y0:y1, x0:x1] += rng.uniform(0.1, 0.8) * np.exp(-0.5 * distance)
        scores[start : start + count] = batch.astype(dtype)
        masks[start : start + count] = batch_masks
    scores.flush()
    masks.flush()


# --------------------------------------------------------------------------- contenders (child processes)
class BatchReader:
    """Reads batches of a .npy file with plain reads (a memory map would count in our RSS)."""

    def __init__(self, path: Path):
        self.handle = open(path, "rb")  # noqa: SIM115 - closed with the process
        version = np.lib.format.read_magic(self.handle)
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        self.shape, _, self.dtype = read_header(self.handle)
        self.offset = self.handle.tell()
        self.per_item = int(np.prod(self.shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, first: int, count: int) -> np.ndarray:
        count = min(count, self.shape[0] - first)
        self.handle.seek(self.offset + first * self.per_item * self.dtype.itemsize)
        return np.fromfile(self.handle, dtype=self.dtype, count=count * self.per_item).reshape(
            count, *self.shape[1:]
        )


def run_ours(
    folder: Path, device: str, protocol: str = "mvtec", memory_budget: str | None = "default",
    maps_file: str = "maps.npy", batch: int = BATCH, spill_dir: str | None = None,
) -> dict:
    from threecad.metrics import Evaluator

    maps = BatchReader(folder / maps_file)
    masks = BatchReader(folder / "masks.npy")
    baseline = rss_mb()
    start = time.perf_counter()
    budget = {} if memory_budget == "default" else {"memory_budget": memory_budget}
    evaluator = Evaluator(protocol=protocol, device=device, spill_dir=spill_dir, **budget)
    for first in range(0, len(maps), batch):
        evaluator.update(maps.read(first, batch), masks.read(first, batch))
    spilled = evaluator.spilled
    result = evaluator.compute()["mean"]
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "baseline_mb": baseline, "metrics": result, "spilled": spilled}


def to_float16(folder: Path) -> None:
    """A float16 copy of maps.npy (chunked, so the copy never holds all maps)."""
    maps = BatchReader(folder / "maps.npy")
    out = np.lib.format.open_memmap(folder / "maps16.npy", mode="w+", dtype=np.float16, shape=maps.shape)
    for first in range(0, len(maps), BATCH):
        out[first : first + BATCH] = maps.read(first, BATCH).astype(np.float16)
    out.flush()


def run_sklearn(folder: Path) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores = np.load(folder / "maps.npy").ravel()
    labels = np.load(folder / "masks.npy").ravel()
    baseline = rss_mb()
    start = time.perf_counter()
    p_auroc = roc_auc_score(labels, scores)
    p_ap = average_precision_score(labels, scores)
    return {
        "seconds": time.perf_counter() - start,
        "baseline_mb": baseline,
        "metrics": {"p_auroc": p_auroc, "p_ap": p_ap},
    }


def run_sortpro(folder: Path) -> dict:
    """AU-PRO the direct way: per-pixel region weights, one argsort of all pixels, cumulative sums."""
    from scipy import ndimage

    maps = np.load(folder / "maps.npy")
    masks = np.load(folder / "masks.npy")
    baseline = rss_mb()
    start = time.perf_counter()
    weights = np.zeros(masks.shape, dtype=np.float64)
    regions = 0
    for i in range(len(masks)):
        labels, count = ndimage.label(masks[i], structure=np.ones((3, 3)))
        if count:
            sizes = np.bincount(labels.ravel())
            weights[i][masks[i]] = 1.0 / sizes[labels[masks[i]]]
            regions += count
    scores = maps.ravel()
    normal = ~masks.ravel()
    order = np.argsort(-scores.astype(np.float64), kind="stable")
    fpr = np.cumsum(normal[order]) / normal.sum()
    pro = np.cumsum(weights.ravel()[order]) / regions
    sorted_scores = scores[order]
    last = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    fpr = np.concatenate([[0.0], fpr[last]])
    pro = np.concatenate([[0.0], pro[last]])
    end = np.searchsorted(fpr, 0.3, side="right")
    y_cut = np.interp(0.3, fpr[end - 1 : end + 1], pro[end - 1 : end + 1])
    x = np.append(fpr[:end], 0.3)
    y = np.append(pro[:end], y_cut)
    aupro = float(np.trapezoid(y, x) / 0.3)
    return {"seconds": time.perf_counter() - start, "baseline_mb": baseline, "metrics": {"aupro": aupro}}


def child(args: argparse.Namespace) -> None:
    folder = Path(args.data)
    budget = None if args.memory_budget in ("none", "None") else args.memory_budget
    if args.child in ("ours", "f16"):
        out = run_ours(folder, args.device, args.protocol, budget, "maps16.npy" if args.child == "f16" else "maps.npy",
                       args.batch, args.spill_dir)
    elif args.child == "inmemory":
        out = run_ours(folder, args.device, args.protocol, None, "maps.npy", args.batch)
    elif args.child == "sklearn":
        out = run_sklearn(folder)
    else:
        out = run_sortpro(folder)
    out["peak_mb"] = peak_mb()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # whole child, data reading included
    print(json.dumps(out))


# --------------------------------------------------------------------------- driver
def measure(name: str, folder: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", name, "--data", str(folder), "--device", args.device]
    command += ["--protocol", args.protocol, "--memory-budget", args.memory_budget, "--batch", str(args.batch)]
    if args.spill_dir:
        command += ["--spill-dir", args.spill_dir]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maps", type=int, default=1000, help="test maps in the category (3CAD ANI: 4936)")
    parser.add_argument("--size", type=int, default=256, help="map side in pixels")
    parser.add_argument("--pixels", type=float, default=None,
                        help="total pixels instead of --maps (maps = pixels / size^2; 3CAD ANI native: 4e9)")
    parser.add_argument("--memory-budget", default="default",
                        help="ours: Evaluator memory_budget (e.g. 1GB; 'default': the library's; 'none': unlimited)")
    parser.add_argument("--spill-dir", default=None, help="ours: folder for the temporary spill files")
    parser.add_argument("--batch", type=int, default=None, help="maps per update (default: 4 M pixels' worth)")
    parser.add_argument("--defective", type=float, default=0.8, help="fraction of defective images")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float32")
    parser.add_argument("--contenders", default="ours,sklearn,sortpro",
                        help="comma-separated subset of ours, inmemory, f16, sklearn, sortpro")
    parser.add_argument("--device", default="cpu", help="device for ours (cpu, cuda)")
    parser.add_argument(
        "--protocol", choices=["mvtec", "3cad-paper"], default="mvtec", help="protocol for ours"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["ours", "inmemory", "f16", "sklearn", "sortpro"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pixels is not None:
        args.maps = max(1, round(args.pixels / (args.size * args.size)))
    if args.batch is None:
        args.batch = max(1, BATCH_PIXELS // (args.size * args.size))
    if args.child:
        child(args)
        return
    pixels = args.maps * args.size * args.size
    print(
        f"{args.maps} maps of {args.size}x{args.size} {args.dtype} = {pixels / 1e6:.1f} M pixels, "
        f"{args.defective:.0%} defective; {os.cpu_count()} CPU cores, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; batches of {args.batch} maps; "
        f"memory budget {args.memory_budget}"
    )
    with tempfile.TemporaryDirectory(prefix="threecad-bench-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        generate(folder, args.maps, args.size, args.defective, args.dtype, args.seed)
        names = [c.strip() for c in args.contenders.split(",") if c.strip()]
        if "f16" in names:
            to_float16(folder)
        print(f"generated in {time.perf_counter() - start:.1f} s")
        results = {}
        for name in names:
            results[name] = measure(name, folder, args)
            r = results[name]
            if "error" in r:
                print(f"{name:8s} failed: {r['error']}")
                continue
            metrics = ", ".join(f"{k}={v:.6f}" for k, v in r["metrics"].items() if v is not None)
            spilled = " (spilled to disk)" if r.get("spilled") else ""
            print(
                f"{name:8s} {r['seconds']:8.2f} s (CPU {r['cpu_seconds']:7.1f} s)  peak {r['peak_mb']:8.0f} MB "
                f"(data/imports before timing {r['baseline_mb']:.0f} MB){spilled}  {metrics}"
            )
    compare_paths(results)
    compare_references(results)


def compare_paths(results: dict) -> None:
    """Ratios of ours against the float16 path and the in-memory float32 path, and the differences."""
    ours = results.get("ours")
    if not ours or "error" in ours:
        return
    for name, what in (("f16", "float16 maps"), ("inmemory", "float32 all in memory")):
        other = results.get(name)
        if not other or "error" in other:
            continue
        print(f"ours / {name} ({what}): time {ours['seconds'] / other['seconds']:.2f}x, "
              f"CPU time {ours['cpu_seconds'] / other['cpu_seconds']:.2f}x, peak {ours['peak_mb'] / other['peak_mb']:.2f}x")
        if name == "inmemory":
            worst = max(abs(ours["metrics"][k] - other["metrics"][k]) for k in ours["metrics"]
                        if ours["metrics"][k] is not None)
            print(f"largest |ours - inmemory| over the six metrics: {worst:.2e}")


def compare_references(results: dict) -> None:
    ours, sk = results.get("ours"), results.get("sklearn")
    if ours and sk and "error" not in ours and "error" not in sk:
        print(
            f"speed-up vs scikit-learn (its P-AUROC + AP; ours all six metrics): {sk['seconds'] / ours['seconds']:.1f}x"
        )
        print(f"peak memory, ours / scikit-learn: {ours['peak_mb'] / sk['peak_mb']:.2f}")
        for key in ("p_auroc", "p_ap"):
            print(f"|{key} ours - sklearn| = {abs(ours['metrics'][key] - sk['metrics'][key]):.2e}")
    sp = results.get("sortpro")
    if ours and sp and "error" not in ours and "error" not in sp:
        print(
            f"speed-up vs sort-based AU-PRO: {sp['seconds'] / ours['seconds']:.1f}x, "
            f"peak memory ours / sort-based: {ours['peak_mb'] / sp['peak_mb']:.2f}, "
            f"|aupro difference| = {abs(ours['metrics']['aupro'] - sp['metrics']['aupro']):.2e}"
        )


if __name__ == "__main__":
    main()
