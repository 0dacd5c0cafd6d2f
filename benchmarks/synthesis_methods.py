"""Training-step time of DRAEM and DeSTSeg (both phases) against their bare network forward + backward.

    .venv/bin/python benchmarks/synthesis_methods.py [--size 64] [--batch 8] [--width 4] [--seg-width 64]
                                                     [--device cpu] [--repeats 5] [--threads 1]

``step``: the method's own training step on a batch already on the device (forward, losses,
backward, optimiser step, as the engine runs it), synthesis excluded (the items are made once
beforehand). ``bare``: the same network's forward on the same batch, ``sum()`` of its outputs as
the loss, backward and the same optimiser step: what the network costs by itself. ``overhead`` =
step / bare (goal <= 1.3: the losses and the method's glue add little). DRAEM uses widths / ``--width``,
DeSTSeg the offline Lite0 teacher and a segmentation width of ``--seg-width`` so that CPU runs take seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from baselines.destseg import DeSTSeg, _Phase
from baselines.draem import DRAEM
from threecad.device import resolve_device
from threecad.progress import set_progress
from threecad.synth.anomalies import DRAEM_SYNTHESIS, SyntheticAnomalyDataset, collate, destseg_synthesis


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int):
        g = torch.Generator().manual_seed(0)
        self.images = [torch.rand(3, size, size, generator=g) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index]}


def _seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def _outputs(out) -> torch.Tensor:
    """The sum of every tensor a forward returned (nested lists and dicts): the bare loss."""
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    values = out.values() if isinstance(out, dict) else out
    return sum(_outputs(v) for v in values)


def _compare(name: str, trainable, module, batch: dict, forward, device: torch.device, repeats: int) -> dict:
    optimizer, _ = trainable.configure_optimizers(module)
    mode = getattr(trainable, "train_mode", None)
    mode(module) if mode is not None else module.train()

    def step() -> None:
        loss = trainable.training_step(module, batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def bare() -> None:
        loss = _outputs(forward(module, batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step_s, bare_s = _seconds(step, device, repeats), _seconds(bare, device, repeats)
    return {"method": name, "step_s": round(step_s, 4), "bare_s": round(bare_s, 4), "overhead": round(step_s / bare_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=4, help="DRAEM width divisor (1 = official)")
    parser.add_argument("--seg-width", type=int, default=64, help="DeSTSeg segmentation width (256 = official)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_progress(False)
    device = resolve_device(args.device)
    images = _Images(args.batch, args.size)

    def batch_of(params) -> dict:
        data = SyntheticAnomalyDataset(images, seed=0, params=params)
        return {k: v.to(device) for k, v in collate([data[i] for i in range(len(data))]).items()}

    rows = []
    draem = DRAEM(width=args.width, batch_size=args.batch, device=str(device))
    rows.append(_compare(f"draem (width 1/{args.width})", draem, draem._build(), batch_of(DRAEM_SYNTHESIS),
                         lambda m, b: m(b["augmented"]), device, args.repeats))
    destseg = DeSTSeg(encoder="efficientnet_lite0", seg_width=args.seg_width, batch_size=args.batch,
                      device=str(device))
    batch = batch_of(destseg_synthesis())
    for phase, forward in (("student", lambda m, b: m(b["augmented"], b["image"], segment=False)["student"]),
                           ("segmentation", lambda m, b: m(b["augmented"])["segmentation"])):
        trainable = _Phase(destseg, phase)
        rows.append(_compare(f"destseg {phase}", trainable, trainable.trainable_module(), batch, forward, device,
                             args.repeats))
    for row in rows:
        row.update(size=args.size, batch=args.batch, device=str(device), threads=torch.get_num_threads())
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
