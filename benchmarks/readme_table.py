"""One side-by-side table (Instruments | Games) from benchmarks/results/classic-*.json, with the
paper's rows we have marked as the paper's. Usage: .venv/bin/python benchmarks/readme_table.py [SUITE]"""
from __future__ import annotations

import sys
from pathlib import Path

from ttds.bench.suites import REFERENCE
from ttds.io import read_json

RESULTS = Path(__file__).parent / "results"
DATASETS = ("Instruments", "Games")
COLS = ("HR@5", "HR@10", "NDCG@5", "NDCG@10")


def main(suite: str = "classic") -> None:
    data = {d: read_json(RESULTS / f"{suite}-{d}.json") for d in DATASETS if (RESULTS / f"{suite}-{d}.json").is_file()}
    head = " | ".join(f"{d} {c}" for d in data for c in COLS)
    print(f"| model | {head} |")
    print("|---" * (1 + len(COLS) * len(data)) + "|")
    labels = list(dict.fromkeys(r["label"] for res in data.values() for r in res["rows"]))
    for label in labels:
        cells = []
        for d, res in data.items():
            row = next((r for r in res["rows"] if r["label"] == label and "test" in r), None)
            cells += [f"{row['test'][c]:.4f}" if row else "-" for c in COLS]
        print(f"| {label} (ours) | " + " | ".join(cells) + " |")
    refs = list(dict.fromkeys(n for d in data for n in REFERENCE.get(d, {})))
    for name in refs:
        cells = []
        for d in data:
            r = REFERENCE.get(d, {}).get(name, {})
            cells += [f"{r[c]:.4f}" if c in r else "-" for c in COLS]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
