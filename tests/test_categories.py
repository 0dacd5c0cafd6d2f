"""One resolver for category names: folders, 3CAD codes and catalogue aliases, in every command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import cli
from threecad.dataset.catalog import ALIASES, CATEGORIES, CATEGORY_FOLDERS, resolve_categories
from threecad.dataset.layout import list_categories, list_samples
from threecad.dataset.masks import read_mask
from threecad.errors import ThreecadError
from threecad.io import image_size
from threecad.maps.files import map_relpath, write_map
from threecad.synth.dataset import SynthDatasetConfig, make_synthetic_dataset


def _folders(root: Path, names) -> Path:
    """A dataset skeleton: one ``<name>/test/good`` folder per category (all the resolver looks at)."""
    for name in names:
        (root / name / "test" / "good").mkdir(parents=True)
    return root


def test_every_code_and_alias_resolves_to_the_folder_the_dataset_has(tmp_path):
    root = _folders(tmp_path / "3CAD", CATEGORY_FOLDERS)
    available = list_categories(root)
    for info in CATEGORIES:
        for name in (info.folder, info.code, info.code.lower(), info.folder.lower(), info.folder.upper(),
                     f" {info.code} "):
            assert resolve_categories(available, [name], root) == [info.folder], name
    for alias, folder in ALIASES.items():
        assert resolve_categories(available, [alias], root) == [folder], alias
        assert resolve_categories(available, [alias.upper()], root) == [folder], alias
    # Order is the user's, duplicates go, and "all" (or nothing) is every folder.
    assert resolve_categories(available, ["AP", "ani", "Aluminum_Pc"], root) == ["Aluminum_Pc", "Aluminum_New_Ipad"]
    assert resolve_categories(available, "all", root) == resolve_categories(available, None, root) == available


def test_a_dataset_that_names_a_category_by_an_alias_gets_its_own_folder(tmp_path):
    root = _folders(tmp_path / "old", ["Aluminum_Middle-Frame", "aluminum_ipad_new", "Magnetic_Tile"])
    available = list_categories(root)
    assert resolve_categories(available, ["AMF", "ANI", "Aluminum_New_Ipad", "magnetic_tile"], root) == [
        "Aluminum_Middle-Frame", "aluminum_ipad_new", "Magnetic_Tile"]


def test_an_unknown_name_is_one_error_listing_the_folders_and_codes(tmp_path):
    root = _folders(tmp_path / "d", ["Aluminum_Ipad", "Aluminum_Pc", "Magnetic_Tile"])
    with pytest.raises(ThreecadError) as info:
        resolve_categories(list_categories(root), ["AI", "Bogus", "CS"], root)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{root}: unknown categories Bogus, CS")
    assert "CS (3CAD Copper_Stator, not in this dataset)" in message
    assert message.endswith("the dataset has Aluminum_Ipad (AI), Aluminum_Pc (AP), Magnetic_Tile")


@pytest.fixture(scope="module")
def six(tmp_path_factory) -> Path:
    """A tiny synthetic dataset with the first six real 3CAD folders (ANI and AP among them)."""
    config = SynthDatasetConfig(categories=6, train=2, test_good=2, test_defect=2, size=(48, 48))
    return make_synthetic_dataset(tmp_path_factory.mktemp("six") / "data", seed=1, config=config)


@pytest.fixture(scope="module")
def maps(six, tmp_path_factory) -> Path:
    """Maps for ANI and AP only: the masks themselves plus noise, and meta.json for the leaderboard."""
    out = tmp_path_factory.mktemp("maps") / "maps"
    rng = np.random.default_rng(0)
    for category in ("Aluminum_New_Ipad", "Aluminum_Pc"):
        for sample in list_samples(six, category, "test"):
            width, height = image_size(sample.image_path)
            truth = read_mask(sample.mask_path) if sample.label else np.zeros((height, width), bool)
            amap = truth + 0.1 * rng.random((height, width), dtype=np.float32)
            write_map(out / map_relpath(category, sample.defect, sample.stem), amap)
    (out / "meta.json").write_text(json.dumps({"method": "Oracle"}))
    return out


def test_the_readme_evaluate_command_line_works(six, maps, tmp_path):
    # README: 3cad evaluate --dataset data/3cad --predictions maps/ --protocol 3cad-paper --categories ANI,AP
    result = CliRunner().invoke(cli, ["evaluate", "--dataset", str(six), "--predictions", str(maps),
                                      "--protocol", "3cad-paper", "--categories", "ANI,AP",
                                      "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["categories"].keys() == {"Aluminum_New_Ipad", "Aluminum_Pc"}
    unknown = CliRunner().invoke(cli, ["evaluate", "--dataset", str(six), "--predictions", str(maps),
                                       "--categories", "ANI,CS"])
    assert unknown.exit_code == 1 and "unknown category CS (3CAD Copper_Stator, not in this dataset)" in unknown.output


def test_leaderboard_validate_and_data_stats_take_codes(six, maps):
    result = CliRunner().invoke(cli, ["leaderboard", "validate", str(maps), "--dataset", str(six),
                                      "--categories", "ani", "--categories", "Aluminum_Pc", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["categories"] == ["Aluminum_New_Ipad", "Aluminum_Pc"]
    from threecad.dataset.stats import dataset_stats

    assert [c.category for c in dataset_stats(six, categories=["acc", "AI"]).categories] == [
        "Aluminum_Camera_Cover", "Aluminum_Ipad"]


def test_train_and_predict_take_codes(six, tmp_path):
    result = CliRunner().invoke(cli, ["train", "--method", "padim", "--dataset", str(six), "--category", "ai,ACC",
                                      "--out", str(tmp_path / "runs"), "--device", "cpu", "--size", "32"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["Aluminum_Camera_Cover", "Aluminum_Ipad"]
    result = CliRunner().invoke(cli, ["predict", "--run", str(tmp_path / "runs"), "--dataset", str(six),
                                      "--out", str(tmp_path / "maps")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "maps").iterdir() if p.is_dir()) == ["Aluminum_Camera_Cover",
                                                                                  "Aluminum_Ipad"]
