"""The `ttds` command line. Thin: every command parses options and calls a recipe.

User mistakes raise TTDSError and are printed as one line (exit code 2), never a traceback.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from ttds.errors import TTDSError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Generative recommendation with semantic IDs (TTDS).")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: statistics, conversion, the built-in generator.")
app.add_typer(data_app, name="data")

DataOpt = typer.Option(..., "--data", help="Dataset: an LC-Rec folder, a table folder, or 'builtin'.")
SetOpt = typer.Option(None, "--set", help="Config override KEY=VALUE (repeatable), e.g. --set train.lr=1e-3")


@data_app.command("stats")
def data_stats(
    path: str = typer.Argument(..., help="Dataset folder or 'builtin'."),
    drop_short: bool = typer.Option(False, "--drop-short", help="Drop users with < 3 interactions (warning)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Print users, items, interactions, sequence lengths and text coverage."""
    from ttds.data.readers import load_dataset
    from ttds.data.stats import dataset_stats, format_stats

    ds = load_dataset(path, drop_short=drop_short)
    stats = dataset_stats(ds)
    typer.echo(json.dumps(stats, indent=1) if as_json else format_stats(stats))


@data_app.command("builtin")
def data_builtin(
    out: Path = typer.Option(..., "--out", help="Folder to write the LC-Rec layout into."),
    spec: str = typer.Option("builtin", "--spec", help="e.g. builtin:users=3000,items=2000,seed=0"),
):
    """Generate the built-in dataset and write it in the LC-Rec layout."""
    from ttds.data.readers import load_dataset, write_lcrec

    if not (spec == "builtin" or spec.startswith("builtin:")):
        raise TTDSError(f"--spec {spec!r}: expected 'builtin' or 'builtin:key=value,...'")
    folder = write_lcrec(load_dataset(spec), out)
    typer.echo(f"wrote {folder}")


@data_app.command("prepare-amazon")
def data_prepare_amazon(
    reviews: Path = typer.Option(..., "--reviews", help="Amazon 2018 reviews JSON lines (.json or .json.gz)."),
    meta: Optional[Path] = typer.Option(None, "--meta", help="Amazon 2018 meta_*.json(.gz)."),
    out: Path = typer.Option(..., "--out", help="Output folder (LC-Rec layout)."),
    name: str = typer.Option("", "--name", help="Dataset name (default: the output folder's name)."),
    k: int = typer.Option(5, "--k", help="k-core threshold."),
):
    """Raw Amazon Review 2018 files -> 5-core chronological sequences in the LC-Rec layout."""
    from ttds.data.amazon import prepare_amazon
    from ttds.data.readers import write_lcrec

    ds = prepare_amazon(reviews, meta, name or out.name, k)
    write_lcrec(ds, out)
    typer.echo(f"wrote {out}: {ds.n_users} users, {ds.n_items} items, {ds.n_interactions} interactions")


def _register_commands() -> None:
    """Commands of the other layers live next to the code they drive."""
    from ttds.index import commands as index_commands  # ttds index build|stats
    from ttds.serve import commands as serve_commands  # ttds precompute|serve
    from ttds.train import commands as train_commands  # ttds train|eval|bench

    for module in (train_commands, index_commands, serve_commands):
        module.register(app)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    from ttds.runtime import setup_logging

    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        app(args=argv, standalone_mode=True)
    except TTDSError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
