"""Shared fixtures. Tests never touch the network; data is generated or read from ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from threecad.progress import set_progress
from threecad.synth.dataset import SynthDatasetConfig, make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("THREECAD_SHARED", ROOT.parent / "shared"))
MAGNETIC_TILE = SHARED / "data" / "magnetic_tile"

set_progress(False)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("THREECAD_OFFLINE", "1")  # no weight downloads in tests, ever


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small processed dataset in the 3CAD layout (2 categories), shared by the session: read-only."""
    out = tmp_path_factory.mktemp("synth") / "dataset"
    config = SynthDatasetConfig(categories=2, train=12, test_good=6, test_defect=10, size=(128, 128))
    return make_synthetic_dataset(out, seed=7, config=config)


@pytest.fixture(scope="session")
def magnetic_tile() -> Path:
    """The real magnetic-tile data in ../shared; skips cleanly where it is absent."""
    if not MAGNETIC_TILE.is_dir():
        pytest.skip(f"../shared magnetic tile data not present at {MAGNETIC_TILE}")
    return MAGNETIC_TILE


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core runner, two threads per process oversubscribe badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lite_teacher():
    from threecad.methods.blocks import Teacher

    return Teacher("efficientnet_lite0")
