"""What `ttds serve --quantize int8` costs and buys: quality and batch-1 latency, fp32 vs int8, same users.

    nice -n 5 python benchmarks/serve_int8.py --model runs/ttss-Scientific --data ../shared/data/Scientific \
        --users 500 --latency 40 --out benchmarks/results/serve_int8-Scientific.json

Both engines are loaded in this process (one torch thread). Quality: HR@10 / NDCG@10 on a fixed sample of
validation users (the evaluator, as `ttds eval --split valid`), and how much of each user's top-10 the
int8 model keeps. Latency: batch-1 `recommend_histories` (k=10, seen items excluded, as the API), the two
models alternating request by request so that both see the same machine load; the 1-minute load
average is recorded.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--users", type=int, default=500, help="validation users for HR/NDCG")
    ap.add_argument("--latency", type=int, default=40, help="batch-1 requests per model")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from ttds.data.dataset import EvalSet, leave_one_out
    from ttds.eval.evaluator import evaluate
    from ttds.runtime import machine_info
    from ttds.serve.engine import load_engine

    engines = {q: load_engine(args.model, args.data, threads=1, new_items=False, quantize=q) for q in ("none", "int8")}
    ds = engines["none"].ds
    valid = leave_one_out(ds, engines["none"].max_history).valid
    pick = np.random.default_rng(0).choice(len(valid), min(args.users, len(valid)), replace=False)
    sample = EvalSet(valid.users[pick], valid.history[pick], valid.target[pick])
    rows, tops = {}, {}
    for q, eng in engines.items():
        t = time.perf_counter()
        m = evaluate(eng.model, sample, batch_size=64, ks=(1, 5, 10), progress=False)
        rows[q] = {"HR@10": m["HR@10"], "NDCG@10": m["NDCG@10"], "eval_seconds": time.perf_counter() - t}
        with torch.no_grad():
            tops[q] = eng.model.recommend(torch.as_tensor(sample.users), torch.as_tensor(sample.history), 10).tolist()
    overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(tops["none"], tops["int8"])]))
    top1 = float(np.mean([a[0] == b[0] for a, b in zip(tops["none"], tops["int8"])]))
    rng = np.random.default_rng(1)
    hists = [engines["none"].user_history(int(u))[-20:] for u in rng.choice(ds.n_users, args.latency)]
    lat = {q: [] for q in engines}
    load_before = os.getloadavg()[0]
    for h in hists[:2]:
        for eng in engines.values():
            eng.recommend_histories([h], 10)
    for h in hists:
        for q, eng in engines.items():
            t = time.perf_counter()
            eng.recommend_histories([h], 10)
            lat[q].append(time.perf_counter() - t)
    load_after = os.getloadavg()[0]
    for q in engines:
        rows[q] |= {"p50_ms": float(np.percentile(lat[q], 50) * 1e3), "p90_ms": float(np.percentile(lat[q], 90) * 1e3)}
    print(f"\n{args.model} on {args.data}: {len(sample)} validation users, {args.latency} batch-1 requests per model, "
          f"load average {load_before:.2f} -> {load_after:.2f}")
    print("\n| weights | HR@10 | NDCG@10 | batch-1 p50 ms | p90 ms |")
    print("|---|---|---|---|---|")
    for q, r in rows.items():
        print(f"| {'fp32' if q == 'none' else 'int8'} | {r['HR@10']:.4f} | {r['NDCG@10']:.4f} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} |")
    print(f"\nint8 keeps {100 * overlap:.1f} % of the fp32 top-10 and its top-1 for {100 * top1:.1f} % of the users")
    if args.out:
        from ttds.io import write_json

        write_json(args.out, {"model": args.model, "data": args.data, "users": len(sample), "rows": rows,
                              "top10_overlap": overlap, "top1_same": top1, "load_before": load_before,
                              "load_after": load_after, "machine": machine_info()})


if __name__ == "__main__":
    main()
