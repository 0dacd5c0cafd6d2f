"""The ``3cad`` command: argument parsing only; every command calls one library function.

Exit codes: 0 success, 1 a user error (one line on stderr; ``--debug`` shows the traceback),
2 a usage error (click's own). Each section below belongs to one command group.
"""

from __future__ import annotations

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
                traceback.print_exc()
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
    configure_logging(-1 if quiet else (1 if verbose else 0))
    if quiet:
        set_progress(False)


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


# --------------------------------------------------------------------------- data
@cli.group()
def data() -> None:
    """Prepare, check, split, import and export datasets."""


# --------------------------------------------------------------------------- train / predict / evaluate


# --------------------------------------------------------------------------- leaderboard


def main() -> None:
    cli(prog_name="3cad")


if __name__ == "__main__":
    main()
