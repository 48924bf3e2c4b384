"""1 process vs 2 torchrun processes (DDP, gloo) on the built-in data: training and sharded evaluation speed.

    .venv/bin/python benchmarks/distributed_speed.py [--data builtin] [--model sasrec] [--epochs 2] [--repeats 2]
    # TTDS (recipe dynamic: DDP over backbone + tokenizers, DM-VAE, re-assignment each epoch), small data, MiniLM:
    .venv/bin/python benchmarks/distributed_speed.py --model ttds --data builtin:users=200,items=150 --epochs 1 \
        --repeats 1 --set train.valid_users=100 --set eval.beam=10 --set eval.template_mean_users=-1 \
        --set eval.final_valid=false --set index.options.codebook_size=32 --set index.options.rqvae.epochs=30 \
        --set dynamic.warmup_steps=2      # (joint steps, not the frozen-backbone warm-up, make the epoch)

Runs `ttds train` three ways with the same global batch and config:
  1 process x 2 threads, 1 process x 1 thread, torchrun 2 processes x 1 thread each (threads=2 split by ttds.dist)
and reports seconds per epoch (wall and CPU), the test evaluation time (sharded over the ranks) and the
speed ratio against the 1-process runs; medians over repeats. Writes benchmarks/results/distributed_speed.{json,md}
(distributed_speed-<model>.{json,md} for another model than sasrec). "s / epoch" is the time of the epoch's training
steps (the LM recipes exclude validation and code re-assignment from it, as the classic recipe excludes validation).

Caveat: this machine has 2 cores shared with other jobs. Two processes cannot beat one process that already uses
both cores with intra-op threads, except where one process leaves a core idle (small kernels, Python overhead);
the numbers show the cost of gradient all-reduce over gloo more than any scaling. On N GPUs (nccl) the same
command scales with the number of devices.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(kind: str, data: str, model: str, epochs: int, out: Path, extra: list[str]) -> dict:
    sets = [f"train.epochs={epochs}", "train.patience=100", "eval.batch_size=256", *extra]
    if kind == "1p x 2t":
        cmd, threads = [sys.executable, "-m", "ttds"], 2
    elif kind == "1p x 1t":
        cmd, threads = [sys.executable, "-m", "ttds"], 1
    else:
        cmd, threads = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m", "ttds"], 2
    sets.append(f"threads={threads}")
    cmd += ["train", "--model", model, "--data", data, "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    st = json.loads((out / "state.json").read_text())
    m = json.loads((out / "metrics.json").read_text())
    return {"epoch_s": statistics.median(st["epoch_seconds"]), "epoch_cpu_s": statistics.median(st["epoch_cpu_seconds"]),
            "test_eval_s": m["eval_seconds"], "wall_s": wall, "steps": st["step"], "NDCG@10": m["test"]["NDCG@10"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--model", default="sasrec")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--set", action="append", default=[], help="config override for every run, KEY=VALUE")
    a = ap.parse_args()
    kinds = ["1p x 2t", "1p x 1t", "2p x 1t (torchrun, gloo)"]
    rows: dict[str, list[dict]] = {k: [] for k in kinds}
    tmp = Path(tempfile.mkdtemp(prefix="ttds-dist-bench-"))
    load = []
    try:
        for r in range(a.repeats):  # interleaved so that the neighbours' load hits every kind alike
            for k in kinds:
                out = tmp / f"{r}-{k.split()[0]}"
                load.append(os.getloadavg()[0])
                rows[k].append(run(k, a.data, a.model, a.epochs, out, a.set))
                print(f"repeat {r + 1} {k}: {rows[k][-1]}", file=sys.stderr)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: {f: statistics.median(x[f] for x in v) for f in v[0]} for k, v in rows.items()}
    base2, base1 = med[kinds[0]]["epoch_s"], med[kinds[1]]["epoch_s"]
    lines = [f"# 1 vs 2 processes: `ttds train --model {a.model} --data {a.data}` ({a.epochs} epochs, medians of {a.repeats})", "",
             *([f"Overrides: `{' '.join(a.set)}`", ""] if a.set else []),
             f"Machine: {os.cpu_count()} cores, shared (1-min load average during the runs: {min(load):.1f}-{max(load):.1f}). "
             "Same global batch and config in every row; the 2-process run uses 1 thread per process.", "",
             "| run | s / epoch (wall) | CPU s / epoch, per process | CPU s / epoch, all processes | test eval s (wall) | "
             "total wall s | epoch speed vs 1p x 2t | vs 1p x 1t | test NDCG@10 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k in kinds:
        m = med[k]
        procs = 2 if k.startswith("2p") else 1
        lines.append(f"| {k} | {m['epoch_s']:.2f} | {m['epoch_cpu_s']:.2f} | {procs * m['epoch_cpu_s']:.2f} | {m['test_eval_s']:.2f} | {m['wall_s']:.1f} | "
                     f"{base2 / m['epoch_s']:.2f}x | {base1 / m['epoch_s']:.2f}x | {m['NDCG@10']:.4f} |")
    lines += ["", "Speed ratio > 1 means faster than that 1-process row. With 2 cores, 2 processes x 1 thread compete with "
              "1 process x 2 threads for the same cores, and DDP adds a gloo all-reduce of every gradient per step; "
              "the machine was shared with other jobs, so wall times are noisy (CPU seconds are steadier: the CPU time of "
              "rank 0's epoch, x2 for both ranks, is the work actually done; intra-op threads spin-waiting on a loaded "
              "machine inflate the 2-thread row's CPU time)."]
    md = "\n".join(lines) + "\n"
    print(md)
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "src"))
    from ttds.io import write_json, write_text

    name = "distributed_speed" + ("" if a.model == "sasrec" else f"-{a.model}")
    write_json(res / f"{name}.json", {"data": a.data, "model": a.model, "epochs": a.epochs, "repeats": a.repeats, "overrides": a.set,
                                      "load_average": [min(load), max(load)], "runs": rows, "median": med})
    write_text(res / f"{name}.md", md)


if __name__ == "__main__":
    main()
