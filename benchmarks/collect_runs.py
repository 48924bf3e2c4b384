"""One suite table from run folders trained by hand (`ttds train ...`), in the format of `ttds bench`.

    .venv/bin/python benchmarks/collect_runs.py SUITE OUT_STEM LABEL=RUN_DIR [LABEL=RUN_DIR ...] \
        [--note TEXT]

Labels of the form `MODEL@SEED` (e.g. `TTDS@43`) are also summarised per model over seeds, as `ttds bench
--seeds` does (`ttds.bench.harness.seed_summary`): mean ± sample standard deviation of each test metric, the
best validation NDCG@10, and, for every other model, the per-seed difference to the first (same seeds only).

Writes OUT_STEM.json and OUT_STEM.md (e.g. benchmarks/results/ablations-Scientific-s2). Use it when
runs were launched one by one (different budgets, resumed, extended) rather than by `ttds bench`:
each row keeps its run's resolved config (the settings that differ from the model's current config
are listed) and metrics.json as written by the run; `--note` records the exact commands.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from ttds.bench.harness import format_markdown
from ttds.io import read_json, write_json, write_text


def row(label: str, run: Path) -> dict:
    if not (run / "metrics.json").is_file():
        return {"label": label, "model": run.name, "error": f"{run}/metrics.json missing (run not finished)"}
    m = read_json(run / "metrics.json")
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    return {"label": label, "model": cfg.get("name") or run.name, "overrides": overrides(cfg), "run_dir": str(run), **m}


def overrides(cfg: dict) -> list[str]:
    """KEY=VALUE of the run's resolved config that differ from its model's config as it is now (defaults < model);
    a key the run has and the current config lacks is listed too. `name` and `data` are not settings."""
    from ttds.config import flatten, load_config
    from ttds.errors import TTDSError

    try:
        base = flatten(load_config(model=cfg.get("name")))
    except TTDSError:
        base = {}
    return [f"{k}={v}" for k, v in flatten(cfg).items()
            if k != "name" and not k.startswith("data.") and (k not in base or base[k] != v)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite")
    ap.add_argument("out", type=Path)
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    rows = [row(*(s.split("=", 1)[0], Path(s.split("=", 1)[1]))) for s in a.runs]
    done = [r for r in rows if "machine" in r]
    if not done:
        raise SystemExit("no finished run among " + ", ".join(a.runs))
    result = {"suite": a.suite, "dataset": done[0]["dataset"], "machine": done[-1]["machine"], "rows": rows, "note": a.note,
              "protocol": "leave-one-out; full ranking; no masking of seen items; pessimistic ties"}
    md = format_markdown(result) + (f"\n{a.note}\n" if a.note else "")
    write_json(a.out.with_suffix(".json"), result)
    write_text(a.out.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    main()
