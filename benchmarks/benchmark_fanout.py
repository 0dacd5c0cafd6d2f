"""The benchmark's fan-out: N tiny jobs one after another (``--executor local``) vs on Ray.

N jobs = one method (PaDiM by default, tiny settings) x N categories of a synthetic dataset, through
:func:`leaderboard.benchmark.benchmark`, each into a fresh store. Reported: the serial wall time,
Ray's start-up (``ray.init``, once), the Ray wall time of a first pass (cold: Ray starts its worker
processes, which import torch and the method) and of a second pass in the same Ray instance (warm
workers), the speed-up serial / Ray, and the per-job overhead

    overhead = (cpus * ray_wall - serial_wall) / N

i.e. the CPU time each job costs beyond an ideal split of the serial work over ``cpus`` workers
(job placement, shipping the plan and the rows, worker start-up in the cold pass). The mean time a
job spends inside its worker (``seconds`` of each outcome) is printed too.

    OMP_NUM_THREADS=1 python benchmarks/benchmark_fanout.py [--jobs 8] [--cpus 2] [--method padim]
                                                            [--size 64] [--train 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from leaderboard.benchmark import benchmark
from threecad.io import write_json
from threecad.progress import set_progress
from threecad.synth.dataset import SynthDatasetConfig, make_synthetic_dataset


def one_pass(dataset: Path, work: Path, name: str, executor: str, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    summary = benchmark(dataset, methods=args.method, store=work / f"{name}.sqlite", out=work / name,
                        executor=executor, size=args.size, warmup=1, timed=2, settings={"batch_size": 8})
    wall = time.perf_counter() - start
    assert summary.ok and len(summary.done) == args.jobs, summary.text()
    return {"pass": name, "wall_s": wall, "job_s": statistics.fmean(o.seconds for o in summary.done)}


def main() -> None:
    parser = argparse.ArgumentParser(description="N tiny benchmark jobs: serial vs Ray")
    parser.add_argument("--jobs", type=int, default=8, help="categories of the synthetic dataset (1-8)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance (one job each)")
    parser.add_argument("--method", default="padim")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--train", type=int, default=16, help="training images per category")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    set_progress(False)
    print(f"torch threads: {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"cpu_count: {os.cpu_count()}, ray {ray.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = SynthDatasetConfig(categories=args.jobs, train=args.train, test_good=4, test_defect=4,
                                    size=(96, 96))
        dataset = make_synthetic_dataset(work / "dataset", seed=0, config=config)
        serial = one_pass(dataset, work, "serial", "local", args)
        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
        startup = time.perf_counter() - start
        try:
            cold = one_pass(dataset, work, "ray-cold", "ray", args)
            warm = one_pass(dataset, work, "ray-warm", "ray", args)
        finally:
            ray.shutdown()
    rows = [serial, cold, warm]
    for row in (cold, warm):
        row["speedup"] = serial["wall_s"] / row["wall_s"]
        row["overhead_per_job_s"] = (args.cpus * row["wall_s"] - serial["wall_s"]) / args.jobs
    print(f"{args.jobs} jobs of {args.method} (size {args.size}, {args.train} training images), "
          f"{args.cpus} CPUs; ray.init {startup:.1f} s (not in the walls below)")
    print(f"{'pass':10s} {'wall s':>8s} {'job s':>7s} {'speed-up':>9s} {'overhead/job s':>15s}")
    for row in rows:
        cells = [f"{row[k]:.2f}" if k in row else "-" for k in ("speedup", "overhead_per_job_s")]
        print(f"{row['pass']:10s} {row['wall_s']:8.1f} {row['job_s']:7.2f} {cells[0]:>9s} {cells[1]:>15s}")
    if args.json:
        write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "ray_init_s": startup,
                               "passes": rows})


if __name__ == "__main__":
    main()
