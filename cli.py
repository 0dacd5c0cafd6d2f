"""The ``3cad`` command: argument parsing only; every command calls one library function.

Exit codes: 0 success, 1 a user error (one line on stderr; ``--debug`` shows the traceback),
2 a usage error (click's own). Each section below belongs to one command group.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import click

from threecad.errors import ThreecadError
from threecad.progress import configure_logging, set_progress


def _parse_size(text: str) -> tuple[int, int]:
    """'WxH' or 'N' (square) to (width, height)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not WxH or N") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise click.BadParameter(f"{text!r} is not WxH or N with positive integers")
    return parts[0], parts[1]


def _print_with_causes(exc: BaseException) -> None:
    """The traceback of ``exc`` with every exception it was raised from or while handling.

    The library raises its one-line errors ``from None`` so that a user sees only that line;
    ``--debug`` is for finding the cause, so the suppressed context is printed here as well.
    """
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__suppress_context__ = False
        link = link.__cause__ or link.__context__
    traceback.print_exception(exc)


class _Cli(click.Group):
    """Turns any exception raised by a command into one line and exit code 1 (unless --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if ctx.meta.get("threecad.debug"):
                _print_with_causes(exc)
            if isinstance(exc, ThreecadError):
                message = str(exc)
            else:
                message = f"{exc.__class__.__name__}: {exc} (run with --debug for the traceback)"
            click.echo(f"error: {message}", err=True)
            sys.exit(1)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="threecad")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool, verbose: bool) -> None:
    """threecad: data toolkit, methods and leaderboard for 3CAD-style anomaly detection."""
    ctx.meta["threecad.debug"] = debug
    follower = int(os.environ.get("RANK", "0")) != 0  # torchrun: rank 0 reports, the others only work
    configure_logging(-1 if quiet or follower else (1 if verbose else 0))
    if quiet or follower:
        set_progress(False)
    if follower:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process; errors stay on stderr


# --------------------------------------------------------------------------- synth
@cli.group()
def synth() -> None:
    """Generate synthetic raw data and processed datasets (offline demo and test data)."""


@synth.command("dataset")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed, same bytes).")
@click.option("--categories", default=3, show_default=True, help="Number of categories (1-8).")
@click.option("--train", "n_train", default=24, show_default=True, help="Good training images per category.")
@click.option("--test-good", default=8, show_default=True, help="Good test images per category.")
@click.option("--test-defect", default=16, show_default=True, help="Defective test images per category.")
@click.option("--size", default="256x256", show_default=True, help="Largest image size WxH.")
@click.option("--mask-style", type=click.Choice(["3cad", "mvtec"]), default="3cad", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT.")
def synth_dataset(out, seed, categories, n_train, test_good, test_defect, size, mask_style, overwrite) -> None:
    """Write a processed dataset in the 3CAD layout to OUT."""
    from threecad.synth.dataset import SynthDatasetConfig, make_synthetic_dataset

    config = SynthDatasetConfig(categories, n_train, test_good, test_defect, _parse_size(size), True, mask_style)
    path = make_synthetic_dataset(out, seed=seed, config=config, overwrite=overwrite)
    click.echo(f"wrote {path}")


@synth.command("raw")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed, same bytes).")
@click.option("--categories", default=2, show_default=True, help="Number of categories (1-8).")
@click.option("--images", default=6, show_default=True, help="Frames per category (even ones defective).")
@click.option("--size", default="640x480", show_default=True, help="Largest size WxH of the ordinary frames.")
@click.option("--large", default=1, show_default=True, help="Wide line-scan-like frames per category (2448x2048, 4096x1024).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT.")
def synth_raw(out, seed, categories, images, size, large, overwrite) -> None:
    """Write a raw dataset (frames + LabelMe JSON + deliberate breakage + ground_truth.json) to OUT."""
    from threecad.synth.raw import make_raw_dataset

    path = make_raw_dataset(out, seed, categories, images, _parse_size(size), large, overwrite)
    click.echo(f"wrote {path}")


# --------------------------------------------------------------------------- data
@cli.group()
def data() -> None:
    """Prepare, check, split, import and export datasets."""


# ---- data: preprocess / split (helper B)
@data.command("preprocess")
@click.argument("raw", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--tile", default=1024, show_default=True, help="Window size in pixels.")
@click.option("--overlap", default=0.2, show_default=True, help="Overlap between windows (fraction of the tile).")
@click.option("--min-fraction", default=0.2, show_default=True,
              help="Discard windows (and small frames) with a side under this fraction of the tile.")
@click.option("--category", help="One category for every frame (default: one per sub-folder of RAW).")
@click.option("--label-map", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML/JSON label map (default: RAW/label_map.yaml if present, else every label is a type).")
@click.option("--coco", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read annotations from this COCO JSON instead of LabelMe files.")
@click.option("--line-width", default=3.0, show_default=True, help="Stroke width (px) of linestrip/line shapes.")
@click.option("--train-fraction", default=0.7, show_default=True, help="Share of clean frames whose tiles go to train.")
@click.option("--val-fraction", default=0.0, show_default=True, help="Share of those moved to validation/good.")
@click.option("--seed", default=0, show_default=True, help="Seed of the train/test split.")
@click.option("--mask-suffix", type=click.Choice(["", "_mask"]), default="", show_default=True,
              help="'' for 3CAD mask names, '_mask' for MVTec.")
@click.option("--workers", default=1, show_default=True, help="Worker processes.")
@click.option("--strict", is_flag=True, help="Fail on any annotation or image problem.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT not written by this command.")
def data_preprocess(raw, out, **options) -> None:
    """Validate, repair, rasterise and tile RAW into a 3CAD-layout dataset in OUT (resumable)."""
    from threecad.ingest.preprocess import format_summary, preprocess

    summary = preprocess(raw, out, **options)
    click.echo(format_summary(summary))
    click.echo(f"done in {summary['seconds']:.1f} s: {out}")


@data.command("split")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Random seed.")
@click.option("--train-fraction", default=0.7, show_default=True, help="Share of clean source images for train.")
@click.option("--val-fraction", default=0.0, show_default=True, help="Share of the training ones moved to validation.")
@click.option("--val-defect-fraction", default=0.0, show_default=True,
              help="Share of defective source images moved from test to validation.")
@click.option("--materialize", type=click.Choice(["none", "hardlink", "copy"]), default="none", show_default=True,
              help="Also build the 3CAD tree in OUT.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT.")
def data_split(source, out, **options) -> None:
    """Re-split a pool (preprocess manifest or dataset folder) by source image; write OUT/manifest.*"""
    from threecad.dataset.split import split_dataset

    summary = split_dataset(source, out, **options)
    for key, n in sorted(summary["counts"].items()):
        click.echo(f"{key:<60}{n:>8}")
    click.echo(f"{summary['images']} images from {summary['groups']} source groups: {out}")


# ---- data: verify / download / import-folder / export-hf / stats (helper D)
@data.command("verify")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the JSON report here.")
@click.option("--fingerprint", is_flag=True, help="Also print one hash of the dataset's content.")
@click.option("--expect", type=click.Choice(["auto", "full", "subset"]), default="auto", show_default=True,
              help="full: counts and sizes must match Table 1; subset: report them only; auto: full when all 8 "
              "3CAD categories are present.")
@click.option("--workers", default=4, show_default=True, help="Threads reading images.")
@click.option("--quick", is_flag=True, help="Read image headers only (faster; misses truncated images).")
@click.pass_context
def data_verify(ctx, root, json_out, fingerprint, expect, workers, quick) -> None:
    """Check a dataset: structure, masks, readability, Table-1 counts, sizes, train/test leakage."""
    from threecad.dataset.verify import verify_dataset

    report = verify_dataset(root, expect=expect, fingerprint=fingerprint, workers=workers, report_path=json_out,
                            decode=not quick)
    click.echo(report.summary())
    if not report.ok:
        ctx.exit(1)


@data.command("download")
@click.argument("source")
@click.option("--dest", default="data", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the archive and the extracted dataset.")
@click.option("--sha256", help="Expected sha256 of the archive (overrides the catalogue's).")
@click.option("--expect", type=click.Choice(["auto", "full", "subset"]), default=None,
              help="Passed to verify (default: full for catalogue names, auto otherwise).")
@click.option("--no-verify", is_flag=True, help="Skip verify after extracting.")
@click.option("--retries", default=5, show_default=True, help="Resume attempts after a dropped connection.")
@click.option("--overwrite", is_flag=True, help="Extract again over an existing extracted folder.")
@click.pass_context
def data_download(ctx, source, dest, sha256, expect, no_verify, retries, overwrite) -> None:
    """Download SOURCE (catalogue name 3cad / 3cad-pinyin, http(s) URL or local archive), extract, verify."""
    from threecad.ingest.download import download_dataset

    result = download_dataset(source, dest, sha256=sha256, verify=not no_verify, expect=expect, retries=retries,
                              overwrite=overwrite)
    click.echo(f"archive {result.archive} sha256 {result.sha256}")
    click.echo(f"dataset {result.dataset_root}")
    if result.report is not None:
        click.echo(result.report.summary())
        if not result.report.ok:
            ctx.exit(1)


@data.command("import-folder")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(["magnetic-tile"]), help="Settings for a known public folder.")
@click.option("--category", help="Category folder name (default: the preset's, else SRC's name).")
@click.option("--normal", multiple=True, help="Class folder(s) holding normal images (repeatable).")
@click.option("--strip-prefix", help="Prefix removed from class folder names to name defect types.")
@click.option("--mask-suffix", help="Suffix of mask files (default .png).")
@click.option("--mask-threshold", type=int, help="Binarise masks at > this value (default: automatic).")
@click.option("--train-fraction", default=0.7, show_default=True, help="Share of normal images that train.")
@click.option("--val-fraction", "--validation-fraction", "validation_fraction", default=0.0, show_default=True,
              help="Share of the training normals moved to validation/good.")
@click.option("--seed", default=0, show_default=True)
@click.option("--empty-masks", type=click.Choice(["skip", "error"]), default="skip", show_default=True,
              help="What to do with defective images whose mask is empty.")
@click.option("--link", is_flag=True, help="Hard-link images instead of copying them.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT.")
def data_import_folder(src, out, preset, category, normal, strip_prefix, mask_suffix, mask_threshold, train_fraction,
                       validation_fraction, seed, empty_masks, link, overwrite) -> None:
    """Import class folders of images with same-stem masks from SRC into the 3CAD layout in OUT."""
    from threecad.ingest.import_folder import import_folder

    report = import_folder(src, out, preset=preset, category=category, normal=normal or None,
                           strip_prefix=strip_prefix, mask_suffix=mask_suffix, mask_threshold=mask_threshold,
                           train_fraction=train_fraction, validation_fraction=validation_fraction, seed=seed,
                           empty_masks=empty_masks, link=link, overwrite=overwrite)
    click.echo(report.summary())


@data.command("export-hf")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--category", "categories", multiple=True, help="Only these categories (repeatable).")
@click.option("--max-shard-mb", default=500.0, show_default=True, help="Target size of one parquet shard.")
@click.option("--metadata", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Table with per-image defect_types / source_path / box (default: the root's manifest).")
@click.option("--no-disk", is_flag=True, help="Write only the parquet shards, not save_to_disk's copy.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT.")
def data_export_hf(root, out, categories, max_shard_mb, metadata, no_disk, overwrite) -> None:
    """Export ROOT as a Hugging Face DatasetDict to OUT (parquet shards + card + save_to_disk), offline."""
    from threecad.ingest.hf_export import export_hf

    result = export_hf(root, out, categories=list(categories) or None, max_shard_mb=max_shard_mb,
                       metadata=metadata, disk=not no_disk, overwrite=overwrite)
    click.echo(result.summary())


@data.command("stats")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", default="3cad-stats", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the two histogram PNGs.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write all values as JSON.")
@click.option("--category", "categories", multiple=True, help="Only these categories (repeatable).")
@click.option("--metadata", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Table with per-image defect_types (for the TE column).")
def data_stats(root, out, json_out, categories, metadata) -> None:
    """Print Table-1 statistics of ROOT and write the defect-area and box-aspect histograms."""
    from threecad.dataset.stats import dataset_stats, write_stats

    report = dataset_stats(root, categories=list(categories) or None, metadata=metadata)
    click.echo(report.table())
    for path in write_stats(report, out, json_out):
        click.echo(f"wrote {path}")


# --------------------------------------------------------------------------- train / predict / evaluate
def _parse_value(text: str):
    """An option value: JSON when it parses (numbers, true, null, lists), else the text itself."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_set(pairs: tuple[str, ...]) -> dict:
    """``KEY=VALUE`` pairs, values read by :func:`_parse_value`."""
    config = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--set")
        config[key.strip()] = _parse_value(value)
    return config


@cli.command("methods")
def methods_command() -> None:
    """List the methods that train/predict can build, their default input settings and tuning grid."""
    from threecad.methods import available, get_method

    for name in available():
        try:
            cls = get_method(name)
            doc = (cls.__doc__ or "").strip().splitlines()[0]
            inputs = ", ".join(f"{k}={v}" for k, v in cls.input_defaults().items() if v is not None)
            grid = "; ".join(f"{k}={'|'.join(map(str, v))}" for k, v in cls.TUNE_GRID.items()) or "-"
            doc += f"\n{'':12s} inputs: {inputs}; tune grid: {grid}"
        except Exception as exc:  # noqa: BLE001 - a broken third-party method must not hide the others
            doc = f"(cannot be loaded: {exc})"
        click.echo(f"{name:12s} {doc}")


@cli.command("backbones")
def backbones_command() -> None:
    """List the backbones and whether their pretrained weights are available offline."""
    from threecad.backbones import weights_status

    for row in weights_status():
        where = row["path"] if row["status"] == "found" else f"place {row['file']} at {row['path']}"
        click.echo(f"{row['backbone']:20s} {row['status']:12s} {where}")


def _fit_options(default_out: str):
    """The options `train` and `tune` share: what to fit on which data, and where the runs go."""
    options = [
        click.option("--method", required=True, help="Method name (see `3cad methods`)."),
        click.option("--dataset", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False)),
        click.option("--category", "categories", multiple=True, required=True,
                     help="Category folder, 3CAD code (AI) or alias (repeat, or comma-separated), or `all`."),
        click.option("--out", type=click.Path(path_type=Path), default=None, help=f"Run folder [{default_out}]."),
        click.option("--overwrite", is_flag=True,
                     help="Replace a non-empty OUT (only once the whole run has succeeded)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    ]

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


@cli.command("train")
@_fit_options("runs/<method>")
@click.option("--size", type=int, default=None, help="Image side fed to the model [256]; saved with the method.")
@click.option("--resize", type=click.Choice(["squash", "aspect"]), default=None, help="[squash]; saved with the method.")
@click.option("--exposure", type=click.Choice(["raw", "mean"]), default=None,
              help="mean: scale each image to one mean intensity (frames shot at different exposures) [raw]; "
                   "saved with the method.")
@click.option("--seed", type=int, default=None, help="Random seed [the method's default: 0, or 42 for cfrg].")
@click.option("--backbone", default=None, help="Backbone name (method option).")
@click.option("--epochs", type=int, default=None, help="Training epochs (method option).")
@click.option("--batch-size", type=int, default=None, help="Batch size (method option).")
@click.option("--teacher", default=None, help="Teacher network (method option).")
@click.option("--resume", is_flag=True, default=None, help="Resume from the run folder's checkpoint (method option).")
@click.option("--textures", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Texture folder for anomaly synthesis, e.g. DTD's images/ (method option, cfrg).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Any other method option (repeatable).")
def train_command(method, dataset, categories, out, overwrite, device, size, resize, exposure, seed, backbone,
                  epochs, batch_size, teacher, resume, textures, settings) -> None:
    """Fit a method on the train/good images of each category; one run folder per category."""
    from threecad.methods.runner import train

    config = _parse_set(settings)
    named = {"backbone": backbone, "epochs": epochs, "batch_size": batch_size, "teacher": teacher, "resume": resume,
             "textures": None if textures is None else str(textures.resolve())}
    config.update({k: v for k, v in named.items() if v is not None})
    runs = train(method, dataset, _names(categories), out=out, device=device, size=size, resize=resize, seed=seed,
                 config=config, exposure=exposure, overwrite=overwrite)
    for run in runs:
        click.echo(f"wrote {run}")


def _parse_grid(pairs: tuple[str, ...]) -> dict:
    """``KEY=V1,V2,...`` pairs -> {KEY: [V1, V2, ...]}, each value read as by ``--set``."""
    grid = {}
    for pair in pairs:
        key, sep, values = pair.partition("=")
        if not sep or not key or not values:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE,VALUE,...", param_hint="--grid")
        grid[key.strip()] = [_parse_value(v) for v in values.split(",")]
    return grid


@cli.command("tune")
@_fit_options("runs/<method>-tuned")
@click.option("--seed", type=int, default=None, help="Random seed [the method's default].")
@click.option("--grid", "grid_pairs", multiple=True, metavar="KEY=V1,V2",
              help="Candidate values of an option, replacing the method's declared grid (repeatable).")
@click.option("--kinds", default=None, help="Synthetic anomaly kinds of the validation set, comma-separated "
              "[painted,texture,dark,edge,shade].")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="A fixed method option (repeatable); it leaves the grid.")
def tune_command(method, dataset, categories, out, overwrite, device, seed, grid_pairs, kinds, settings) -> None:
    """Choose a method's settings on the validation split (never the test) and keep the chosen fit."""
    from threecad.methods.tuning import KINDS, TUNING_FILE, tune

    runs = tune(method, dataset, _names(categories), out=out, grid=_parse_grid(grid_pairs) if grid_pairs else None,
                device=device, seed=seed, config=_parse_set(settings), overwrite=overwrite,
                kinds=tuple(k.strip() for k in kinds.split(",")) if kinds else KINDS)
    import json

    for run in runs:
        chosen = json.loads((run / TUNING_FILE).read_text())["chosen"]
        click.echo(f"wrote {run}: {', '.join(f'{k}={v}' for k, v in chosen.items()) or 'defaults'}")


@cli.command("predict")
@click.option("--run", required=True, type=click.Path(path_type=Path, exists=True),
              help="A run folder or a folder of run folders.")
@click.option("--dataset", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Predictions folder.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT (only once every map is written).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float32", show_default=True)
@click.option("--device", default=None, help="Override the run's device (auto, cpu, cuda).")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override an inference option of the saved run (e.g. topk=0.03, sigma=2; repeatable).")
def predict_command(run, dataset, out, overwrite, dtype, device, batch_size, settings) -> None:
    """Write anomaly maps (native size, submission layout) and scores.csv for the test split."""
    from threecad.methods.runner import predict

    written = predict(run, dataset, out, dtype=dtype, batch_size=batch_size, device=device,
                      config=_parse_set(settings), overwrite=overwrite)
    click.echo(f"wrote {written}")


@cli.command("export")
@click.option("--run", required=True, type=click.Path(path_type=Path), help="One run folder.")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Model file to write.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
def export_command(run, fmt, out, opset, overwrite) -> None:
    """Export a trained run's inference (backbone to maps) as an ONNX model for `3cad inspect --engine onnxruntime`."""
    from threecad.export.onnx import export_onnx

    click.echo(f"wrote {export_onnx(run, out, opset=opset, overwrite=overwrite)}")


def _window_options(command):
    """The options inspect and calibrate share: they must score images the same way."""
    options = [
        click.option("--run", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
                     help="One category's run folder (from 3cad train)."),
        click.option("--tile", type=int, default=None,
                     help="Window size for large frames [the one that cut the run's training tiles]."),
        click.option("--overlap", type=float, default=None, help="Window overlap [the run's, else 0.2]."),
        click.option("--combine", type=click.Choice(["max", "mean"]), default="max", show_default=True,
                     help="How overlapping window maps are combined."),
        click.option("--engine", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True),
        click.option("--model", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="ONNX model for --engine onnxruntime [RUN/model.onnx]."),
        click.option("--threads", type=int, default=None,
                     help="Intra-op threads [OMP_NUM_THREADS, else the core count]."),
        click.option("--batch-size", type=int, default=None, help="Windows per forward pass [the method's]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command("calibrate")
@_window_options
@click.option("--normals", required=True, multiple=True,
              help="Held-out normal images: a folder, file or glob (repeatable), e.g. DATA/<Category>/validation/good.")
@click.option("--false-alarm-rate", default=0.01, show_default=True, help="Target share of normal images called NG.")
def calibrate_command(run, tile, overlap, combine, engine, model, threads, batch_size, normals,
                      false_alarm_rate) -> None:
    """Set a run's image and pixel thresholds from held-out normal images (writes RUN/calibration.json)."""
    from threecad.inspect.calibration import CALIBRATION_FILE, calibrate

    record = calibrate(run, list(normals), false_alarm_rate, tile=tile, overlap=overlap, combine=combine,
                       engine=engine, model=model, threads=threads, batch_size=batch_size)
    click.echo(f"{record['n_normals']} normal images: image threshold {record['image_threshold']:.6g}, pixel "
               f"threshold {record['pixel_threshold']:.6g} (false-alarm rate {record['false_alarm_rate']:g}, "
               f"{record['achieved_false_alarm_rate']:.3g} on these normals) -> {Path(run) / CALIBRATION_FILE}")


@cli.command("inspect")
@_window_options
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder (new or empty).")
@click.option("--threshold", type=float, default=None, help="Image threshold (NG above it), overriding the calibration.")
@click.option("--pixel-threshold", type=float, default=None,
              help="Pixel threshold of the region outlines [the calibration's, else --threshold].")
@click.option("--overwrite", is_flag=True, help="Replace inspect's outputs in a non-empty OUT.")
def inspect_command(run, tile, overlap, combine, engine, model, threads, batch_size, inputs, out, threshold,
                    pixel_threshold, overwrite) -> None:
    """Score frames (files, folders, globs; any size) with a run: maps, overlays, results.csv, decisions."""
    from threecad.inspect.inspection import format_summary, inspect

    summary = inspect(run, list(inputs), out, tile=tile, overlap=overlap, combine=combine, threshold=threshold,
                      pixel_threshold=pixel_threshold, engine=engine, model=model, threads=threads,
                      batch_size=batch_size, overwrite=overwrite)
    click.echo(format_summary(summary))
    if not summary["decided"]:
        click.echo(f"no decision: {run} is not calibrated; run `3cad calibrate --run {run} --normals DIR` "
                   "or pass --threshold")
    click.echo(f"wrote {Path(out) / 'results.csv'}")


@cli.command("demo")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT.")
@click.option("--device", default="auto", show_default=True)
def demo_command(out, overwrite, device) -> None:
    """Whole pipeline on synthetic data: raw images -> dataset -> PatchCore -> maps -> metrics."""
    from baselines.demo import run_demo

    result = run_demo(out, overwrite=overwrite, device=device)
    click.echo(result["table"])


@cli.command("evaluate")
@click.option("--dataset", "dataset", required=True, type=click.Path(path_type=Path), help="Dataset root.")
@click.option("--predictions", required=True, type=click.Path(path_type=Path), help="Maps in the submission layout.")
@click.option("--protocol", type=click.Choice(["mvtec", "3cad-paper"]), default="mvtec", show_default=True,
              help="mvtec: standard definitions; 3cad-paper: the official 3CAD code's (legacy).")
@click.option("--categories", multiple=True,
              help="Only these categories: folders, 3CAD codes (ANI) or aliases (repeat, or comma-separated).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the results as JSON.")
@click.option("--device", default="cpu", show_default=True, help="cpu or a torch device such as cuda.")
@click.option("--size", default=None, help="Evaluate at a declared WxH instead of the native size (mvtec).")
@click.option("--curves", is_flag=True, help="Add downsampled ROC and PRO curves to the JSON.")
@click.option("--image-scores", type=click.Choice(["auto", "map-max"]), default="auto", show_default=True,
              help="auto: PREDICTIONS/scores.csv when present, else the max of each map; map-max: ignore scores.csv.")
@click.option("--memory-budget", default="2GB", show_default=True,
              help="Memory for float32 pixel keys before they spill to a temporary folder (exact either way); "
                   "'none': keep everything in memory.")
@click.option("--spill-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder for the temporary spill folder [default: the system temporary folder].")
def evaluate_cmd(dataset, predictions, protocol, categories, json_out, device, size, curves, image_scores,
                 memory_budget, spill_dir) -> None:
    """Score a predictions folder: I-AUROC, P-AUROC, AU-PRO, pixel AP, image and pixel F1-max."""
    from threecad.io import write_json
    from threecad.metrics import evaluate_predictions, format_table
    from threecad.metrics.pixels import parse_memory_budget

    budget = parse_memory_budget(memory_budget)  # a bad value fails before any map is read
    result = evaluate_predictions(dataset, predictions, protocol=protocol, categories=_names(categories),
                                  device=device, size=_parse_size(size) if size else None, curves=curves,
                                  scores="auto" if image_scores == "auto" else None,
                                  memory_budget=budget,
                                  spill_dir=spill_dir)
    if json_out is not None:
        write_json(json_out, result)
    click.echo(format_table(result))


# --------------------------------------------------------------------------- leaderboard
def _store_option(func):
    return click.option("--store", type=click.Path(path_type=Path), envvar="THREECAD_STORE", default=None,
                        help="SQLite results store [$THREECAD_STORE or ~/.threecad/leaderboard.sqlite].")(func)


def _names(items: tuple[str, ...]) -> list[str] | None:
    return [name for item in items for name in item.split(",") if name] or None


@cli.group()
def leaderboard() -> None:
    """Submit maps, run standardized evaluations, and print or publish result tables."""


@leaderboard.command("validate")
@click.argument("submission", type=click.Path(path_type=Path))
@click.option("--dataset", required=True, type=click.Path(path_type=Path), help="Dataset root.")
@click.option("--categories", multiple=True, help="Only these categories (repeat, or comma-separated) [all].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def leaderboard_validate(submission, dataset, categories, as_json) -> None:
    """Check a submission folder/.zip/.tar.gz against the dataset; exit 1 if it is invalid."""
    import json

    from leaderboard.validate import validate_submission

    report = validate_submission(submission, dataset, _names(categories))
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.text())
    if not report.ok:
        sys.exit(1)


@leaderboard.command("submit")
@click.argument("submission", type=click.Path(path_type=Path))
@click.option("--dataset", required=True, type=click.Path(path_type=Path), help="Dataset root.")
@_store_option
@click.option("--categories", multiple=True, help="Only these categories (repeat, or comma-separated) [all].")
@click.option("--device", default="cpu", show_default=True, help="Evaluation device (cpu or cuda).")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome (or the rejection report) as JSON.")
def leaderboard_submit(submission, dataset, store, categories, device, as_json) -> None:
    """Validate, evaluate under both protocols and store a submission (same bytes twice: stored once)."""
    import json

    from leaderboard.submit import submit
    from leaderboard.validate import SubmissionRejected

    try:
        result = submit(submission, dataset, store, _names(categories), device=device)
    except SubmissionRejected as exc:
        click.echo(json.dumps(exc.report.to_dict(), indent=2) if as_json else exc.report.text())
        click.echo(f"error: {exc} (nothing was stored)", err=True)
        sys.exit(1)
    if as_json:
        results = {p: {k: v for k, v in r.items() if k != "curves"} for p, r in result.results.items()}
        click.echo(json.dumps({"sha256": result.sha256, "stored": result.stored, "method": result.method,
                               "results": results}, indent=2, default=str))
    else:
        click.echo(result.text())


@leaderboard.command("table")
@_store_option
@click.option("--metric", default=None, help="One metric (or a,b), e.g. p_auroc.")
@click.option("--pair", default=None, help="Two metrics per cell, e.g. p_auroc/p_ap (default) or i_auroc/aupro.")
@click.option("--protocol", type=click.Choice(["mvtec", "3cad-paper", "runtime"]), default=None,
              help="[mvtec for --source evaluated, else 3cad-paper]")
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "latex", "html"]), default="md", show_default=True)
@click.option("--source", type=click.Choice(["evaluated", "reported", "all"]), default="all", show_default=True)
@click.option("--dataset", default=None, metavar="NAME|FINGERPRINT",
              help="Only this dataset's section: a name (3CAD, a folder name) or a fingerprint prefix [all].")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write to this file instead of stdout.")
def leaderboard_table(store, metric, pair, protocol, fmt, source, dataset, out) -> None:
    """One section per dataset: methods by family x categories + mean; best bold, second underlined."""
    from leaderboard.store import Store
    from leaderboard.tables import render_table
    from threecad.io import write_text

    with Store(store, readonly=True) as db:
        text = render_table(db, metric=metric, pair=pair, protocol=protocol, fmt=fmt, source=source,
                            dataset=dataset)
    if out is not None:
        write_text(out, text)
        click.echo(f"wrote {out}")
    else:
        click.echo(text, nl=False)


@leaderboard.command("run")
@click.option("--method", required=True, help="Method name (see `3cad methods`).")
@click.option("--dataset", required=True, type=click.Path(path_type=Path), help="Dataset root.")
@click.option("--categories", multiple=True, help="Only these categories (repeat, or comma-separated) [all].")
@_store_option
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--size", default=256, show_default=True, help="Image side fed to the model.")
@click.option("--resize", type=click.Choice(["squash", "aspect"]), default="squash", show_default=True)
@click.option("--exposure", type=click.Choice(["raw", "mean"]), default="raw", show_default=True,
              help="mean: scale each image to one mean intensity (frames shot at different exposures).")
@click.option("--seed", default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float32", show_default=True)
@click.option("--warmup", default=3, show_default=True, help="Untimed batch-1 passes before timing.")
@click.option("--timed", default=20, show_default=True, help="Timed batch-1 passes.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for run folders and maps [~/.threecad/runs/<run id>].")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Method option (repeatable).")
def leaderboard_run(method, dataset, categories, store, device, size, resize, exposure, seed, dtype, warmup, timed,
                    out, settings) -> None:
    """Standardized run: fit, predict, evaluate (both protocols) and time per category; resumable."""
    from leaderboard.standardized import standardized_run

    summary = standardized_run(method, dataset, _names(categories), store=store, out=out, device=device, size=size,
                               resize=resize, seed=seed, config=_parse_set(settings), dtype=dtype, warmup=warmup,
                               timed=timed, exposure=exposure)
    click.echo(summary.text())


@leaderboard.command("benchmark")
@click.option("--dataset", required=True, type=click.Path(path_type=Path), help="Dataset root.")
@click.option("--methods", default="all", show_default=True, help="all (every registered method) or a,b,...")
@click.option("--categories", multiple=True, help="Only these categories (repeat, or comma-separated) [all].")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: one job after another here; ray: jobs as Ray tasks (a local instance, or --address).")
@click.option("--address", default=None, help="Join this Ray cluster (ray://HOST:10001, HOST:6379 or auto).")
@click.option("--gpus-per-job", default=0.0, show_default=True, help="GPUs each Ray job asks for (>0: on CUDA).")
@click.option("--cpus-per-job", default=1.0, show_default=True, help="CPUs each Ray job asks for.")
@click.option("--memory-per-job", "memory_gb", default=None, type=float, help="GiB of memory each Ray job asks for.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch CPU threads of every job, both executors [--cpus-per-job]; the same count gives the same "
                   "numbers locally and on Ray.")
@_store_option
@click.option("--device", default="auto", show_default=True, help="Local executor: auto, cpu, cuda or cuda:N.")
@click.option("--size", default=256, show_default=True, help="Image side fed to every model.")
@click.option("--resize", type=click.Choice(["squash", "aspect"]), default="squash", show_default=True)
@click.option("--exposure", type=click.Choice(["raw", "mean"]), default="raw", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float32", show_default=True)
@click.option("--warmup", default=3, show_default=True, help="Untimed batch-1 passes before timing.")
@click.option("--timed", default=20, show_default=True, help="Timed batch-1 passes.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for each run's folders and maps, and benchmark-failures.jsonl [~/.threecad/runs].")
@click.option("--set", "settings", multiple=True, metavar="[METHOD.]KEY=VALUE",
              help="Method option for one method (METHOD.KEY) or every method that has it (KEY); repeatable.")
def leaderboard_benchmark(dataset, methods, categories, executor, address, gpus_per_job, cpus_per_job, memory_gb,
                          threads, store, device, size, resize, exposure, seed, dtype, warmup, timed, out, settings) -> None:
    """Every method x every category, one standardized-run job each, here or on Ray; resumable.

    Exit status 1 if any job failed (the others still ran and were stored), 130 on Ctrl-C.
    """
    from leaderboard.benchmark import BenchmarkInterrupted, benchmark

    def progress_line(outcome, n, total) -> None:
        state = f"done in {outcome.seconds:.1f} s" if outcome.ok else f"FAILED after {outcome.seconds:.1f} s: " \
            f"{outcome.error}"
        click.echo(f"[{n}/{total}] {outcome.method}/{outcome.category}: {state}")

    try:
        summary = benchmark(dataset, methods, _names(categories), store=store, out=out, executor=executor,
                            address=address, gpus_per_job=gpus_per_job, cpus_per_job=cpus_per_job,
                            memory_per_job_gb=memory_gb, threads=threads, device=device, size=size, resize=resize, seed=seed,
                            settings=_parse_set(settings), dtype=dtype, exposure=exposure, warmup=warmup,
                            timed=timed, on_outcome=progress_line)
    except BenchmarkInterrupted as stop:
        click.echo(stop.summary.text())
        click.echo("interrupted: finished jobs are stored; rerun the same command to continue", err=True)
        sys.exit(130)
    click.echo(summary.text())
    if summary.failed:
        sys.exit(1)


@leaderboard.command("site")
@click.argument("out", type=click.Path(path_type=Path))
@_store_option
def leaderboard_site(out, store) -> None:
    """Write one self-contained HTML page (tables, sortable columns, embedded charts) to OUT."""
    from leaderboard.site import build_site

    click.echo(f"wrote {build_site(store, out)}")


@leaderboard.command("list")
@_store_option
@click.option("--source", type=click.Choice(["evaluated", "reported", "all"]), default="all", show_default=True)
def leaderboard_list(store, source) -> None:
    """Stored submissions: sha256, method, version, source, size, number of results, hardware."""
    from leaderboard.store import Store, format_submissions

    with Store(store, readonly=True) as db:
        click.echo(format_submissions(db.submissions(source)), nl=False)


@leaderboard.command("check")
@_store_option
def leaderboard_check(store) -> None:
    """Full integrity check of the store (PRAGMA integrity_check): prints OK or the problems; exit 1 on damage."""
    from leaderboard.store import check_store

    result = check_store(store)
    click.echo(result.text())
    if not result.ok:
        sys.exit(1)


@leaderboard.command("means")
@_store_option
@click.option("--dataset", default=None, metavar="NAME|FINGERPRINT", help="Only this dataset's evaluated means.")
def leaderboard_means(store, dataset) -> None:
    """Check the paper's published Means; then each evaluated entry's means per dataset, with category counts.

    The store part reads --store / $THREECAD_STORE, else the default store when it exists.
    """
    from leaderboard.store import Store, default_store_path
    from leaderboard.tables import means_report

    if store is None and dataset is None and not default_store_path().exists():
        click.echo(means_report(None), nl=False)
        return
    with Store(store, readonly=True) as db:
        click.echo(means_report(db, dataset), nl=False)


@leaderboard.command("export")
@click.argument("out", type=click.Path(path_type=Path))
@_store_option
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default=None, help="[from OUT's suffix]")
@click.option("--source", type=click.Choice(["evaluated", "reported", "all"]), default="all", show_default=True)
def leaderboard_export(out, store, fmt, source) -> None:
    """Write the store's results as CSV (one number per row) or JSON (with submissions and curves)."""
    from leaderboard.store import Store

    with Store(store, readonly=True) as db:
        n = db.export(out, fmt, source)
    click.echo(f"wrote {n} results to {out}")


@leaderboard.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@_store_option
def leaderboard_import(path, store) -> None:
    """Merge a CSV or JSON export into the store (submissions already there are skipped)."""
    from leaderboard.store import Store

    with Store(store) as db:
        counts = db.import_(path)
    click.echo(f"imported {counts['added']} submission(s), skipped {counts['skipped']} already present "
               f"({counts['rows']} rows read)")



def main() -> None:
    cli(prog_name="3cad")


if __name__ == "__main__":
    main()
