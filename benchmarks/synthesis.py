"""Anomaly-synthesis throughput (samples/s) at 256x256 on one CPU process.

    .venv/bin/python benchmarks/synthesis.py [--samples 200] [--size 256] [--textures DIR]

Reports the mask alone (Perlin + rotation + threshold), and full samples (mask + texture + blend)
with procedural textures, with other training images as textures, and with a texture folder when
given. DataLoader workers multiply these figures roughly by their count.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from threecad.synth.anomalies import TextureBank, blend, perlin_mask


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int):
        self.images = [torch.rand(3, size, size) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index]}


def _rate(fn, samples: int) -> float:
    fn(0)
    start = time.perf_counter()
    for i in range(samples):
        fn(i)
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--textures", default=None)
    args = parser.parse_args()
    shape = (args.size, args.size)
    rng = np.random.default_rng(0)
    image = rng.random((*shape, 3), dtype=np.float32)
    banks = {
        "procedural": TextureBank(procedural_probability=1.0),
        "train_images": TextureBank(images=_Images(8, args.size), procedural_probability=0.0),
    }
    if args.textures:
        banks["folder"] = TextureBank(args.textures)
    results = {"size": args.size, "samples": args.samples,
               "mask_only": _rate(lambda i: perlin_mask(shape, rng), args.samples)}
    for name, bank in banks.items():
        def sample(i: int, bank=bank) -> None:
            mask, _ = perlin_mask(shape, rng)
            blend(image, bank.draw(rng, shape), mask, float(rng.uniform(0, 0.8)))
        results[f"full_{name}"] = _rate(sample, args.samples)
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
