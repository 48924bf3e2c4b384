"""Our SASRec (CE) against the RecBole 1.2.1 anchor and the paper's row.

Usage: .venv/bin/python benchmarks/sasrec_anchor.py RUN_DIR [RUN_DIR ...]
(RUN_DIR = a `ttds train --model sasrec` folder holding metrics.json). Prints one table.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ttds.bench.suites import REFERENCE
from ttds.io import read_json

RECBOLE_SECONDS_PER_EPOCH = 159.2  # RecBole 1.2.1 CPU s per epoch, 1 thread, same settings (benchmarks/results/recbole_anchor-Instruments.md)


def main(dirs: list[str]) -> None:
    # On a shared machine wall time measures the neighbours; with threads=1 the process's CPU time per
    # epoch is what the epoch costs on one idle core, which is compared with RecBole's wall time on 2 cores.
    print("| run | dataset | HR@10 | NDCG@10 | best epoch / epochs | wall s/epoch | CPU s/epoch | CPU s/epoch vs RecBole | threads |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in dirs:
        m = read_json(Path(d) / "metrics.json")
        t = m["test"]
        cpu = m.get("cpu_seconds_per_epoch")
        ratio = cpu / RECBOLE_SECONDS_PER_EPOCH if cpu and m["dataset"] == "Instruments" else None
        print(f"| {Path(d).name} | {m['dataset']} | {t['HR@10']:.4f} | {t['NDCG@10']:.4f} | {m['best_epoch']} / "
              f"{m['epochs']} ({m['stopped']}) | {m['seconds_per_epoch']} | {cpu or '-'} | "
              f"{'%.2fx' % ratio if ratio else '-'} | {m['machine']['threads']} |")
        for name, r in REFERENCE.get(m["dataset"], {}).items():
            print(f"| {name} | {m['dataset']} | {r['HR@10']:.4f} | {r['NDCG@10']:.4f} | | | | | |")


if __name__ == "__main__":
    main(sys.argv[1:])
