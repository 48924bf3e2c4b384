"""Same command twice: are the runs the same, bit for bit? With `deterministic` true (the default) and false, side by side.

    .venv/bin/python benchmarks/reproducibility.py [--model ttss] [--data builtin:users=600,items=300] [--threads 2] \
        [--steps 30] [--repeats 2] [--set KEY=VALUE ...]

Trains `--model` `--repeats` times per setting, rows round-robin (det, nondet, det, nondet, ...), each a fresh
`ttds train` with the same config and seed, and compares every run with the first of its setting: item/user index
files and every tensor of model.safetensors (exact equality), the test NDCG@10, and the training tokens/s (the cost of
the deterministic algorithms). The built-in data and `make demo`'s generative budgets by default (3 epochs capped at
`--steps` optimizer steps). Writes benchmarks/results/reproducibility-<model>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from ttds.bench.suites import DEMO_GEN  # the generative budgets of `make demo`
from ttds.io import write_json, write_text
from ttds.runtime import machine_info

ROOT = Path(__file__).resolve().parents[1]


def train(model: str, data: str, threads: int, steps: int, deterministic: bool, out: Path, extra: list[str]) -> dict:
    sets = [*DEMO_GEN, f"train.max_steps={steps}", f"train.eval_steps={steps}", f"threads={threads}",
            f"deterministic={str(deterministic).lower()}", *extra]
    cmd = [sys.executable, "-m", "ttds", "train", "--model", model, "--data", data, "--out", str(out)]
    cmd += [a for s in sets for a in ("--set", s)]
    t = time.perf_counter()
    subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}, check=True,
                   capture_output=True, text=True)
    m = json.loads((out / "metrics.json").read_text())
    return {"wall_s": time.perf_counter() - t, "tokens_per_s": m["train_tokens_per_second"], "NDCG@10": m["test"]["NDCG@10"]}


def same_as(run: Path, first: Path) -> dict:
    """Which artefacts of `run` equal those of `first` exactly."""
    out = {}
    for name in ("index.item.json", "index.user.json"):
        if (first / name).is_file():
            out[name] = (run / name).read_bytes() == (first / name).read_bytes()
    a, b = load_file(first / "model.safetensors"), load_file(run / "model.safetensors")
    out["weights"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ttss")
    ap.add_argument("--data", default="builtin:users=600,items=300")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for det in (True, False):
                out = Path(tmp) / f"{'det' if det else 'nondet'}{r}"
                row = {"deterministic": det, "repeat": r, **train(a.model, a.data, a.threads, a.steps, det, out, a.extra)}
                row["same_as_first"] = same_as(out, Path(tmp) / f"{'det' if det else 'nondet'}0")
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for det in (True, False):
        rs = [r for r in rows if r["deterministic"] == det]
        summary[str(det).lower()] = {"all_identical": all(all(r["same_as_first"].values()) for r in rs),
                                     "NDCG@10": [r["NDCG@10"] for r in rs],
                                     "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs)}
    ratio = summary["true"]["median_tokens_per_s"] / summary["false"]["median_tokens_per_s"]
    mi = machine_info()
    result = {"model": a.model, "data": a.data, "threads": a.threads, "steps": a.steps,
              "machine": f"{mi['cpu']}, {mi['cores']} cores", "torch": mi["torch"], "command": " ".join(sys.argv),
              "rows": rows, "summary": summary, "deterministic_speed_ratio": ratio}
    lines = [f"# Reproducibility: {a.model} on {a.data}, {a.threads} threads, {a.steps} steps", "",
             f"Machine: {result['machine']}, torch {mi['torch']}. Command: `python {' '.join(sys.argv)}`", "",
             "| deterministic | runs | all bit-identical (indices, weights) | test NDCG@10 per run | median train tokens/s |",
             "|---|---|---|---|---|"]
    for key, s in summary.items():
        lines.append(f"| {key} | {a.repeats} | {'yes' if s['all_identical'] else '**no**'} | "
                     f"{', '.join(f'{x:.4f}' for x in s['NDCG@10'])} | {s['median_tokens_per_s']:.1f} |")
    lines += ["", f"Training speed, deterministic / not: {ratio:.3f}x (rows round-robin)."]
    stem = ROOT / "benchmarks" / "results" / f"reproducibility-{a.model}"
    write_json(stem.with_suffix(".json"), result)
    write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
