"""Online requests with and without the model's inference region (bf16 weight casts kept across calls).

    python benchmarks/weight_casts.py --model-dir runs/s22/ttds9k-Games --data ../shared/data/Games \\
        --requests 60 --batch-sizes 1,16 --threads 1

With `eval.precision` bf16, `recommend` runs under `torch.autocast`, which casts every fp32 weight to bf16 once per
outermost autocast region. Before session 23 each online request was its own region (all the body's weights cast
per request); the serving worker now holds `GenerativeRecommender.inference()` for its lifetime. Rows, side by side,
alternating call by call on the same users' full histories (what the online path serves), each row on its own thread
(autocast state is per thread):
  per call   each `recommend_histories` call is its own region (the old worker)
  region     all calls inside one `inference()` region (the worker since session 23)
Prints a table of p50 / p90 ms per call, the ratio of medians, and whether both return the same lists.
Writes benchmarks/results/weight_casts-<dataset>.json and .md (or --out).
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True, help="a trained generative model (what `ttds train` wrote)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--requests", type=int, default=60, help="calls per row and batch size")
    ap.add_argument("--batch-sizes", default="1,16", help="comma-separated histories per call (1 = one online request)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default benchmarks/results/weight_casts-<dataset>.json (+ .md)")
    args = ap.parse_args()
    sizes = [b.strip() for b in args.batch_sizes.split(",") if b.strip()]
    if not sizes or not all(b.isdigit() and int(b) > 0 for b in sizes):
        raise SystemExit(f"--batch-sizes {args.batch_sizes!r}: expected comma-separated positive integers, e.g. 1,16")
    if args.requests < 1:
        raise SystemExit(f"--requests {args.requests}: expected a positive number of calls")

    from ttds.io import write_json
    from ttds.runtime import machine_info
    from ttds.serve.engine import load_engine

    engine = load_engine(args.model_dir, args.data, threads=args.threads, new_items=False)
    model = engine.model
    if getattr(model, "precision", None) != "bf16":
        raise SystemExit(f"{args.model_dir}: eval.precision resolves to {getattr(model, 'precision', None)!r} here; "
                         "the region only matters for bf16 (a CPU with bf16 units or --set eval.precision=bf16)")
    rng = np.random.default_rng(args.seed)
    # autocast state is per thread: one thread holds the region for good (as the serving worker), one calls plainly
    held, plain = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    region = model.inference()
    held.submit(region.__enter__).result()
    rows, same = [], True
    try:
        for b in (int(s) for s in sizes):
            users = rng.choice(engine.n_users, size=(args.requests, b), replace=args.requests * b > engine.n_users)
            times = {"per call": [], "region": []}
            for r in range(args.requests):
                ids = [int(u) for u in users[r]]
                hist = [engine.user_history(u) for u in ids]
                got = {}
                for name in ("per call", "region") if r % 2 == 0 else ("region", "per call"):
                    t0 = time.perf_counter()
                    got[name] = (plain if name == "per call" else held).submit(
                        engine.recommend_histories, hist, args.k, None, ids).result()
                    times[name].append(1000 * (time.perf_counter() - t0))
                same &= [[i for i, _ in x] for x in got["per call"]] == [[i for i, _ in x] for x in got["region"]]
            p = {n: (float(np.median(t)), float(np.percentile(t, 90))) for n, t in times.items()}
            rows.append({"batch": b, "calls": args.requests, "per_call_p50_ms": p["per call"][0],
                         "per_call_p90_ms": p["per call"][1], "region_p50_ms": p["region"][0],
                         "region_p90_ms": p["region"][1], "speedup_p50": p["per call"][0] / p["region"][0]})
    finally:
        held.submit(region.__exit__, None, None, None).result()
    out = Path(args.out) if args.out else Path("benchmarks/results") / f"weight_casts-{Path(args.data).name}.json"
    info = {"model_dir": args.model_dir, "data": args.data, "threads": args.threads, "k": args.k,
            "machine": machine_info(), "same_lists": same, "rows": rows}
    lines = [f"# Inference region: bf16 weight casts per call vs once ({Path(args.data).name})", "",
             f"Model {args.model_dir}, {args.threads} thread(s), k={args.k}, full histories of random users, rows alternating "
             f"call by call. Same lists in both rows: {same}.", "",
             "| histories per call | calls | per call p50 / p90 ms | region p50 / p90 ms | speed-up (p50) |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['calls']} | {r['per_call_p50_ms']:.1f} / {r['per_call_p90_ms']:.1f} | "
              f"{r['region_p50_ms']:.1f} / {r['region_p90_ms']:.1f} | {r['speedup_p50']:.2f}x |" for r in rows]
    write_json(out, info)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
