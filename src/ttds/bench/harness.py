"""Run a benchmark suite: train + evaluate every entry in its own process (so peak RSS and
timings are per model), collect each run's metrics.json, write <results>/<suite>-<dataset>.json
and .md after every model (partial results survive an interruption). Re-running resumes: a
finished run returns its stored metrics, an interrupted one continues from its checkpoint.
With seeds, every entry runs once per seed (rows `LABEL@SEED`) and the table ends with the mean ±
sample std over seeds and each model's paired difference to the first.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ttds.bench.suites import REFERENCE, SUITES, Entry
from ttds.errors import TTDSError
from ttds.io import read_json, write_json, write_text
from ttds.runtime import machine_info

log = logging.getLogger(__name__)

COLUMNS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR")
SEED_COLUMNS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")


def dataset_name(data: str, drop_short: bool = False) -> str:
    from ttds.data.readers import load_dataset

    return load_dataset(data, drop_short=drop_short).name


def run_entry(entry: Entry, data: str, run_dir: Path, overrides: list[str], drop_short: bool, label: str = "") -> dict:
    label = label or entry.label
    cmd = [sys.executable, "-m", "ttds", "train", "--model", entry.model, "--data", data, "--out", str(run_dir)]
    for o in list(entry.overrides) + list(overrides):
        cmd += ["--set", o]
    if drop_short:
        cmd.append("--drop-short")
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("bench %s: %s", label, " ".join(cmd))
    t0 = time.perf_counter()
    with open(run_dir / "bench.log", "a", encoding="utf-8") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0 or not (run_dir / "metrics.json").is_file():
        return {"label": label, "model": entry.model, "error": f"exit code {rc}; see {run_dir / 'bench.log'}"}
    m = read_json(run_dir / "metrics.json")
    return {"label": label, "model": entry.model, "overrides": list(entry.overrides) + list(overrides),
            "wall_seconds": round(time.perf_counter() - t0, 1), "run_dir": str(run_dir), **m}


def format_markdown(result: dict) -> str:
    mi = result["machine"]
    lines = [
        f"# {result['suite']} on {result['dataset']}",
        "",
        "Test split (target seq[-1]), leave-one-out, full ranking over all items, seen items NOT masked, "
        "pessimistic ties; model chosen by validation NDCG@10.",
        f"Machine: {mi['cpu']}, {mi['cores']} cores, torch {mi['torch']}, {mi['threads']} threads "
        "(shared with other jobs: wall times are indicative; CPU s/epoch is this process's CPU time).",
        "",
        "| model | " + " | ".join(COLUMNS)
        + " | best epoch | epochs (stop) | train s | s/epoch | CPU s/epoch | test eval s | peak RSS MB |",
        "|---" * (len(COLUMNS) + 8) + "|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | " + " | ".join("-" for _ in COLUMNS) + f" | failed: {r['error']} ||||||")
            continue
        t = r["test"]
        lines.append(
            f"| {r['label']} | " + " | ".join(f"{t[c]:.4f}" for c in COLUMNS)
            + f" | {r.get('best_epoch', '-')} | {r['epochs']} ({r['stopped']}) | {r['train_seconds']:.0f} | "
            f"{r.get('seconds_per_epoch', '-')} | {r.get('cpu_seconds_per_epoch') or '-'} | "
            f"{r.get('eval_seconds', r.get('test_eval_seconds', '-'))} ({r.get('eval_cpu_seconds', '-')} CPU) | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    over = [f"{r['label']}: {' '.join(r['overrides'])}" for r in result["rows"] if r.get("overrides")]
    if over:
        lines += ["", "Config overrides per row (a `(budget)` stop means train.max_minutes ended training before "
                  "early stopping: not converged): " + "; ".join(over) + "."]
    ref = REFERENCE.get(result["dataset"], {})
    if ref:
        lines += ["", "Reference figures (NOT measured by this harness; the paper's numbers are the paper's):", "",
                  "| reference | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for name, r in ref.items():
            lines.append(f"| {name} | " + " | ".join(f"{r[c]:.4f}" if c in r else "-" for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n" + seed_summary(result["rows"]) + paired_summary(result["rows"])


def seed_summary(rows: list[dict]) -> str:
    """Markdown: mean ± sample std over seeds per model (labels MODEL@SEED), and each model's paired difference
    to the first model (same seeds only). Empty when no label carries a seed."""
    import numpy as np

    groups: dict[str, dict[str, dict]] = {}
    for r in rows:
        if "@" in r["label"] and "test" in r:
            model, seed = r["label"].rsplit("@", 1)
            groups.setdefault(model, {})[seed] = r
    if not groups:
        return ""

    def fmt(v):
        v = np.asarray(v, dtype=float)
        return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v.mean():.4f}"

    lines = ["", "Over seeds (mean ± sample std; test, fixed template; valid = best validation NDCG@10):", "",
             "| model | seeds | " + " | ".join(SEED_COLUMNS) + " | valid NDCG@10 |", "|---" * (len(SEED_COLUMNS) + 3) + "|"]
    for model, by_seed in groups.items():
        rs = list(by_seed.values())
        lines.append(f"| {model} | {', '.join(by_seed)} | " + " | ".join(fmt([r["test"][m] for r in rs]) for m in SEED_COLUMNS)
                     + f" | {fmt([r['valid']['NDCG@10'] for r in rs])} |")
    first, *others = list(groups)
    for model in others:
        seeds = [s for s in groups[model] if s in groups[first]]
        if not seeds:
            continue
        lines.append(f"| {model} − {first} (paired) | {', '.join(seeds)} | " + " | ".join(
            fmt([groups[model][s]["test"][m] - groups[first][s]["test"][m] for s in seeds]) for m in SEED_COLUMNS)
            + f" | {fmt([groups[model][s]['valid']['NDCG@10'] - groups[first][s]['valid']['NDCG@10'] for s in seeds])} |")
    return "\n".join(lines) + "\n"


PAIRED_METRICS = ("NDCG@10", "HR@10", "HR@1")


def paired_summary(rows: list[dict]) -> str:
    """Markdown: every model against the first, user by user on the same test users (`ttds.eval.compare`): mean
    difference, 95 % CI and p-value, pooled over the seeds both have. Rows need their run folder's per-user ranks."""
    from ttds.eval.compare import compare

    groups: dict[str, dict[str, dict]] = {}
    for r in rows:
        if "test" in r and r.get("run_dir"):
            model, _, seed = r["label"].partition("@")
            groups.setdefault(model, {})[seed] = r
    if len(groups) < 2:
        return ""
    first, *others = list(groups)
    lines = ["", f"Paired with {first}, user by user (test; diff = model − {first}, 95 % CI, p of a paired t-test; "
             "`ttds compare`):", "", "| model | seeds | " + " | ".join(PAIRED_METRICS) + " |",
             "|---" * (len(PAIRED_METRICS) + 2) + "|"]
    for model in others:
        seeds = [s for s in groups[model] if s in groups[first]]
        if not seeds:
            continue
        try:
            c = compare([groups[first][s]["run_dir"] for s in seeds], [groups[model][s]["run_dir"] for s in seeds],
                        PAIRED_METRICS)
        except TTDSError as e:
            lines.append(f"| {model} | {', '.join(seeds) or '-'} | " + " | ".join("-" for _ in PAIRED_METRICS) + f" ({e}) |")
            continue
        stats = c.get("pooled") or c["pairs"][0]["metrics"]
        lines.append(f"| {model} | {', '.join(seeds) or '-'} | " + " | ".join(
            f"{r['diff']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}] p={r['p']:.2g}" for r in (stats[m] for m in PAIRED_METRICS)) + " |")
    return "\n".join(lines) + "\n"


def run_suite(suite: str, data: str, runs: Path, results: Path, overrides: list[str], only: list[str],
              drop_short: bool = False, seeds: list[int] | None = None) -> str:
    if suite not in SUITES:
        raise TTDSError(f"suite {suite!r}: unknown; known suites: {', '.join(SUITES)}")
    entries = SUITES[suite]
    if only:
        unknown = [o for o in only if o not in {e.label for e in entries} | {e.model for e in entries}]
        if unknown:
            raise TTDSError(f"--only {unknown[0]!r}: not in suite {suite} ({', '.join(e.label for e in entries)})")
        entries = [e for e in entries if e.label in only or e.model in only]
    name = dataset_name(data, drop_short)
    json_path = Path(results) / f"{suite}-{name}.json"
    result = {"suite": suite, "dataset": name, "data": str(data), "machine": machine_info(),
              "protocol": "leave-one-out; full ranking; no masking of seen items; pessimistic ties",
              "rows": []}
    order = [x.label for x in SUITES[suite]]
    md = ""

    def rank(label: str) -> tuple:  # suite order, then seed
        base, _, seed = label.partition("@")
        return (order.index(base) if base in order else 99, int(seed) if seed.isdigit() else -1)

    for seed in seeds or [None]:
        for e in entries:
            label, folder, extra = e.label, Path(runs) / f"{suite}-{name}" / e.label, []
            if seed is not None:
                label, folder, extra = f"{e.label}@{seed}", folder.with_name(f"{e.label}-s{seed}"), [f"seed={seed}"]
            row = run_entry(e, data, folder, overrides + extra, drop_short, label)
            # merge into the rows on disk NOW, under a lock: another `ttds bench` of the same suite and
            # dataset may have added rows while this model trained (reading them only at the start lost them)
            with _locked(json_path):
                rows = {r["label"]: r for r in read_json(json_path).get("rows", [])} if json_path.is_file() else {}
                rows[label] = row
                result["rows"] = sorted(rows.values(), key=lambda r: rank(r["label"]))
                ran = [r["machine"] for r in result["rows"] if "machine" in r]
                result["machine"] = ran[-1] if ran else result["machine"]  # as seen by the training processes
                write_json(json_path, result)
                md = format_markdown(result)
                write_text(json_path.with_suffix(".md"), md)
    return md


@contextmanager
def _locked(path: Path):
    """An exclusive advisory lock (fcntl) on `path`.lock for a read-modify-write of `path`."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
