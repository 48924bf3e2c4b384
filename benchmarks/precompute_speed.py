"""Pre-compute against `evaluate()` on the same users, one factor at a time (issue target: pre-compute at
>= the evaluation throughput).

    python benchmarks/precompute_speed.py --data ../shared/data/Games --model-dir runs/s10/ttss-Games \\
        --users 1024 --threads 2 --repeats 2
    # every user, once, the two rows the issue compares (evaluate() vs the serving default):
    python benchmarks/precompute_speed.py --data ../shared/data/Games --model-dir runs/s10/ttss-Games \\
        --users 0 --threads 2 --repeats 1 --variants eval,serve

Rows (one trained model, the first N test users, top 10, the model's beam), run round-robin `--repeats`
times and reported as medians, so that a drift of the machine hits every row alike:
  eval       evaluate()                              the test prompts (history = the items before the test item)
  same       precompute, test histories, seen kept   `ttds precompute`'s code path on the SAME prompts: its overhead
  full       precompute, full histories, seen kept   what serving predicts from: every known item (the test item too)
  serve      precompute, full histories, seen excl.  the serving default (seen items searched around in the trie)
`--batch-sizes 256,1024` runs every pre-compute row at each number of users per model call (`ttds precompute
--batch-size`; default 256). Each row gives its users' mean prompt length, so a gap splits into more work (longer prompts) and overhead.
Writes benchmarks/results/precompute_speed-<dataset>.json and .md (or --out).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from eval_speed import time_eval, time_precompute  # same folder

VARIANTS = ("eval", "same", "full", "serve")  # the rows, in the docstring's order


def mean_prompt_tokens(model, users, histories: list[list[int]], max_history: int) -> float:
    from ttds.data.dataset import pad_left

    hist = pad_left([np.asarray(h, dtype=np.int64) for h in histories], max_history)
    return float(np.mean([len(p) for p in model.prompts(torch.as_tensor(users), torch.from_numpy(hist))]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model-dir", required=True, help="a trained generative model (what `ttds train` wrote)")
    ap.add_argument("--users", type=int, default=1024, help="the first N test users; 0 = all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated rows (see above), in run order")
    ap.add_argument("--batch-sizes", default="256", help="comma-separated users per model call of the pre-compute rows "
                    "(`ttds precompute --batch-size`); each pre-compute row runs at each")
    ap.add_argument("--out", default=None, help="default benchmarks/results/precompute_speed-<dataset>.json (+ .md)")
    args = ap.parse_args()
    keys = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not keys or any(v not in VARIANTS for v in keys):
        raise SystemExit(f"--variants {args.variants!r}: expected a comma-separated list of {', '.join(VARIANTS)}")
    sizes = [b.strip() for b in args.batch_sizes.split(",") if b.strip()]
    if not sizes or not all(b.isdigit() and int(b) > 0 for b in sizes):
        raise SystemExit(f"--batch-sizes {args.batch_sizes!r}: expected comma-separated positive integers, e.g. 256,1024")
    sizes = [int(b) for b in sizes]
    torch.set_num_threads(args.threads)

    from ttds.data.dataset import EvalSet, leave_one_out
    from ttds.data.readers import load_dataset
    from ttds.io import write_json, write_text
    from ttds.recipes import load_model
    from ttds.runtime import machine_info

    ds = load_dataset(args.data)
    cfg, model = load_model(args.model_dir, "cpu")
    model.eval()
    mh = int(cfg["data"]["max_history"])
    test = leave_one_out(ds, mh).test
    n = min(args.users, len(test)) if args.users > 0 else len(test)
    users = [int(u) for u in np.asarray(test.users[:n])]
    if users != list(range(n)):  # precompute() takes users 0..n-1
        raise SystemExit(f"{args.data}: the first {n} test users are not users 0..{n - 1}")
    sub = EvalSet(test.users[:n], test.history[:n], test.target[:n])
    test_hists = [[int(i) for i in h if i >= 0] for h in np.asarray(sub.history)]
    full_hists = [[int(i) for i in ds.sequences[u]] for u in users]
    tokens = {"test": mean_prompt_tokens(model, users, test_hists, mh), "full": mean_prompt_tokens(model, users, full_hists, mh)}
    k = args.k
    pre = {  # variant: (row name, histories, time_precompute keyword arguments)
        "same": ("precompute, test histories, seen kept", "test", {"exclude": False, "histories": test_hists}),
        "full": ("precompute, full histories, seen kept", "full", {"exclude": False}),
        "serve": ("precompute, full histories, seen excluded", "full", {"exclude": True}),
    }
    variants = []
    for v in keys:
        if v == "eval":
            variants.append(("evaluate()", "test", lambda: time_eval(model, sub, "evaluate()")))
            continue
        name, hist, kw = pre[v]
        for b in sizes:
            label = name if sizes == [256] else f"{name}, batch {b}"
            variants.append((label, hist, lambda kw=kw, b=b: time_precompute(model, ds, cfg, n, k, batch_size=b, **kw)))
    time_eval(model, EvalSet(sub.users[:64], sub.history[:64], sub.target[:64]), "warm-up")
    runs = {name: [] for name, _, _ in variants}
    for r in range(args.repeats):
        for name, _, fn in variants:
            runs[name].append(fn())
            print(f"repeat {r}: {name}: {runs[name][-1]['users_per_s']:.2f} users/s", flush=True)
    rows = []
    for name, hist, _ in variants:
        got = runs[name]
        rows.append({"variant": name, "histories": hist, "mean_prompt_tokens": tokens[hist], "users": n,
                     "users_per_s": float(np.median([g["users_per_s"] for g in got])),
                     "users_per_cpu_s": float(np.median([g["users_per_cpu_s"] for g in got])),
                     "users_per_s_each": [g["users_per_s"] for g in got], "wall_s_each": [g["wall_s"] for g in got], "load_1m": [g["load_1m"] for g in got]})
    base = rows[0]["users_per_s"]  # the first row is the reference
    for r in rows:
        r["vs_evaluate"] = r["users_per_s"] / base
    res = {"dataset": ds.name, "model": args.model_dir, "users": n, "k": k, "beam": int(model.beam), "threads": args.threads,
           "precision": model.precision,  # eval.precision as resolved on this machine (every row)
           "repeats": args.repeats, "max_history": mh, "machine": machine_info(), "rows": rows}
    walls = ", ".join(f"{r['variant']} {sum(r['wall_s_each']):.0f} s" for r in rows)
    out = Path(args.out or f"benchmarks/results/precompute_speed-{ds.name}.json")
    write_json(out, res)
    lines = [f"# Pre-compute vs evaluate(), {ds.name}: trained model {args.model_dir}", "",
             f"The first {n} test users, top {k}, beam {model.beam}, {args.threads} thread(s), eval.precision {model.precision}; medians of {args.repeats} "
             f"round-robin repeats. Command: `python benchmarks/precompute_speed.py --data {args.data} --model-dir "
             f"{args.model_dir} --users {args.users} --threads {args.threads} --repeats {args.repeats} --variants {args.variants}"
             f"{f' --batch-sizes {args.batch_sizes}' if args.batch_sizes != '256' else ''}"
             f"{f' --out {args.out}' if args.out else ''}`. "
             f"Wall time, summed over the repeats: {walls}.", "",
             f"| variant | mean prompt tokens | users/s (wall) | users per CPU-s | vs {rows[0]['variant']} | each repeat, users/s | load 1m |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['mean_prompt_tokens']:.1f} | {r['users_per_s']:.2f} | {r['users_per_cpu_s']:.2f} | "
              f"{r['vs_evaluate']:.2f} | {', '.join(f'{x:.1f}' for x in r['users_per_s_each'])} | "
              f"{', '.join(f'{x:.1f}' for x in r['load_1m'])} |" for r in rows]
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
