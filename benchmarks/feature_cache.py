"""Epoch time of methods on a frozen encoder with and without the feature cache.

For each method (default: FastFlow and SimpleNet, their default encoders, i.e. Lite0 where the
paper's ResNet-18 / WideResNet-50-2 file is absent), fit on synthetic images twice, with
``feature_cache`` on and off, and report the mean time of the epochs after the first (the
engine's ``time_s``: data loading and training steps), the one-off time of filling the cache (the
difference of the two fits' time outside their epochs, which both spend building the network) and
the speed-up of an epoch. The torch thread count is printed and recorded.

    python benchmarks/feature_cache.py [--methods fastflow simplenet] [--images 64] [--size 256]
                                       [--epochs 3] [--threads 1] [--device cpu] [--json out.json]
                                       [--encoder resnet18 --encoder-weights random]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from threecad.dataset.loaders import AnomalyDataset
from threecad.device import resolve_device
from threecad.methods import build
from threecad.progress import set_progress
from threecad.synth.dataset import SynthDatasetConfig, make_synthetic_dataset


def time_fit(name: str, train, epochs: int, device: str, cache: bool, encoder: dict) -> dict:
    method = build(name, epochs=epochs, device=device, feature_cache=cache, **encoder)
    start = time.perf_counter()
    method.fit(train)
    wall = time.perf_counter() - start
    times = [row["time_s"] for row in method.history_]
    later = times[1:] or times  # the first epoch also pays one-off kernel set-up
    return {"method": name, "encoder": method.resolved_config().get("encoder"), "cache": cache,
            "epoch_s": sum(later) / len(later), "setup_s": wall - sum(times), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description="epoch time with vs without the frozen-feature cache")
    parser.add_argument("--methods", nargs="+", default=["fastflow", "simplenet"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--encoder", default=None, help="default: each method's own (the paper's, else Lite0)")
    parser.add_argument("--encoder-weights", default=None,
                        help="'random' times the paper's encoder without its weight file (timing only)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch threads: {threads}")
    set_progress(False)
    device = str(resolve_device(args.device))
    encoder = {k: v for k, v in (("encoder", args.encoder), ("encoder_weights", args.encoder_weights)) if v}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        config = SynthDatasetConfig(categories=1, train=args.images, test_good=1, test_defect=1,
                                    size=(args.size, args.size), vary_size=False)
        root = make_synthetic_dataset(Path(tmp) / "data", seed=0, config=config)
        category = next(p.name for p in root.iterdir() if p.is_dir())
        train = AnomalyDataset(root, category, "train", size=args.size)
        for name in args.methods:
            rows = {cache: time_fit(name, train, args.epochs, device, cache, encoder) for cache in (True, False)}
            gain = rows[False]["epoch_s"] / rows[True]["epoch_s"]
            fill = rows[True]["setup_s"] - rows[False]["setup_s"]  # both build the network; one fills the cache
            for row in rows.values():
                row.update(images=len(train), size=args.size, epochs=args.epochs, threads=threads, device=device,
                           epoch_speedup=gain, cache_fill_s=fill)
                results.append(row)
            print(f"{name:10s} {rows[True]['encoder']:18s} {device} {len(train)} images at {args.size} px: "
                  f"epoch {rows[False]['epoch_s']:.2f} s without cache, {rows[True]['epoch_s']:.2f} s with "
                  f"(x{gain:.2f}); filling the cache about {fill:.2f} s once", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
