"""`ttds index build` and `ttds index stats`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ttds.errors import TTDSError

index_app = typer.Typer(no_args_is_help=True, help="Semantic indices: build (RQ-VAE, LSH, random) and inspect.")


def build_command(data: str, tower: str = "item", backbone: str | None = None, kind: str | None = None,
                  collisions: str | None = None, out: Path | None = None, config: str | None = None,
                  overrides: list[str] | None = None) -> tuple[Path, dict, dict]:
    """Resolve config (`index.options.*`, `backbone.*`), build, save; returns (folder, stats, semantic)."""
    from ttds.backbone import Backbone, BackboneConfig
    from ttds.config import load_config, section, set_path
    from ttds.data.readers import load_dataset
    from ttds.index.build import build, encoder_for, index_config, save_build
    from ttds.index.quality import entity_texts, semantic_check
    from ttds.io import write_json
    from ttds.runtime import setup_logging, setup_torch, set_seed

    ds = load_dataset(data)
    cfg = load_config(dataset=ds.name, file=config, overrides=overrides)
    if backbone:
        set_path(cfg, ["backbone", "name_or_path"], backbone)
    if kind:
        set_path(cfg, ["index", "options", "kind"], kind)
    if collisions:
        set_path(cfg, ["index", "options", "collisions"], collisions)
    icfg = index_config(cfg)
    out = Path(out) if out else Path("runs") / f"index-{ds.name}-{tower}-{icfg.kind}"
    setup_logging(out)
    device = setup_torch(cfg)
    set_seed(int(cfg.get("seed", 0)))
    bb = None
    if icfg.kind in ("rqvae", "lsh"):
        bcfg = section(cfg, "backbone", BackboneConfig)
        bcfg.device = str(device)
        bb = encoder_for(None, icfg) if icfg.encoder else Backbone.load(bcfg)
    b = build(ds, tower, bb, icfg)
    save_build(b, out)
    texts, cats = entity_texts(ds, tower)
    sem = semantic_check(b.index, texts, cats, seed=int(cfg.get("seed", 0)))
    write_json(out / "semantic.json", sem)
    return out, b.stats, sem


def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")

    @index_app.command("build")
    def build_cmd(
        data: str = typer.Option(..., "--data", help="Dataset: an LC-Rec folder, a table folder, or 'builtin'."),
        tower: str = typer.Option("item", "--tower", help="item | user"),
        backbone: Optional[str] = typer.Option(None, "--backbone", help="minilm | smollm2-135m | a local HF folder."),
        kind: Optional[str] = typer.Option(None, "--kind", help="rqvae | lsh | random | given (default: config)."),
        collisions: Optional[str] = typer.Option(None, "--collisions", help="ttds | lcrec | none (default: config)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default runs/index-<data>-<tower>-<kind>)."),
        config: Optional[str] = typer.Option(None, "--config", help="Extra YAML config layer."),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="Override, e.g. --set index.options.rqvae.epochs=50"),
    ):
        """Embed the texts, train the tokenizer, resolve collisions, write index + tokenizer weights."""
        from ttds.index.quality import format_stats

        folder, stats, sem = build_command(data, tower, backbone, kind, collisions, out, config, set_)
        typer.echo(format_stats(stats, sem))
        typer.echo(f"index folder: {folder}")

    @index_app.command("stats")
    def stats_cmd(
        path: Path = typer.Argument(..., help="An index folder (ttds index build) or an LC-Rec NAME.index.json."),
        data: Optional[str] = typer.Option(None, "--data", help="Dataset, for the semantic check."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ):
        """Collision rate before/after, code usage and perplexity per level, build time, semantic check."""
        from ttds.index.build import load_raw_codes
        from ttds.index.quality import entity_texts, format_stats, index_stats, semantic_check
        from ttds.io import read_json

        from ttds.index.base import SemanticIndex

        if not path.exists():
            raise TTDSError(f"{path}: no such index folder or file")
        folder = path if path.is_dir() else None
        if folder is not None:
            if not (folder / "index.json").is_file():
                raise TTDSError(f"{folder}: not an index folder (no index.json)")
            conf = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
            idx = SemanticIndex.load(folder / "index.json", conf.get("tower", "item"))
            built = read_json(folder / "stats.json") if (folder / "stats.json").is_file() else None
            stats = index_stats(idx, load_raw_codes(folder), built)
        else:
            idx = SemanticIndex.load(path)
            stats = index_stats(idx)
        sem = None
        if data:
            from ttds.data.readers import load_dataset

            ds = load_dataset(data)
            n = ds.n_items if idx.tower == "item" else ds.n_users
            if n != idx.n:
                raise TTDSError(f"--data {data}: {n} {idx.tower}s, the index has {idx.n}")
            texts, cats = entity_texts(ds, idx.tower)
            sem = semantic_check(idx, texts, cats)
        elif folder is not None and (folder / "semantic.json").is_file():
            sem = read_json(folder / "semantic.json")
        typer.echo(json.dumps({"stats": stats, "semantic": sem}, indent=1) if as_json else format_stats(stats, sem))
