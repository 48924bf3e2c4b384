"""Where does a dynamic index win or lose? Per-user paired differences, split by how much the IDs moved.

    .venv/bin/python benchmarks/id_change_effect.py --data ../shared/data/Scientific \
        --pair runs/ttss-42:runs/ttds-42 --pair runs/ttss-43:runs/ttds-43 [--metric NDCG@10] [--out FILE_STEM]

Each pair is a static run (BASE: its `index.item.json` is the static index) and a dynamic run (OTHER) that started
from the same static item index (check: the dynamic run's `tokenizer.item/index.json` equals BASE's index, else the
script stops) and ended with its own `index.item.json`. Test users are split by whether the target item's final ID
differs from its static one, and by the share of their history items whose ID differs; for each group the table
gives both runs' mean metric and the paired difference (OTHER - BASE) with a 95 % CI (`ttds.eval.compare.paired`).
Per-user ranks come from `ranks-test.safetensors` or `ttds eval`'s ranks file (see `ttds compare`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def item_codes(path: Path) -> dict[int, tuple]:
    return {int(k): tuple(v) for k, v in json.loads(path.read_text()).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--pair", action="append", required=True, help="BASE_RUN:OTHER_RUN (static:dynamic), repeatable")
    ap.add_argument("--metric", default="NDCG@10")
    ap.add_argument("--out", help="write FILE_STEM.json and FILE_STEM.md")
    a = ap.parse_args()

    from ttds.data.dataset import leave_one_out
    from ttds.data.readers import load_dataset
    from ttds.eval.compare import load_ranks, paired
    from ttds.eval.metrics import per_user
    from ttds.recipes import run_config

    ds = load_dataset(a.data)
    groups: dict[str, list] = {}
    rows = []
    for spec in a.pair:
        base, other = (Path(p) for p in spec.split(":"))
        static, start, final = (item_codes(p) for p in (base / "index.item.json", other / "tokenizer.item" / "index.json",
                                                         other / "index.item.json"))
        if static != start:
            raise SystemExit(f"{other}: its static item index is not {base}'s: the pair did not start from the same IDs")
        test = leave_one_out(ds, int(run_config(base)["data"]["max_history"])).test
        ra, rb = load_ranks(base), load_ranks(other)
        if not (np.array_equal(ra["users"], test.users) and np.array_equal(ra["targets"], test.target)
                and np.array_equal(rb["users"], test.users)):
            raise SystemExit(f"{spec}: the ranks files are not this dataset's test users")
        va, vb = per_user(ra["ranks"], a.metric), per_user(rb["ranks"], a.metric)
        changed = np.array([static[i] != final[i] for i in range(len(static))])
        hist = test.history
        valid = hist >= 0
        share = (changed[np.where(valid, hist, 0)] & valid).sum(1) / np.maximum(valid.sum(1), 1)
        masks = {
            "all test users": np.ones(len(va), bool),
            "target's ID changed": changed[test.target],
            "target's ID kept": ~changed[test.target],
            "history IDs changed < 25 %": share < 0.25,
            "history IDs changed 25-50 %": (share >= 0.25) & (share < 0.5),
            "history IDs changed >= 50 %": share >= 0.5,
        }
        for name, m in masks.items():
            if m.any():
                groups.setdefault(name, []).append((va[m], vb[m]))
                rows.append({"pair": spec, "group": name, "share_of_users": float(m.mean())} | paired(va[m], vb[m]))
        rows.append({"pair": spec, "group": "items whose ID changed", "share_of_users": float(changed.mean())})
    pooled = [{"pair": "pooled", "group": g, "share_of_users": None}
              | paired(np.concatenate([x for x, _ in v]), np.concatenate([y for _, y in v])) for g, v in groups.items()]

    head = f"| pair | group | users | share | static {a.metric} | dynamic {a.metric} | diff | 95 % CI |"
    lines = [head, "|" + "---|" * 8]
    for r in rows + pooled:
        if "diff" not in r:
            lines.append(f"| {r['pair']} | {r['group']} | | {r['share_of_users']:.3f} | | | | |")
            continue
        share = "" if r["share_of_users"] is None else f"{r['share_of_users']:.3f}"
        lines.append(f"| {r['pair']} | {r['group']} | {r['n']} | {share} | {r['a']:.4f} | {r['b']:.4f} | {r['diff']:+.4f} "
                     f"| [{r['lo']:+.4f}, {r['hi']:+.4f}] |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        from ttds.io import write_json, write_text

        write_json(f"{a.out}.json", {"data": a.data, "metric": a.metric, "pairs": a.pair, "rows": rows, "pooled": pooled})
        write_text(f"{a.out}.md", f"# Dynamic vs static index, split by ID change ({ds.name}, test, {a.metric})\n\n"
                   f"Command: `python benchmarks/id_change_effect.py --data {a.data} "
                   + " ".join(f"--pair {p}" for p in a.pair) + f" --metric {a.metric}`\n\n{text}\n")


if __name__ == "__main__":
    main()
