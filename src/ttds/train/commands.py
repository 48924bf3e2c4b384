"""`ttds train`, `ttds eval`, `ttds bench`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ttds.errors import TTDSError
from ttds.serve.commands import QuantOpt


def default_out(model: str, dataset_name: str) -> Path:
    return Path("runs") / f"{model}-{dataset_name}"


def train_model(model: str, data: str, out: Path | None = None, config: str | None = None,
                overrides: list[str] | None = None, drop_short: bool = False) -> tuple[dict, Path]:
    """Resolve the config, load the data, run the model's recipe. Returns (metrics, out_dir)."""
    from ttds.config import load_config
    from ttds.data.readers import load_dataset
    from ttds.recipes import recipe

    ds = load_dataset(data, drop_short=drop_short)
    cfg = load_config(model=model, dataset=ds.name, file=config, overrides=overrides)
    cfg["name"] = model
    out = Path(out) if out else default_out(model, ds.name)
    return recipe(cfg).train(cfg, ds, out), out


def eval_model(model_dir: Path, data: str, split: str = "test", drop_short: bool = False,
               overrides: list[str] | None = None, quantize: str = "none") -> dict:
    """Full-ranking metrics of a saved model on one split, written to eval-<dataset>-<split>[-exclude_seen][-int8][-bf16].json
    (and every user's rank to the same name with .ranks.safetensors, for `ttds compare`).
    `quantize="int8"`: a generative model's LM runs with dynamic int8 Linear layers (`ttds.serve.engine.quantize_int8`,
    as `ttds serve --quantize int8` does): faster on the CPU, but its rankings differ, so the file says so."""
    from ttds.config import set_path, parse_override
    from ttds.dist import env_rank
    from ttds.data.dataset import leave_one_out
    from ttds.data.readers import load_dataset
    from ttds.eval.evaluator import evaluate
    from ttds.io import write_json
    from ttds.recipes import load_model, run_config
    from ttds.runtime import machine_info, setup_torch
    from ttds.serve.engine import check_quantize, quantize_int8

    if split not in ("test", "valid"):
        raise TTDSError(f"--split {split!r}: expected test or valid")
    cfg = run_config(model_dir)
    for text in overrides or []:
        set_path(cfg, *parse_override(text))
    device = setup_torch(cfg)
    check_quantize(quantize, device)
    _, model = load_model(model_dir, device)
    ds = load_dataset(data, drop_short=drop_short)
    if ds.n_items != model.n_items:
        raise TTDSError(f"--data {data}: {ds.n_items} items, but the model in {model_dir} was trained on {model.n_items}")
    if hasattr(model, "exclude_seen"):  # a generative model: `--set eval.*` (seen-item rule, precision, beam ...) apply
        from ttds.config import section
        from ttds.train.generative import configure_inference
        from ttds.train.loop import GenEvalConfig, resolve_seen_items
        resolve_seen_items(cfg, ds)
        configure_inference(model, section(cfg, "eval", GenEvalConfig))
    if quantize == "int8":  # after configure_inference: the int8 layers run in fp32
        quantize_int8(model)
    sp = leave_one_out(ds, int(cfg["data"]["max_history"]))
    ev = cfg.get("eval") or {}
    rule = "-exclude_seen" if getattr(model, "exclude_seen", False) else ""
    q = ("" if quantize == "none" else f"-{quantize}") + ("-bf16" if getattr(model, "precision", "fp32") == "bf16" else "")
    stem = Path(model_dir) / f"eval-{ds.name}-{split}{rule}{q}"
    m = evaluate(model, getattr(sp, split), int(ev.get("batch_size", 1024)), tuple(ev.get("ks", (1, 5, 10))),
                 bool(ev.get("mask_seen", False)), device, desc=split, ranks_to=stem.with_suffix(".ranks.safetensors"))
    result = {"model": cfg.get("name"), "dataset": ds.name, "split": split, "mask_seen": bool(ev.get("mask_seen", False)),
              "seen_items": ev.get("seen_items", "keep") if hasattr(model, "exclude_seen") else None,
              "quantize": quantize, "precision": getattr(model, "precision", "fp32"), "metrics": m, "machine": machine_info()}
    if env_rank() == 0:  # under torchrun every rank holds the gathered metrics; one writes them
        write_json(stem.with_suffix(".json"), result)
    return result


def parse_seeds(text: str | None) -> list[int] | None:
    """`--seeds 42,43,44` -> [42, 43, 44]; None when not given."""
    if text is None:
        return None
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise TTDSError(f"--seeds {text!r}: expected comma-separated integers, e.g. 42,43,44") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise TTDSError(f"--seeds {text!r}: expected one or more distinct integers, e.g. 42,43,44")
    return seeds


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        model: str = typer.Option(..., "--model", help="Model config name, e.g. sasrec (see configs/models)."),
        data: str = typer.Option(..., "--data", help="Dataset: an LC-Rec folder, a table folder, or 'builtin'."),
        out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/<model>-<dataset>)."),
        config: Optional[str] = typer.Option(None, "--config", help="Extra YAML config layer."),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="Config override KEY=VALUE (repeatable)."),
        drop_short: bool = typer.Option(False, "--drop-short", help="Drop users with < 3 interactions."),
    ):
        """Train a model (resumes from the run folder if interrupted); prints valid/test metrics."""
        from ttds.dist import env_rank
        from ttds.eval.evaluator import format_metrics

        metrics, out_dir = train_model(model, data, out, config, set_, drop_short)
        if env_rank() == 0:  # under torchrun every rank holds the gathered metrics: print them once
            typer.echo(format_metrics({f"{model} valid": metrics["valid"], f"{model} test": metrics["test"]}))
            typer.echo(f"run folder: {out_dir}")

    @app.command("eval")
    def eval_cmd(
        model_dir: Path = typer.Option(..., "--model-dir", help="A run folder written by `ttds train`."),
        data: str = typer.Option(..., "--data", help="The dataset the model was trained on."),
        split: str = typer.Option("test", "--split", help="test (target seq[-1]) or valid (seq[-2])."),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="Override KEY=VALUE, e.g. eval.batch_size=256."),
        drop_short: bool = typer.Option(False, "--drop-short", help="Drop users with < 3 interactions."),
        quantize: str = QuantOpt,
    ):
        """Evaluate a saved model with full ranking; prints a table and writes eval-<dataset>-<split>.json."""
        from ttds.dist import env_rank
        from ttds.eval.evaluator import format_metrics

        r = eval_model(model_dir, data, split, drop_short, set_, quantize)
        if env_rank() == 0:
            typer.echo(format_metrics({f"{r['model']} {split}": r["metrics"]}))
            if r.get("seen_items") == "exclude":
                typer.echo("(the model's own rule eval.seen_items=exclude: it never recommends a history item)")
            typer.echo(f"{r['metrics']['n']} users, {r['metrics']['eval_seconds']} s")

    @app.command("compare")
    def compare_cmd(
        base: str = typer.Argument(..., help="Run folder or ranks file; several, comma-separated, are paired by position (seeds)."),
        other: str = typer.Argument(..., help="The same for the model compared with base."),
        metric: Optional[list[str]] = typer.Option(None, "--metric", help="HR@k, NDCG@k or MRR (repeatable; default NDCG@10, HR@10, HR@1)."),
        split: str = typer.Option("test", "--split", help="Which ranks-<split>.safetensors of a run folder."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the statistics to this JSON file."),
    ):
        """Paired per-user comparison of two models on the same users: mean difference, 95 % CI, p-value."""
        from ttds.eval.compare import DEFAULT_METRICS, compare, format_compare
        from ttds.io import write_json

        result = compare([p for p in base.split(",") if p], [p for p in other.split(",") if p],
                         tuple(metric or DEFAULT_METRICS), split)
        typer.echo(format_compare(result))
        if json_out:
            write_json(json_out, result)

    @app.command("bench")
    def bench_cmd(
        suite: str = typer.Argument(..., help="Suite name, e.g. classic."),
        data: str = typer.Option(..., "--data", help="Dataset folder or 'builtin'."),
        runs: Path = typer.Option(Path("runs/bench"), "--runs", help="Where run folders go."),
        results: Path = typer.Option(Path("benchmarks/results"), "--results", help="Where result JSON/MD go."),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="Override for every model, KEY=VALUE."),
        only: Optional[list[str]] = typer.Option(None, "--only", help="Run only these suite entries."),
        drop_short: bool = typer.Option(False, "--drop-short", help="Drop users with < 3 interactions."),
        seeds: Optional[str] = typer.Option(None, "--seeds", help="Run every model once per seed, e.g. 42,43,44; "
                                            "the table adds mean ± std over seeds."),
    ):
        """Train + evaluate every model of a suite; writes <results>/<suite>-<dataset>.json and .md."""
        from ttds.bench.harness import run_suite

        md = run_suite(suite, data, runs, results, set_ or [], only or [], drop_short, parse_seeds(seeds))
        typer.echo(md)
