"""Exactness of the evaluation engine against independent references.

References: scikit-learn for ROC AUC / AP / PR curves, scikit-image for connected components, and a
slow AU-PRO written directly from the MVTec definition (every distinct threshold, mean over regions,
segment-by-segment trapezoid with interpolation at FPR 0.3).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from cli import cli
from threecad.dataset.layout import list_categories, list_samples
from threecad.dataset.masks import read_mask
from threecad.errors import ThreecadError
from threecad.io import image_size
from threecad.maps.files import map_relpath, read_map, write_map
from threecad.metrics import METRICS, Evaluator, evaluate_predictions
from threecad.metrics.ranking import float_keys, keys_to_float

# --------------------------------------------------------------------------- references


def brute_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """The MVTec AU-PRO from its definition, one threshold at a time (small inputs only)."""
    scores = maps.astype(np.float64)
    regions = []
    for image, mask in zip(scores, masks):
        labels = measure.label(mask, connectivity=2)
        for region in range(1, labels.max() + 1):
            regions.append(image[labels == region])
    normal = scores[~masks]
    thresholds = np.unique(scores)[::-1, None]  # every distinct score, highest first
    xs = [0.0, *((normal[None, :] >= thresholds).sum(axis=1) / normal.size)]
    fractions = np.stack([(r[None, :] >= thresholds).sum(axis=1) / r.size for r in regions])
    ys = [0.0, *fractions.mean(axis=0)]
    area = 0.0
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:]):
        if x0 >= limit:
            break
        if x1 == x0:
            continue
        end = min(x1, limit)
        y_end = y0 + (y1 - y0) * (end - x0) / (x1 - x0)
        area += (end - x0) * (y0 + y_end) / 2
    return area / limit


def sk_f1max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return float(f1.max())


def reference(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray | None = None) -> dict:
    labels = masks.reshape(len(masks), -1).any(axis=1) if labels is None else labels
    y, s = masks.ravel(), maps.astype(np.float64).ravel()
    image_scores = maps.reshape(len(maps), -1).max(axis=1).astype(np.float64)
    return {
        "i_auroc": roc_auc_score(labels, image_scores),
        "p_auroc": roc_auc_score(y, s),
        "aupro": brute_aupro(maps, masks),
        "p_ap": average_precision_score(y, s),
        "i_f1max": sk_f1max(labels, image_scores),
        "p_f1max": sk_f1max(y, s),
    }


def assert_matches(result: dict, expected: dict) -> None:
    for metric in METRICS:
        tolerance = 1e-6 if metric == "aupro" else 1e-9
        assert result[metric] == pytest.approx(expected[metric], abs=tolerance), metric


# --------------------------------------------------------------------------- data


def blob_data(rng, n=8, size=24, dtype=np.float32, good=2, levels=None):
    """Smooth-ish maps with elliptic defects (some touching the border) and a few good images."""
    yy, xx = np.mgrid[:size, :size]
    maps = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 2, 2))
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(good, n):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, size, 2)
            ry, rx = rng.uniform(1, size / 4, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        maps[i][masks[i]] += rng.uniform(0.0, 1.0)
    if levels is not None:
        maps = np.round(maps * levels) / levels
    return maps.astype(dtype), masks


def evaluate(maps, masks, batch=3, **kwargs) -> dict:
    evaluator = Evaluator(**kwargs)
    for start in range(0, len(maps), batch):
        evaluator.update(maps[start : start + batch], masks[start : start + batch])
    return evaluator.compute()["categories"]["default"]


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_keys_preserve_order_and_invert(dtype):
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(scale=100, size=2000), [0.0, -0.0, np.inf, -np.inf, 1e-30, -1e-30]])
    values = values.astype(dtype)
    keys = float_keys(values)
    order = np.argsort(values, kind="stable")
    assert np.all(np.diff(keys[order].astype(np.float64)) >= 0)
    # Equal floats (including -0.0 == +0.0) share a key, different floats do not.
    assert np.array_equal(keys[:, None] == keys[None, :], values[:, None] == values[None, :])
    restored = keys_to_float(keys)
    assert np.array_equal(restored, values + dtype(0))


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_random_maps_match_references(seed, dtype):
    rng = np.random.default_rng(seed)
    maps, masks = blob_data(rng, dtype=dtype)
    assert_matches(evaluate(maps, masks), reference(maps, masks))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_heavy_ties(dtype):
    rng = np.random.default_rng(11)
    maps, masks = blob_data(rng, dtype=dtype, levels=3)
    assert len(np.unique(maps)) < 40
    assert_matches(evaluate(maps, masks), reference(maps, masks))


def test_constant_maps_are_all_ties_not_undefined():
    rng = np.random.default_rng(1)
    _, masks = blob_data(rng)
    maps = np.full(masks.shape, 0.25, dtype=np.float32)
    result = evaluate(maps, masks)
    assert_matches(result, reference(maps, masks))
    assert result["p_auroc"] == 0.5
    assert result["aupro"] == pytest.approx(0.15)  # the diagonal from (0, 0) to (1, 1), up to 0.3


def test_single_region_and_border_regions():
    rng = np.random.default_rng(2)
    maps = rng.random((3, 20, 20)).astype(np.float32)
    masks = np.zeros_like(maps, dtype=bool)
    masks[1, 5:9, 6:12] = True  # one region only in this image
    masks[2, 0:4, 0:20] = True  # touches three borders
    masks[2, 15:20, 17:20] = True  # corner
    maps[masks] += 0.4
    assert_matches(evaluate(maps, masks), reference(maps, masks))
    single = np.zeros_like(masks)
    single[1, 5:9, 6:12] = True
    assert_matches(evaluate(maps, single), reference(maps, single))


def test_many_tiny_regions_use_8_connectivity():
    rng = np.random.default_rng(3)
    maps = rng.random((4, 16, 16)).astype(np.float32)
    masks = rng.random((4, 16, 16)) < 0.08  # mostly single pixels, some diagonal neighbours
    masks[0, 2, 2] = masks[0, 3, 3] = True  # a diagonal pair: one region under 8-connectivity
    masks[3] = False  # one good image
    maps[masks] += rng.random(masks.sum()).astype(np.float32) * 0.5
    assert_matches(evaluate(maps, masks, batch=1), reference(maps, masks))


def test_image_level_uses_folder_labels_and_given_scores():
    rng = np.random.default_rng(4)
    maps, masks = blob_data(rng, n=10)
    labels = masks.reshape(10, -1).any(axis=1).astype(int)
    labels[0] = 1  # a "defective" image whose mask is empty
    scores = rng.random(10)
    evaluator = Evaluator()
    evaluator.update(maps, masks, image_scores=scores, labels=labels)
    result = evaluator.compute()["mean"]
    assert result["i_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["i_f1max"] == pytest.approx(sk_f1max(labels, scores), abs=1e-12)


def test_monotone_transform_changes_nothing():
    rng = np.random.default_rng(5)
    maps, masks = blob_data(rng, dtype=np.float32)
    base = evaluate(maps, masks)
    transformed = np.exp(3.0 * maps.astype(np.float64)) * 1e6 - 17.0  # raw, huge, negative offset
    other = evaluate(transformed, masks)
    for metric in METRICS:
        assert other[metric] == pytest.approx(base[metric], abs=1e-12), metric


def test_batching_and_order_do_not_matter():
    rng = np.random.default_rng(6)
    maps, masks = blob_data(rng, n=9)
    order = rng.permutation(9)
    a = evaluate(maps, masks, batch=9)
    b = evaluate(maps[order], masks[order], batch=2)
    assert a == b


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_torch_backend_equals_numpy(dtype):
    rng = np.random.default_rng(7)
    maps, masks = blob_data(rng, dtype=np.float32)
    maps_t = torch.from_numpy(maps).to(dtype)
    via_torch = evaluate(maps_t, torch.from_numpy(masks), backend="torch", device="cpu")
    via_numpy = evaluate(maps_t.numpy(), masks)
    for metric in METRICS:
        assert via_torch[metric] == pytest.approx(via_numpy[metric], abs=1e-12), metric


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_float16_then_float32_widens_exactly(backend):
    rng = np.random.default_rng(8)
    maps, masks = blob_data(rng, n=8)
    half = maps.astype(np.float16)
    mixed = Evaluator(backend=backend)
    mixed.update(half[:4], masks[:4])  # histogram mode
    mixed.update(maps[4:], masks[4:])  # float32: the histogram becomes keys
    mixed.update(maps[4:6].astype(np.float64) + 1e-12, masks[4:6])  # float64: keys widen again
    combined = np.concatenate([half[:4].astype(np.float64), maps[4:], maps[4:6].astype(np.float64) + 1e-12])
    combined_masks = np.concatenate([masks, masks[4:6]])
    assert_matches(mixed.compute()["mean"], reference(combined, combined_masks))


def test_map_at_other_resolution_is_resized_bilinearly():
    rng = np.random.default_rng(9)
    small = rng.random((2, 8, 8)).astype(np.float32)
    masks = np.zeros((2, 16, 16), dtype=bool)
    masks[1, 4:10, 4:10] = True
    up = torch.nn.functional.interpolate(torch.from_numpy(small)[:, None], size=(16, 16), mode="bilinear")[
        :, 0
    ]
    resized = evaluate(small, masks)
    direct = Evaluator()
    direct.update(up.numpy(), masks, image_scores=small.reshape(2, -1).max(axis=1))
    assert resized == direct.compute()["categories"]["default"]


def test_undefined_metrics_are_none_with_a_reason(caplog):
    rng = np.random.default_rng(10)
    maps = rng.random((3, 8, 8)).astype(np.float32)
    evaluator = Evaluator()
    evaluator.update(maps, np.zeros((3, 8, 8), dtype=bool), categories="clean")
    evaluator.update(maps, np.ones((3, 8, 8), dtype=bool), categories="all_bad")
    with caplog.at_level(logging.WARNING):
        result = evaluator.compute()
    clean, bad = result["categories"]["clean"], result["categories"]["all_bad"]
    assert all(clean[m] is None for m in METRICS)
    assert bad["p_auroc"] is None and bad["aupro"] is None and bad["i_auroc"] is None
    assert bad["p_ap"] == 1.0 and bad["p_f1max"] == 1.0  # defined without normals, as in scikit-learn
    assert all(result["mean"][m] is None for m in METRICS)
    assert "no anomalous pixels" in caplog.text and "no normal pixels" in caplog.text


def test_curves_are_downsampled_and_consistent():
    rng = np.random.default_rng(12)
    maps, masks = blob_data(rng, n=6, size=32)
    evaluator = Evaluator()
    evaluator.update(maps, masks, categories="c")
    result = evaluator.compute(curves=True)
    roc = result["curves"]["c"]["roc"]
    pro = result["curves"]["c"]["pro"]
    assert len(roc[0]) == len(roc[1]) <= 512 and len(pro[0]) <= 512
    # The sampled ROC integrates to the exact AUROC within the sampling error.
    assert np.trapezoid(roc[1], roc[0]) == pytest.approx(result["mean"]["p_auroc"], abs=5e-3)
    assert pro[0][-1] == pytest.approx(0.3)
    json.dumps(result)


@pytest.mark.parametrize(
    "maps, masks, message",
    [
        (np.full((1, 4, 4), np.nan, np.float32), np.zeros((1, 4, 4), bool), "NaN or inf"),
        (np.zeros((1, 2, 4, 4), np.float32), np.zeros((1, 4, 4), bool), "must be"),
        (np.zeros((2, 4, 4), np.float32), np.zeros((3, 4, 4), bool), "2 anomaly maps but 3"),
    ],
)
def test_bad_input_is_a_clear_error(maps, masks, message):
    with pytest.raises(ThreecadError, match=message):
        Evaluator().update(maps, masks)


def test_unknown_protocol_and_empty_compute():
    with pytest.raises(ThreecadError, match="unknown protocol"):
        Evaluator(protocol="anomalib")
    with pytest.raises(ThreecadError, match="nothing to evaluate"):
        Evaluator().compute()


# --------------------------------------------------------------------------- 3cad-paper


def transcribed_paper_pro(amap: np.ndarray, mask: np.ndarray) -> float:
    """The legacy per-image PRO written out literally: loop over thresholds and skimage regions."""
    thresholds = np.arange(amap.min(), amap.max(), (amap.max() - amap.min()) / 200)
    rows = []
    for th in thresholds:
        binary = amap > th
        pros = []
        for region in measure.regionprops(measure.label(mask.astype(int))):
            rr, cc = region.coords[:, 0], region.coords[:, 1]
            pros.append(binary[rr, cc].sum() / region.area)
        inverse = ~mask
        rows.append((np.mean(pros), np.logical_and(inverse, binary).sum() / inverse.sum()))
    rows = [r for r in rows if r[1] < 0.3]
    fpr = np.array([r[1] for r in rows])
    fpr = fpr / fpr.max()
    return auc(fpr, [r[0] for r in rows])


def test_paper_protocol_matches_transcription():
    rng = np.random.default_rng(13)
    yy, xx = np.mgrid[:256, :256]
    maps, masks = [], []
    for i in range(5):
        amap = rng.random((256, 256))
        mask = np.zeros((256, 256), dtype=bool)
        if i >= 3:
            for _ in range(2):
                cy, cx = rng.integers(20, 236, 2)
                mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(36, 400)
            amap[mask] += rng.uniform(0.05, 0.3)
        maps.append(amap.astype(np.float32))
        masks.append(mask)
    maps, masks = np.stack(maps), np.stack(masks)
    evaluator = Evaluator(protocol="3cad-paper")
    evaluator.update(maps[:3], masks[:3])
    evaluator.update(maps[3:], masks[3:])
    result = evaluator.compute()
    got = result["categories"]["default"]
    smoothed = np.stack([ndimage.gaussian_filter(m.astype(np.float64), sigma=4) for m in maps])
    labels = masks.reshape(5, -1).max(axis=1)
    assert result["protocol"] == "3cad-paper"
    assert got["p_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), smoothed.ravel()), abs=1e-9)
    assert got["p_ap"] == pytest.approx(average_precision_score(masks.ravel(), smoothed.ravel()), abs=1e-9)
    assert got["i_auroc"] == pytest.approx(
        roc_auc_score(labels, smoothed.reshape(5, -1).max(axis=1)), abs=1e-9
    )
    expected_pro = np.mean([transcribed_paper_pro(smoothed[i], masks[i]) for i in range(3, 5)])
    assert got["aupro"] == pytest.approx(expected_pro, abs=1e-9)


# --------------------------------------------------------------------------- CLI and predictions folders


def write_predictions(root, out, rng, dtype="float32"):
    """Noisy maps at the native size that are higher inside the defects; returns the pixels per category."""
    pixels, scores = {}, {}
    for category in list_categories(root):
        ys, ss = [], []
        for sample in list_samples(root, category, "test"):
            width, height = image_size(sample.image_path)
            mask = read_mask(sample.mask_path) if sample.label else np.zeros((height, width), bool)
            amap = rng.random((height, width)) + 0.5 * mask
            write_map(out / map_relpath(category, sample.defect, sample.stem), amap, dtype=dtype)
            ys.append(mask.ravel())
            ss.append(amap.astype(dtype).astype(np.float64).ravel())
        pixels[category] = np.concatenate(ys)
        scores[category] = np.concatenate(ss)
    return pixels, scores


def test_cli_evaluate_on_synthetic_dataset(synth_root, tmp_path):
    rng = np.random.default_rng(14)
    predictions = tmp_path / "pred"
    pixels, scores = write_predictions(synth_root, predictions, rng, dtype="float16")
    out = tmp_path / "result.json"
    runner = CliRunner()
    result = runner.invoke(
        cli, ["evaluate", "--dataset", str(synth_root), "--predictions", str(predictions), "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["protocol"] == "mvtec"
    assert set(data["categories"]) == set(list_categories(synth_root))
    for category, values in data["categories"].items():
        assert values["p_auroc"] == pytest.approx(roc_auc_score(pixels[category], scores[category]), abs=1e-9)
        assert values["p_ap"] == pytest.approx(
            average_precision_score(pixels[category], scores[category]), abs=1e-9
        )
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("mean") and len(lines) == 2 + len(data["categories"]) + 1
    assert f"{100 * data['mean']['p_auroc']:.1f}" in lines[-1]


def test_cli_paper_protocol_and_category_choice(synth_root, tmp_path):
    rng = np.random.default_rng(15)
    predictions = tmp_path / "pred"
    write_predictions(synth_root, predictions, rng)
    first = list_categories(synth_root)[0]
    result = evaluate_predictions(synth_root, predictions, protocol="3cad-paper", categories=[first])
    assert list(result["categories"]) == [first]
    assert all(0.0 <= v <= 1.0 for v in result["mean"].values())


def test_cli_bad_predictions_give_one_line_errors(synth_root, tmp_path):
    rng = np.random.default_rng(16)
    predictions = tmp_path / "pred"
    write_predictions(synth_root, predictions, rng)
    category = list_categories(synth_root)[0]
    sample = list_samples(synth_root, category, "test")[-1]
    target = predictions / map_relpath(category, sample.defect, sample.stem)
    runner = CliRunner()
    args = ["evaluate", "--dataset", str(synth_root), "--predictions", str(predictions)]

    def error_of() -> str:
        result = runner.invoke(cli, args)
        assert result.exit_code == 1
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:")
        return lines[0]

    saved = target.read_bytes()
    target.unlink()
    assert "1 map(s) missing" in error_of()
    target.write_bytes(saved)
    extra = predictions / map_relpath(category, sample.defect, "not_an_image")
    extra.write_bytes(saved)
    assert "no matching test image" in error_of()
    extra.unlink()
    np.save(target.with_suffix(".npy"), np.zeros((4, 4)))  # .npy is not a map: an unexpected file
    assert "no matching test image" in error_of() and "maps must be named <stem>.tiff" in error_of()
    target.with_suffix(".npy").unlink()
    width, height = image_size(sample.image_path)
    write_map(target, np.full((height, width), np.nan))
    assert "NaN/inf" in error_of() and target.name in error_of()
    tifffile.imwrite(target, np.zeros((height, width, 3), np.float32), photometric="rgb")
    assert "single-channel 2-D" in error_of()
    write_map(target, np.zeros((height, width + 1)))  # maps at another size are refused, not resized
    assert f"but expected {width}x{height}" in error_of()
    tifffile.imwrite(target, np.zeros((height, width), np.float64))
    assert "dtype float64" in error_of()
    target.write_bytes(saved)
    assert runner.invoke(cli, args).exit_code == 0


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_many_small_key_blocks_give_the_same_result(backend, monkeypatch):
    from threecad.metrics import pixels

    rng = np.random.default_rng(17)
    maps, masks = blob_data(rng, n=8, size=32)
    expected = evaluate(maps, masks, backend=backend)
    monkeypatch.setattr(pixels, "BLOCK", 700)  # blocks fill mid-batch and across batches
    assert evaluate(maps, masks, backend=backend) == expected
    assert_matches(expected, reference(maps, masks))


def test_declared_size_resizes_masks_nearest_and_maps_bilinear():
    from PIL import Image

    rng = np.random.default_rng(18)
    maps, masks = blob_data(rng, n=4, size=32)
    at_size = evaluate(maps, masks, size=(16, 16))
    small_masks = np.stack(
        [
            np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((16, 16), Image.NEAREST)) > 127
            for m in masks
        ]
    )
    shrunk = torch.nn.functional.interpolate(
        torch.from_numpy(maps)[:, None], size=(16, 16), mode="bilinear", antialias=True
    )[:, 0]
    direct = Evaluator()
    direct.update(shrunk.numpy(), small_masks, image_scores=maps.reshape(4, -1).max(axis=1))
    assert at_size == direct.compute()["categories"]["default"]


def test_scores_csv_beside_the_maps_gives_the_image_scores(synth_root, tmp_path):
    """predict writes scores.csv; evaluate must use it (and only it) for I-AUROC when present."""
    from threecad.maps.files import read_scores, write_scores

    rng = np.random.default_rng(17)
    predictions = tmp_path / "pred"
    write_predictions(synth_root, predictions, rng)
    category = list_categories(synth_root)[0]
    samples = list_samples(synth_root, category, "test")
    chosen = {(category, s.relpath): float(rng.normal()) for s in samples}
    write_scores(predictions / "scores.csv", chosen)
    assert read_scores(predictions / "scores.csv") == chosen
    labels = [s.label for s in samples]
    expected = roc_auc_score(labels, [chosen[(category, s.relpath)] for s in samples])
    with_file = evaluate_predictions(synth_root, predictions, categories=[category])
    assert with_file["categories"][category]["i_auroc"] == pytest.approx(expected, abs=1e-12)
    maxima = [read_map(predictions / map_relpath(category, s.defect, s.stem)).max() for s in samples]
    ignored = evaluate_predictions(synth_root, predictions, categories=[category], scores=None)
    assert ignored["categories"][category]["i_auroc"] == pytest.approx(roc_auc_score(labels, maxima), abs=1e-12)
    del chosen[(category, samples[0].relpath)]
    write_scores(predictions / "scores.csv", chosen, merge=False)
    with pytest.raises(ThreecadError, match="no score"):
        evaluate_predictions(synth_root, predictions, categories=[category])
