"""Kill a real training subprocess at a chosen point: the exact-resume tests of the engine and the methods."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict:
    """The environment of a worker: this checkout importable, one thread, not a torchrun rank."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    env.pop("WORLD_SIZE", None)
    return env


def kill_when_paused(command: list[str], marker: Path, env: dict, timeout: float = 120.0) -> None:
    """Start ``command``, wait until it writes ``marker`` (its pause point), SIGKILL it, and check it
    died of that signal. A worker that exits or never reaches the pause fails the test with its
    output, and no worker is left behind."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed = False
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the worker never reached its pause"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        killed = True
    finally:
        if not killed:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
