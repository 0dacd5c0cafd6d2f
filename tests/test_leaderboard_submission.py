"""Submissions: the validator, safe unpacking, submit (evaluation + store), idempotence, concurrency."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from cli import cli
from leaderboard.store import Store
from leaderboard.submit import submit
from leaderboard.validate import Limits, SubmissionRejected, validate_submission
from threecad.dataset.layout import list_categories, list_samples
from threecad.dataset.masks import read_mask
from threecad.io import image_size
from threecad.maps.files import map_relpath, write_map

FINGERPRINT = "sha256:test"  # skip hashing the dataset in every test; one test uses the real one


def make_submission(dataset: Path, out: Path, seed: int = 0, method: str = "Oracle", dtype: str = "float16",
                    categories: list[str] | None = None) -> Path:
    """Noisy oracle maps (mask + uniform noise) at native size, plus meta.json."""
    rng = np.random.default_rng(seed)
    for category in categories or list_categories(dataset):
        for sample in list_samples(dataset, category, "test"):
            width, height = image_size(sample.image_path)
            mask = read_mask(sample.mask_path) if sample.label else np.zeros((height, width), bool)
            amap = 0.6 * mask + rng.random((height, width), dtype=np.float32)
            write_map(out / map_relpath(category, sample.defect, sample.stem), amap, dtype=dtype)
    (out / "meta.json").write_text(json.dumps({"method": method, "version": "1", "family": "other",
                                               "url": "https://example.org"}))
    return out


@pytest.fixture(scope="module")
def valid(synth_root, tmp_path_factory) -> Path:
    return make_submission(synth_root, tmp_path_factory.mktemp("sub") / "valid")


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    return dst


def _first_map(sub: Path, defect: bool = True) -> Path:
    maps = sorted(p for p in sub.rglob("*.tiff") if ("/good/" in p.as_posix()) != defect)
    return maps[0]


def test_valid_submission_is_stored_with_both_protocols(synth_root, valid, tmp_path):
    report = validate_submission(valid, synth_root)
    assert report.ok, report.text()
    assert report.maps_checked == sum(len(list_samples(synth_root, c, "test")) for c in list_categories(synth_root))
    with Store(tmp_path / "lb.sqlite") as db:
        before = db.counts()
        result = submit(valid, synth_root, db, fingerprint=FINGERPRINT)
        assert result.stored and result.sha256 == report.sha256
        rows = db.results(source="evaluated")
        assert {r["protocol"] for r in rows} == {"mvtec", "3cad-paper"}
        assert {r["category"] for r in rows} == {*list_categories(synth_root), "mean"}
        assert db.counts()["results"] == before["results"] + len(rows) == before["results"] + 2 * 3 * 6
        assert db.curves(result.sha256)  # ROC/PRO curves kept for the site
        # Independent check of one stored number: pixel AUROC over all pixels with scikit-learn.
        category = list_categories(synth_root)[0]
        scores, labels, image_scores, image_labels = [], [], [], []
        for sample in list_samples(synth_root, category, "test"):
            amap = tifffile.imread(valid / map_relpath(category, sample.defect, sample.stem)).astype(np.float64)
            w, h = image_size(sample.image_path)
            mask = read_mask(sample.mask_path) if sample.label else np.zeros((h, w), bool)
            scores.append(amap.ravel())
            labels.append(mask.ravel())
            image_scores.append(amap.max())
            image_labels.append(sample.label)
        stored = {(r["protocol"], r["metric"]): r["value"] for r in rows if r["category"] == category}
        assert stored[("mvtec", "p_auroc")] == pytest.approx(roc_auc_score(np.concatenate(labels),
                                                                           np.concatenate(scores)), abs=1e-9)
        assert stored[("mvtec", "i_auroc")] == pytest.approx(roc_auc_score(image_labels, image_scores), abs=1e-9)
        sub = db.submissions("evaluated")[0]
        assert sub["method"] == "Oracle" and sub["family"] == "other" and sub["eval_size"] == "native"
        assert sub["dataset_fingerprint"] == FINGERPRINT and sub["meta"]["url"] == "https://example.org"
        # Re-submitting the same bytes, even as an archive, changes nothing.
        after = db.counts()
        archive = shutil.make_archive(str(tmp_path / "again"), "zip", valid)
        again = submit(archive, synth_root, db, fingerprint=FINGERPRINT)
        assert not again.stored and again.sha256 == result.sha256 and db.counts() == after


def _zip_of(src: Path, path: Path, extra: dict[str, bytes] | None = None, prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(src.rglob("*")):
            if file.is_file():
                zf.write(file, prefix + file.relative_to(src).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def _tar_with(src: Path, path: Path, special: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        tf.add(src, arcname=".")
        tf.addfile(special)
    return path


#: name -> (build(sub, synth_root, tmp_path) -> the broken submission, text expected in the report, limits)
BROKEN: dict[str, tuple] = {}


def case(name: str, expected: str, limits: Limits = Limits()):
    """Register one broken submission under a unique name (a parametrized test below runs each)."""
    if name in BROKEN:
        raise ValueError(f"two broken-submission cases are named {name!r}")

    def decorate(build):
        BROKEN[name] = (build, expected, limits)
        return build
    return decorate


@case("missing map", "missing file(s)")
def _(sub, synth_root, tmp_path):
    _first_map(sub).unlink()
    return sub


@case("unexpected file", "unexpected file(s)")
def _(sub, synth_root, tmp_path):
    (sub / list_categories(synth_root)[0] / "test" / "good" / "extra.tiff").write_bytes(b"x")
    return sub


@case("wrong suffix", "maps must be named <stem>.tiff")
def _(sub, synth_root, tmp_path):
    path = _first_map(sub)
    path.rename(path.with_suffix(".tif"))
    return sub


@case("float64", "dtype float64; maps must be float16 or float32")
def _(sub, synth_root, tmp_path):
    path = _first_map(sub)
    tifffile.imwrite(path, tifffile.imread(path).astype(np.float64))
    return sub


@case("integer map", "dtype uint8")
def _(sub, synth_root, tmp_path):
    path = _first_map(sub)
    tifffile.imwrite(path, np.zeros(tifffile.imread(path).shape, np.uint8))
    return sub


@case("three channels", "is not a single-channel 2-D map")
def _(sub, synth_root, tmp_path):
    path = _first_map(sub)
    tifffile.imwrite(path, np.repeat(tifffile.imread(path)[..., None], 3, axis=2), photometric="rgb")
    return sub


@case("wrong size", "but expected")
def _(sub, synth_root, tmp_path):
    path = _first_map(sub)
    tifffile.imwrite(path, tifffile.imread(path)[:-3])
    return sub


@case("NaN", "NaN/inf value(s)")
def _(sub, synth_root, tmp_path):
    path = _first_map(sub)
    data = tifffile.imread(path)
    data[0, 0] = np.nan
    tifffile.imwrite(path, data)
    return sub


@case("inf in a good map", "NaN/inf value(s)")
def _(sub, synth_root, tmp_path):
    path = _first_map(sub, defect=False)
    data = tifffile.imread(path)
    data[-1, -1] = np.inf
    tifffile.imwrite(path, data)
    return sub


@case("not a TIFF", "not a readable TIFF")
def _(sub, synth_root, tmp_path):
    _first_map(sub).write_bytes(b"garbage" * 10)
    return sub


@case("no meta.json", "meta.json: missing")
def _(sub, synth_root, tmp_path):
    (sub / "meta.json").unlink()
    return sub


@case("meta without method", '"method" must be a non-empty string')
def _(sub, synth_root, tmp_path):
    (sub / "meta.json").write_text('{"version": "1"}')
    return sub


@case("declared size mismatch", "but expected 64x64")
def _(sub, synth_root, tmp_path):
    (sub / "meta.json").write_text('{"method": "M", "size": 64}')
    return sub


@case("scores.csv incomplete", "scores.csv: no score for")
def _(sub, synth_root, tmp_path):
    (sub / "scores.csv").write_text("category,path,score\n")
    return sub


@case("scores.csv bad value", "is not a number")
def _(sub, synth_root, tmp_path):
    cat = list_categories(synth_root)[0]
    rows = [f"{cat},{s.relpath},{'oops' if i == 0 else i}" for i, s in enumerate(list_samples(synth_root, cat, "test"))]
    (sub / "scores.csv").write_text("category,path,score\n" + "\n".join(rows) + "\n")
    return sub


@case("zip with ..", "'..' in path")
def _(sub, synth_root, tmp_path):
    return _zip_of(sub, tmp_path / "dotdot.zip", {"../evil.txt": b"x"})


@case("zip with absolute path", "absolute path")
def _(sub, synth_root, tmp_path):
    return _zip_of(sub, tmp_path / "abs.zip", {"/etc/evil": b"x"})


@case("zip with symlink", "symbolic link")
def _(sub, synth_root, tmp_path):
    path = _zip_of(sub, tmp_path / "link.zip")
    info = zipfile.ZipInfo("link")
    info.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(info, "/etc/passwd")
    return path


@case("zip bomb", "decompression bomb", Limits(ratio_floor=1 << 20, max_ratio=100))
def _(sub, synth_root, tmp_path):
    return _zip_of(sub, tmp_path / "bomb.zip", {"zeros.bin": bytes(8 << 20)})


@case("tar bomb", "decompression bomb", Limits(ratio_floor=1 << 20, max_ratio=100))
def _(sub, synth_root, tmp_path):
    (sub / "zeros.bin").write_bytes(bytes(32 << 20))
    with tarfile.open(tmp_path / "bomb.tar.gz", "w:gz") as tf:
        tf.add(sub, arcname=".")
    return tmp_path / "bomb.tar.gz"


@case("too many files", "over the limit of 5", Limits(max_files=5))
def _(sub, synth_root, tmp_path):
    return _zip_of(sub, tmp_path / "many.zip")


@case("tar with symlink", "is a link")
def _(sub, synth_root, tmp_path):
    info = tarfile.TarInfo("evil")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return _tar_with(sub, tmp_path / "link.tar.gz", info)


@case("tar with device file", "device or special file")
def _(sub, synth_root, tmp_path):
    info = tarfile.TarInfo("dev")
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return _tar_with(sub, tmp_path / "dev.tar.gz", info)


@case("tar over the size limit", "beyond the limit", Limits(max_bytes=1 << 16))
def _(sub, synth_root, tmp_path):
    with tarfile.open(tmp_path / "big.tar.gz", "w:gz") as tf:
        tf.add(sub, arcname=".")
    return tmp_path / "big.tar.gz"


@case("corrupt archive", "not a zip or tar archive")
def _(sub, synth_root, tmp_path):
    (tmp_path / "junk.zip").write_bytes(b"PK not really")
    return tmp_path / "junk.zip"


@case("folder with symlink", "symbolic link")
def _(sub, synth_root, tmp_path):
    (sub / "link").symlink_to("/etc/passwd")
    return sub


@pytest.mark.parametrize("name", list(BROKEN))
def test_each_broken_submission_is_rejected_and_store_unchanged(synth_root, valid, tmp_path, name):
    build, expected, limits = BROKEN[name]
    store_path = tmp_path / "lb.sqlite"
    with Store(store_path) as db:
        db.add_submission({"sha256": "f" * 64, "method": "Existing", "source": "evaluated"},
                          [{"category": "A", "protocol": "mvtec", "metric": "p_auroc", "value": 0.5}])
        before = db.counts()
    work = tmp_path / "case"
    work.mkdir()
    sub = build(_copy(valid, work), synth_root, tmp_path)
    report = validate_submission(sub, synth_root, limits=limits)
    assert not report.ok
    assert expected in report.text(), report.text()
    with Store(store_path) as db, pytest.raises(SubmissionRejected) as info:
        submit(sub, synth_root, db, limits=limits, fingerprint=FINGERPRINT)
    assert info.value.report.ok is False and str(sub) in str(info.value)
    with Store(store_path) as db:
        assert db.counts() == before


def test_report_lists_every_missing_and_unexpected_file(synth_root, valid, tmp_path):
    sub = _copy(valid, tmp_path)
    removed = sorted(sub.rglob("*.tiff"))[:3]
    for path in removed:
        path.unlink()
    (sub / "Nope").mkdir()
    (sub / "Nope" / "x.tiff").write_bytes(b"")
    report = validate_submission(sub, synth_root)
    assert report.missing == sorted(p.relative_to(sub).as_posix() for p in removed)
    assert report.unexpected == ["Nope/x.tiff (not a chosen category of the dataset)"]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False and len(data["missing"]) == 3


def test_archive_with_top_folder_and_declared_size(synth_root, tmp_path):
    """A zip whose content sits in one folder, maps at a declared size, and scores.csv that is used."""
    sub = tmp_path / "sized"
    cats = list_categories(synth_root)
    rng = np.random.default_rng(1)
    rows = ["category,path,score"]
    labels, given = [], []
    for category in cats:
        for sample in list_samples(synth_root, category, "test"):
            write_map(sub / map_relpath(category, sample.defect, sample.stem), rng.random((32, 48)), "float32")
            score = float(rng.random())
            rows.append(f"{category},{sample.relpath},{score!r}")
            if category == cats[0]:
                labels.append(sample.label)
                given.append(score)
    (sub / "scores.csv").write_text("\n".join(rows) + "\n")
    (sub / "meta.json").write_text(json.dumps({"method": "Sized", "size": [48, 32]}))
    archive = _zip_of(sub, tmp_path / "sized.zip", prefix="my_submission/")
    report = validate_submission(archive, synth_root)
    assert report.ok, report.text()
    assert report.size == [48, 32] and report.has_scores
    with Store(tmp_path / "lb.sqlite") as db:
        result = submit(archive, synth_root, db, fingerprint=FINGERPRINT)
        values = {(r["protocol"], r["metric"]): r["value"] for r in db.results(submission=result.sha256)
                  if r["category"] == cats[0]}
        assert db.submissions("evaluated")[0]["eval_size"] == "48x32"
    # mvtec uses scores.csv for the image score; the paper protocol defines its own (max of smoothed map).
    assert values[("mvtec", "i_auroc")] == pytest.approx(roc_auc_score(labels, given), abs=1e-12)


def _submit_in_child(args) -> bool:
    sub, dataset, store = args
    from leaderboard.submit import submit as child_submit

    return child_submit(sub, dataset, store, fingerprint=FINGERPRINT).stored


def test_two_concurrent_submit_processes_lose_nothing(synth_root, valid, tmp_path):
    other = make_submission(synth_root, tmp_path / "other", seed=5, method="Other")
    store = tmp_path / "lb.sqlite"
    Store(store).close()
    ctx = multiprocessing.get_context("fork")  # children inherit the imported modules: fast start
    with ctx.Pool(2) as pool:
        stored = pool.map(_submit_in_child, [(valid, synth_root, store), (other, synth_root, store)])
    assert stored == [True, True]
    with ctx.Pool(2) as pool:  # the same bytes twice at once: stored once
        again = pool.map(_submit_in_child, [(other, synth_root, store)] * 2)
    assert again == [False, False]
    with Store(store) as db:
        methods = sorted(s["method"] for s in db.submissions("evaluated"))
        assert methods == ["Oracle", "Other"]
        assert len(db.results(source="evaluated")) == 2 * 2 * 3 * 6


def test_cli_validate_and_submit(synth_root, valid, tmp_path):
    runner = CliRunner()
    store = tmp_path / "cli.sqlite"
    ok = runner.invoke(cli, ["leaderboard", "validate", str(valid), "--dataset", str(synth_root)])
    assert ok.exit_code == 0 and "VALID" in ok.output
    broken = _copy(valid, tmp_path)
    _first_map(broken).unlink()
    bad = runner.invoke(cli, ["leaderboard", "validate", str(broken), "--dataset", str(synth_root), "--json"])
    assert bad.exit_code == 1 and json.loads(bad.output)["missing"]
    rejected = runner.invoke(cli, ["leaderboard", "submit", str(broken), "--dataset", str(synth_root),
                                   "--store", str(store)])
    assert rejected.exit_code == 1 and "INVALID" in rejected.output and "nothing was stored" in rejected.output
    with Store(store) as db:
        assert db.submissions("evaluated") == []
    done = runner.invoke(cli, ["leaderboard", "submit", str(valid), "--dataset", str(synth_root),
                               "--store", str(store)])
    assert done.exit_code == 0, done.output
    assert "stored submission" in done.output and "protocol: 3cad-paper" in done.output
    table = runner.invoke(cli, ["leaderboard", "table", "--store", str(store), "--source", "evaluated",
                                "--metric", "p_auroc"])
    assert "Oracle (1)" in table.output and "protocol mvtec" in table.output
    with Store(store) as db:  # the real dataset fingerprint from threecad.dataset.verify
        assert db.submissions("evaluated")[0]["dataset_fingerprint"].startswith("sha256:")


def test_tar_gz_submission_accepted(synth_root, valid, tmp_path):
    path = tmp_path / "sub.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        tf.add(valid, arcname="sub")
    report = validate_submission(path, synth_root)
    assert report.ok, report.text()
    folder_report = validate_submission(valid, synth_root)
    assert report.sha256 == folder_report.sha256  # same content, same id, whatever the container
