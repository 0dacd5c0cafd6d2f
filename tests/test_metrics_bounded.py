"""The bounded-memory mode of the evaluator: float32/float64 keys spilled to disk give the same metrics.

Every test compares the spilled path with the in-memory engine (``memory_budget=None``) and with an
independent reference (scikit-learn, a brute-force AU-PRO) on data with ties, several categories,
good and defective images and PRO regions, at budgets small enough to force spilling into many
buckets and recursive bucket splits.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import ndimage
from skimage import measure
from sklearn.metrics import average_precision_score, roc_auc_score

from cli import cli
from threecad.dataset.layout import list_categories, list_samples
from threecad.dataset.masks import read_mask
from threecad.errors import ThreecadError
from threecad.io import image_size
from threecad.maps.files import map_relpath, write_map
from threecad.metrics import METRICS, Evaluator, evaluate_predictions, pixels
from threecad.metrics.pixels import parse_memory_budget


def brute_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """AU-PRO from its definition, one threshold per distinct score (small inputs only)."""
    scores = maps.astype(np.float64)
    regions = []
    for image, mask in zip(scores, masks):
        labels = measure.label(mask, connectivity=2)
        regions += [image[labels == r] for r in range(1, labels.max() + 1)]
    normal = np.sort(scores[~masks])
    thresholds = np.unique(scores)[::-1]
    xs = np.concatenate(([0.0], (normal.size - np.searchsorted(normal, thresholds, "left")) / normal.size))
    ys = np.zeros(thresholds.size + 1)
    for region in regions:
        region = np.sort(region)
        ys[1:] += (region.size - np.searchsorted(region, thresholds, "left")) / region.size
    ys /= len(regions)
    area = 0.0
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:]):
        if x0 >= limit:
            break
        if x1 > x0:
            end = min(x1, limit)
            area += (end - x0) * (y0 + y0 + (y1 - y0) * (end - x0) / (x1 - x0)) / 2
    return area / limit


def blob_data(rng, n=10, size=40, good=3, levels=None, dtype=np.float32, offset=0.0):
    """Smooth maps with elliptic defects (some on the border), ``good`` defect-free images, optional ties."""
    yy, xx = np.mgrid[:size, :size]
    maps = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 2, 2)) + offset
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(good, n):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, size, 2)
            ry, rx = rng.uniform(1, size / 4, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        maps[i][masks[i]] += rng.uniform(0.1, 1.0)
    if levels is not None:
        maps = np.round(maps * levels) / levels
    return maps.astype(dtype), masks


def run(batches, budget, spill_dir=None, curves=False, backend="auto") -> tuple[dict, bool]:
    """Evaluate ``[(maps, masks, category), ...]`` batch by batch; returns (result, whether it spilled)."""
    evaluator = Evaluator(memory_budget=budget, spill_dir=spill_dir, backend=backend)
    for maps, masks, category in batches:
        evaluator.update(maps, masks, categories=category)
    spilled = evaluator.spilled
    return evaluator.compute(curves=curves), spilled


def split_into_batches(maps, masks, category, size=2):
    return [(maps[i : i + size], masks[i : i + size], category) for i in range(0, len(maps), size)]


def assert_same(bounded: dict, memory: dict, tolerance: float = 1e-12) -> None:
    assert bounded["categories"].keys() == memory["categories"].keys()
    for name, values in memory["categories"].items():
        for metric in METRICS:
            assert bounded["categories"][name][metric] == pytest.approx(values[metric], abs=tolerance), (name, metric)


@pytest.fixture
def four_categories():
    """float32 with ties (rounded), continuous, around 0 (both signs), and all in one narrow range."""
    rng = np.random.default_rng(0)
    _, narrow_masks = blob_data(rng, n=8, size=48, good=2)
    # every score in [1, 1.125): one top-level bucket holding thousands of distinct anomalous keys
    narrow = (1.0 + 0.06 * rng.random(narrow_masks.shape) + 0.06 * narrow_masks).astype(np.float32)
    data = {
        "ties": blob_data(rng, levels=20),
        "smooth": blob_data(rng, n=8, size=48, offset=0.75),
        "signed": blob_data(rng, n=8, size=32, levels=500),
        "narrow": (narrow, narrow_masks),
    }
    batches = [b for name, (maps, masks) in data.items() for b in split_into_batches(maps, masks, name)]
    return data, batches


def test_spilled_metrics_equal_in_memory_sklearn_and_brute_force(four_categories, tmp_path, monkeypatch):
    data, batches = four_categories
    calls = []
    original = pixels._SpillStore._bucket

    def spy(self, *args, **kwargs):
        calls.append(args[5])  # the bucket's shift: 20 at the top level, smaller once split
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pixels._SpillStore, "_bucket", spy)
    memory, memory_spilled = run(batches, None, curves=True)
    bounded, bounded_spilled = run(batches, 2_000, spill_dir=tmp_path, curves=True)
    assert not memory_spilled and bounded_spilled
    assert len(calls) > 10 and min(calls) < 20, "many buckets, some split recursively"
    assert_same(bounded, memory)
    assert bounded["curves"] == memory["curves"]
    for name, (maps, masks) in data.items():
        values = bounded["categories"][name]
        y, s = masks.ravel(), maps.astype(np.float64).ravel()
        assert values["p_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12), name
        assert values["p_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12), name
        assert values["aupro"] == pytest.approx(brute_aupro(maps, masks), abs=1e-9), name
        labels = masks.reshape(len(masks), -1).any(axis=1)
        assert values["i_auroc"] == pytest.approx(roc_auc_score(labels, maps.reshape(len(maps), -1).max(axis=1)))
    assert list(tmp_path.iterdir()) == []  # the spill folder is gone after compute


def test_deep_splits_and_single_key_buckets(monkeypatch, tmp_path):
    """Charging many bytes per anomalous record forces splits down to buckets of one key, which are counted."""
    rng = np.random.default_rng(1)
    maps, masks = blob_data(rng, n=12, size=32, levels=8)  # few distinct values, each on many pixels
    batches = split_into_batches(maps, masks, "default", size=1)
    memory, _ = run(batches, None)
    original = pixels._SpillStore._bucket_in_memory
    calls: list[bool] = []

    def spy(self, *args, single: bool, **kwargs):
        calls.append(single)
        return original(self, *args, single=single, **kwargs)

    monkeypatch.setattr(pixels._SpillStore, "_bucket_in_memory", spy)
    monkeypatch.setattr(pixels, "RECORD_BYTES", 1 << 15)  # two records fill the 64 kB working memory
    bounded, spilled = run(batches, 1, spill_dir=tmp_path)
    assert spilled and any(calls), "some buckets were split down to a single key"
    assert_same(bounded, memory)
    y, s = masks.ravel(), maps.astype(np.float64).ravel()
    assert bounded["mean"]["p_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert bounded["mean"]["p_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert list(tmp_path.iterdir()) == []


def test_one_pass_when_every_anomalous_record_fits(four_categories, tmp_path, monkeypatch):
    """Few anomalous records: one pass over the normal keys, no bucket files; same metrics."""
    data, batches = four_categories
    passes = []
    original = pixels._SpillStore._global_slices

    def spy(self, *args, **kwargs):
        passes.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pixels._SpillStore, "_global_slices", spy)
    memory, _ = run(batches, None, curves=True)
    monkeypatch.setattr(pixels, "RECORD_BYTES", 1)  # every record "fits" the 64 kB working memory
    bounded, spilled = run(batches, 2_000, spill_dir=tmp_path, curves=True)
    assert spilled and len(passes) == len(data)
    assert_same(bounded, memory)
    assert bounded["curves"] == memory["curves"]
    for name, (maps, masks) in data.items():
        y, s = masks.ravel(), maps.astype(np.float64).ravel()
        assert bounded["categories"][name]["p_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert bounded["categories"][name]["p_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert list(tmp_path.iterdir()) == []


def test_float64_and_widening_after_spilling(tmp_path):
    """float16, then float32 (spilled), then float64 maps: stored keys are re-keyed, on disk too."""
    rng = np.random.default_rng(2)
    maps, masks = blob_data(rng, n=9, size=32, dtype=np.float64)
    dtypes = [np.float16, np.float16, np.float32, np.float32, np.float64]
    batches = [(maps[i : i + 2].astype(dtypes[i // 2]), masks[i : i + 2], "mixed") for i in range(0, 9, 2)]
    memory, _ = run(batches, None)
    bounded, spilled = run(batches, 1_000, spill_dir=tmp_path)
    assert spilled
    assert_same(bounded, memory)
    combined = np.concatenate([m.astype(np.float64) for m, _, _ in batches])
    y = masks.ravel()
    assert bounded["mean"]["p_auroc"] == pytest.approx(roc_auc_score(y, combined.ravel()), abs=1e-12)
    assert bounded["mean"]["p_ap"] == pytest.approx(average_precision_score(y, combined.ravel()), abs=1e-12)
    assert list(tmp_path.iterdir()) == []


def test_torch_backend_spills_too(four_categories):
    _, batches = four_categories
    torch_batches = [(torch.from_numpy(m), torch.from_numpy(k), c) for m, k, c in batches]
    memory, _ = run(batches, None, backend="numpy")
    bounded, spilled = run(torch_batches, 2_000, backend="torch")
    assert spilled
    assert_same(bounded, memory)


def test_spill_folder_removed_after_an_error_and_the_evaluator_refuses_reuse(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    maps, masks = blob_data(rng, n=6, size=32)
    evaluator = Evaluator(memory_budget=1_000, spill_dir=tmp_path)
    evaluator.update(maps, masks)
    assert evaluator.spilled and len(list(tmp_path.iterdir())) == 1

    def broken(*args, **kwargs):
        raise OSError("disk failed")

    monkeypatch.setattr(pixels._SpillStore, "_chunks", staticmethod(broken))  # reading back fails
    with pytest.raises(OSError, match="disk failed"):
        evaluator.compute()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ThreecadError, match="reset"):
        evaluator.update(maps, masks)
    monkeypatch.undo()
    evaluator.reset()  # after reset it works again, with the same result as in memory
    evaluator.update(maps, masks)
    expected = Evaluator(memory_budget=None)
    expected.update(maps, masks)
    assert evaluator.compute()["mean"] == pytest.approx(expected.compute()["mean"], abs=1e-12)
    # leaving a ``with`` block by an exception removes the folder too
    with pytest.raises(RuntimeError), Evaluator(memory_budget=1_000, spill_dir=tmp_path) as inside:
        inside.update(maps, masks)
        assert len(list(tmp_path.iterdir())) == 1
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_skewed_input_stays_within_budget():
    """Most pixels share one value: equal keys are counted, not held; memory stays near the budget."""
    rng = np.random.default_rng(4)
    n, size = 32, 256  # 2.1 M pixels: 8.4 MB of float32 keys if kept
    budget = 1_000_000
    maps = np.full((n, size, size), 0.125, dtype=np.float32)
    noisy = rng.random((n, size, size)) < 0.05
    maps[noisy] = rng.random(int(noisy.sum()), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    masks[n // 2 :, 100:140, 60:200] = True  # defect regions mostly at the common value too
    maps[masks & (rng.random(masks.shape) < 0.3)] += 0.5

    def peak(memory_budget) -> tuple[float, dict]:
        tracemalloc.start()
        evaluator = Evaluator(memory_budget=memory_budget)
        for i in range(0, n, 2):
            evaluator.update(maps[i : i + 2], masks[i : i + 2])
        result = evaluator.compute()
        peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak_bytes, result

    bounded_peak, bounded = peak(budget)
    memory_peak, memory = peak(None)
    assert memory_peak > 8_000_000  # the in-memory path does hold every key (so this test can fail)
    batch_bytes = 2 * size * size * 22  # one batch in flight: keys, masks, copies, weights
    assert bounded_peak < budget + pixels.PixelAccumulator(memory_budget=budget).work_bytes + batch_bytes
    assert bounded["mean"] == pytest.approx(memory["mean"], abs=1e-12)
    y, s = masks.ravel(), maps.astype(np.float64).ravel()
    assert bounded["mean"]["p_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_parse_memory_budget():
    assert parse_memory_budget("4GB") == 4_000_000_000
    assert parse_memory_budget("512MiB") == 512 * 2**20
    assert parse_memory_budget(" 1.5 g ") == 1_500_000_000
    assert parse_memory_budget(2e9) == 2_000_000_000
    assert parse_memory_budget(None) is None
    for bad in ("lots", "4 parsecs", "0", "-1GB"):
        with pytest.raises(ThreecadError):
            parse_memory_budget(bad)
    with pytest.raises(ThreecadError, match="spill folder not found"):
        Evaluator(spill_dir="/nonexistent/threecad-spill")


def test_evaluate_predictions_and_cli_use_the_budget(synth_root, tmp_path):
    rng = np.random.default_rng(5)
    predictions = tmp_path / "pred"
    category = list_categories(synth_root)[0]
    ys, ss = [], []
    for sample in list_samples(synth_root, category, "test"):
        width, height = image_size(sample.image_path)
        mask = read_mask(sample.mask_path) if sample.label else np.zeros((height, width), bool)
        amap = np.round(rng.random((height, width)) * 64) / 64 + 0.4 * mask
        write_map(predictions / map_relpath(category, sample.defect, sample.stem), amap, dtype="float32")
        ys.append(mask.ravel())
        ss.append(amap.astype(np.float32).astype(np.float64).ravel())
    y, s = np.concatenate(ys), np.concatenate(ss)
    spill = tmp_path / "spill"
    spill.mkdir()
    bounded = evaluate_predictions(synth_root, predictions, categories=[category], memory_budget="2kB",
                                   spill_dir=spill)
    memory = evaluate_predictions(synth_root, predictions, categories=[category], memory_budget=None)
    assert_same(bounded, memory)
    assert bounded["mean"]["p_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert bounded["mean"]["p_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert list(spill.iterdir()) == []
    runner = CliRunner()
    args = ["evaluate", "--dataset", str(synth_root), "--predictions", str(predictions), "--categories", category]
    small = runner.invoke(cli, [*args, "--memory-budget", "2kB", "--spill-dir", str(spill)])
    unlimited = runner.invoke(cli, [*args, "--memory-budget", "none"])
    assert small.exit_code == 0 and unlimited.exit_code == 0, small.output + unlimited.output
    assert small.output == unlimited.output
    assert list(spill.iterdir()) == []
    refused = runner.invoke(cli, [*args, "--memory-budget", "lots"])
    assert refused.exit_code != 0 and "memory budget" in refused.output


def test_3cad_paper_protocol_spills_its_float64_maps(tmp_path):
    """The legacy protocol pools float64 smoothed maps: they spill (8-byte keys) with the same results."""
    rng = np.random.default_rng(6)
    maps, masks = blob_data(rng, n=6, size=64)
    results = []
    for budget in (None, 5_000):
        evaluator = Evaluator(protocol="3cad-paper", memory_budget=budget, spill_dir=tmp_path)
        for i in range(0, 6, 2):
            evaluator.update(maps[i : i + 2], masks[i : i + 2])
        assert evaluator.spilled == (budget is not None)
        results.append(evaluator.compute())
    assert_same(results[1], results[0])
    assert list(tmp_path.iterdir()) == []
