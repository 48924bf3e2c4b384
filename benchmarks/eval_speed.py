"""Evaluation speed of the generative recommender: `evaluate()` (trie-constrained beam search, the
metrics pipeline) over N test users of a dataset, users/s, and the full test set's time
EXTRAPOLATED from it (not measured).

Beam-search cost depends on shapes only (prompt lengths, beam, ID levels, model size), not on the
weights: the default model is an UNTRAINED `ttss` model (MiniLM backbone) on the dataset's item
index (e.g. the Games RQ-VAE index) with a random user index; its metrics are meaningless and are not
reported. `--model-dir` times a trained model instead.

Variants, side by side in one run (same model, same users):
  engine            the current engine (`ttds.models.beam`), at each `--beam-batch` size
  no-shared-prefix  the same without running the prompts' common prefix once (`shared_prefix` off)
  no-prune          the same without skipping hopeless beams at the last level (`prune_last=False`)
  baseline          `--baseline FILE`: another version of beam.py (e.g. `git show HEAD~1:src/ttds/models/beam.py`)
  short IDs         `--short-ids`: the same model and codes with every ID carrying the disambiguation token
                    (`index.options.disambiguate: all`) and with the paper's short IDs (`colliding`: only
                    colliding IDs carry it), rows alternating, twice each
  precompute        `--precompute K`: `ttds precompute`'s code path (`ttds.serve.precompute.precompute`: serving
                    engine, seen items excluded, a fresh SQLite store) over the first N users, k = K
  bf16              `--bf16 R`: the same weights with `eval.precision: bf16` (autocast) against fp32, rows
                    alternating, R repeats each
`--profile`: also where the engine's CPU time goes (`torch.profiler`, one `evaluate()` of up to 256 of the
users, the operators with the most self CPU time).

    python benchmarks/eval_speed.py --data /work/shared/data/Games --item-index runs/index-Games-item-rqvae/index.json \\
        --users 1000 --threads 1 --beam-batch 32 --no-prefix --baseline /tmp/beam_old.py
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def untrained_model(data_spec: str, ds, item_index: str, seed: int = 0):
    from ttds.config import load_config
    from ttds.index.base import SemanticIndex
    from ttds.train.generative import _backbone, build_model, tower_index

    cfg = load_config(model="ttss", dataset=ds.name)
    torch.manual_seed(seed)
    items = SemanticIndex.load(item_index, "item")
    if items.n != ds.n_items:
        raise SystemExit(f"{item_index}: {items.n} items, {data_spec} has {ds.n_items}")
    with tempfile.TemporaryDirectory() as tmp:
        users = tower_index(cfg, ds, None, "user", "random", Path(tmp))
    return cfg, build_model(cfg, _backbone(cfg, "cpu"), items, users).eval()


def time_eval(model, evalset, label: str) -> dict:
    from ttds.eval.evaluator import evaluate

    m = evaluate(model, evalset, batch_size=1024, progress=False)
    return {"variant": label, "users": m["n"], "wall_s": m["eval_seconds"], "cpu_s": m["eval_cpu_seconds"],
            "users_per_s": m["n"] / m["eval_seconds"], "users_per_cpu_s": m["n"] / max(m["eval_cpu_seconds"], 1e-9),
            "load_1m": os.getloadavg()[0]}


def redisambiguate(index, only_colliding: bool):
    """The same index with its disambiguation level re-made from the base codes (every ID with the token, or only
    colliding IDs); an index without that level is returned as it is."""
    from ttds.index.base import DISAMBIG_PREFIX, SemanticIndex
    from ttds.index.collisions import disambiguate

    if index is None or index.prefixes[-1] not in DISAMBIG_PREFIX.values():
        return index
    return SemanticIndex(disambiguate(index.codes[:, :-1], only_colliding), index.level_sizes, index.prefixes, index.tower)


def time_precompute(model, ds, cfg, n: int, k: int, exclude: bool = True, histories: list | None = None,
                    batch_size: int = 256) -> dict:
    """`precompute()` of the first `n` users' top-k into a temporary SQLite store, as `ttds precompute` runs it
    (each user's full history; `exclude`: seen items searched around, the serving default). `histories`: per user
    0..n-1, the history to use instead (e.g. the test histories, to give `evaluate()`'s prompts). `batch_size`: users
    per model call (`ttds precompute --batch-size`)."""
    from ttds.serve.engine import RecommenderEngine
    from ttds.serve.precompute import precompute
    from ttds.serve.store import open_store

    class Engine(RecommenderEngine):
        def user_history(self, user: int) -> list[int]:
            return super().user_history(user) if histories is None else list(histories[user])

    engine = Engine(model, ds, "speed", int(cfg["data"]["max_history"]), exclude_history=exclude)
    engine.n_users = n  # the first n users only
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:///{tmp}/speed.db")
        t, c = time.perf_counter(), time.process_time()
        r = precompute(engine, store, k=k, batch_size=batch_size, progress=False)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        store.close()
    return {"variant": f"precompute k={k} (seen {'excluded' if exclude else 'kept'}, SQLite)", "users": r["users"], "wall_s": wall, "cpu_s": cpu,
            "users_per_s": r["users"] / wall, "users_per_cpu_s": r["users"] / max(cpu, 1e-9), "load_1m": os.getloadavg()[0]}


def fp32_copy(model):
    """The model with `precision` fp32 (the reference of the int8 and bf16 rows); it shares the parameters."""
    import copy

    f = copy.copy(model)
    f.precision = "fp32"
    return f


def agreement(model, other, sub) -> dict:
    """How much `other` (the same trained model in another precision) changes the lists and metrics on `sub`."""
    from ttds.eval.evaluator import evaluate

    a, b = model.recommend(sub.users, sub.history, 10), other.recommend(sub.users, sub.history, 10)
    return {"top10_overlap": float(np.mean([len(set(x.tolist()) & set(y.tolist())) / 10 for x, y in zip(a, b)])),
            "top1_same": float((a[:, 0] == b[:, 0]).float().mean()),
            "ndcg10": [evaluate(m, sub, progress=False)["NDCG@10"] for m in (model, other)]}


def profile_ops(model, evalset, top: int = 8) -> list[dict]:
    """The `top` operators by self CPU time in one `evaluate()` of `evalset`: name, share of the total, calls."""
    from torch.profiler import ProfilerActivity, profile

    from ttds.eval.evaluator import evaluate

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        evaluate(model, evalset, batch_size=1024, progress=False)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops) or 1
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in ops[:top]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--item-index", help="item index JSON (untrained model); the dataset's index when omitted")
    ap.add_argument("--model-dir", help="a trained generative run folder instead of an untrained model")
    ap.add_argument("--users", type=int, default=1000, help="test users timed (the first N of the test split)")
    ap.add_argument("--beam", type=int, default=20)
    ap.add_argument("--beam-batch", default="32", help="users per beam-search micro-batch; comma list = sweep")
    ap.add_argument("--no-prefix", action="store_true", help="also time without the shared-prefix cache")
    ap.add_argument("--no-prune", action="store_true", help="also time without last-level beam pruning")
    ap.add_argument("--baseline", help="also time this file's beam_search_prompts (an older beam.py)")
    ap.add_argument("--precompute", type=int, action="append", default=[], metavar="K",
                    help="also time `ttds precompute` of the first N users at k=K (repeatable)")
    ap.add_argument("--short-ids", action="store_true", help="also time every ID with the disambiguation token vs the "
                    "paper's short IDs (only colliding IDs with it), same model and codes, rows alternating")
    ap.add_argument("--int8", action="store_true", help="also time the model with dynamic int8 Linear layers (--quantize int8)")
    ap.add_argument("--bf16", type=int, default=0, metavar="R", help="also time eval.precision=bf16 against fp32, R "
                    "alternating repeats each (and, with --model-dir, how much bf16 changes the top-10 lists)")
    ap.add_argument("--profile", action="store_true", help="also list the operators that take the engine's CPU time")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target-minutes", type=float, default=15.0)
    ap.add_argument("--out", default=None, help="default benchmarks/results/eval_speed-<dataset>.json (+ .md)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ttds.data.dataset import EvalSet, leave_one_out
    from ttds.data.readers import load_dataset
    from ttds.io import write_json, write_text
    from ttds.models import beam
    from ttds.runtime import machine_info

    ds = load_dataset(args.data)
    if args.model_dir:
        from ttds.recipes import load_model

        cfg, model = load_model(args.model_dir, "cpu")
        what = f"trained model {args.model_dir}"
    else:
        index = args.item_index or str(Path(args.data) / f"{ds.name}.index.json")
        cfg, model = untrained_model(args.data, ds, index)
        what = f"UNTRAINED ttss/minilm model, item index {index}, random user index (speed only)"
    model.beam = args.beam
    test = leave_one_out(ds, int(cfg["data"]["max_history"])).test
    n = min(args.users, len(test))
    sub = EvalSet(test.users[:n], test.history[:n], test.target[:n])
    prompts = model.prompts(sub.users, sub.history)
    info = {"dataset": ds.name, "model": what, "levels": list(model.item_index.level_sizes), "beam": args.beam,
            "threads": args.threads, "timed_users": n, "full_test_users": len(test),
            "mean_prompt_tokens": float(np.mean([len(p) for p in prompts])),
            "shared_prefix_tokens": beam.common_prefix_length(prompts), "machine": machine_info(),
            "precision": model.precision}  # of the rows not named by precision (eval.precision, resolved here)

    # compute bound: forward FLOPs per user (own prompt tokens + one token per beam per later level) vs a
    # dense matmul peak measured now on the same threads
    from ttds.train.engine import train_flops_per_token

    S = info["shared_prefix_tokens"]
    tokens = info["mean_prompt_tokens"] - S + args.beam * (model.trie.n_levels - 1)
    info["forward_tokens_per_user"] = tokens
    info["forward_flops_per_user"] = tokens * train_flops_per_token(model, int(info["mean_prompt_tokens"]) + 40) / 3
    from ttds.train.engine import dense_peak_flops

    # FLOP per CPU-second of this process (other load on a shared machine does not count), as the engine's figure
    info["dense_peak_flops_per_cpu_s"] = dense_peak_flops(repeats=20, clock=time.process_time)
    info["users_per_cpu_s_bound_at_peak"] = info["dense_peak_flops_per_cpu_s"] / info["forward_flops_per_user"]

    engine = beam.beam_search_prompts
    rows = []
    model.beam_batch = int(args.beam_batch.split(",")[0])
    time_eval(model, EvalSet(sub.users[:64], sub.history[:64], sub.target[:64]), "warm-up")
    for bb in [int(b) for b in args.beam_batch.split(",")]:
        model.beam_batch = bb
        rows.append({**time_eval(model, sub, f"engine, beam_batch {bb}"), "beam_batch": bb})
    model.beam_batch = int(args.beam_batch.split(",")[0])
    if args.no_prefix:
        keep = beam.shared_prefix
        beam.shared_prefix = lambda *a, **k: None
        try:
            rows.append({**time_eval(model, sub, f"no shared prefix, beam_batch {model.beam_batch}"), "beam_batch": model.beam_batch})
        finally:
            beam.shared_prefix = keep
    if args.no_prune:
        keep = beam.beam_search
        beam.beam_search = functools.partial(keep, prune_last=False)  # beam_search_prompts looks it up per call
        try:
            rows.append({**time_eval(model, sub, f"no last-level pruning, beam_batch {model.beam_batch}"), "beam_batch": model.beam_batch})
        finally:
            beam.beam_search = keep
    if args.baseline:
        spec = importlib.util.spec_from_file_location("beam_baseline", args.baseline)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        beam.beam_search_prompts = old.beam_search_prompts  # recommend() imports it at call time
        try:
            rows.append({**time_eval(model, sub, f"baseline {Path(args.baseline).name}, beam_batch {model.beam_batch}"),
                         "beam_batch": model.beam_batch})
        finally:
            beam.beam_search_prompts = engine
    if args.short_ids:  # the same weights and base codes; only the disambiguation rule differs
        keep = (model.item_index, model.user_index)
        forms = {m: (redisambiguate(keep[0], m == "colliding"), redisambiguate(keep[1], m == "colliding"))
                 for m in ("all", "colliding")}
        for _ in range(2):
            for m, (items, users) in forms.items():
                model.set_index(items, users)
                tokens = float(np.mean([len(p) for p in model.prompts(sub.users, sub.history)]))
                rows.append({**time_eval(model, sub, f"IDs: disambiguation token on {m} IDs ({tokens:.1f} prompt tokens), "
                                                     f"beam_batch {model.beam_batch}"),
                             "beam_batch": model.beam_batch, "mean_prompt_tokens": tokens,
                             "short_item_ids": float((items.codes[:, -1] < 0).mean())})
        model.set_index(*keep)
    if args.int8:  # the same model with `--quantize int8` (dynamic int8 Linear layers of the LM body)
        import copy

        from ttds.serve.engine import quantize_int8

        q = copy.deepcopy(model)
        quantize_int8(q)
        rows.append({**time_eval(q, sub, f"int8 (dynamic), beam_batch {model.beam_batch}"), "beam_batch": model.beam_batch})
        if args.model_dir:  # a trained model: how much int8 changes its lists and metrics on these users
            info["int8"] = agreement(fp32_copy(model), q, sub)
    if args.bf16:  # the same weights with `eval.precision: bf16` (autocast in recommend)
        f, b = fp32_copy(model), fp32_copy(model)
        b.precision = "bf16"
        for r in range(args.bf16):  # rows alternate, so load changes hit both alike
            rows.append({**time_eval(f, sub, f"fp32 (repeat {r + 1}), beam_batch {model.beam_batch}"), "beam_batch": model.beam_batch})
            rows.append({**time_eval(b, sub, f"bf16 autocast (repeat {r + 1}), beam_batch {model.beam_batch}"), "beam_batch": model.beam_batch})
        info["dense_peak_flops_per_cpu_s_bf16"] = dense_peak_flops(repeats=20, clock=time.process_time, dtype=torch.bfloat16)
        if args.model_dir:
            info["bf16"] = agreement(f, b, sub)
    for k in args.precompute:
        rows.append({**time_precompute(model, ds, cfg, n, k), "beam_batch": model.beam_batch})
    if args.profile:
        info["profile"] = profile_ops(model, EvalSet(sub.users[:256], sub.history[:256], sub.target[:256]))
    for r in rows:
        r["achieved_flops_per_cpu_s"] = r["users_per_cpu_s"] * info["forward_flops_per_user"]
        r["extrapolated_full_test_min"] = len(test) / r["users_per_s"] / 60
        r["extrapolated_full_test_min_cpu"] = len(test) / r["users_per_cpu_s"] / 60
    need = len(test) / (args.target_minutes * 60)
    res = {**info, "target_users_per_s": need, "rows": rows}
    out = Path(args.out or f"benchmarks/results/eval_speed-{ds.name}.json")
    write_json(out, res)
    lines = [f"# evaluate() speed, {ds.name}: {what}", "",
             f"{n} of {len(test)} test users timed; beam {args.beam}; ID levels {info['levels']}; "
             f"mean prompt {info['mean_prompt_tokens']:.1f} tokens, shared prefix {info['shared_prefix_tokens']}; "
             f"{args.threads} thread(s); eval.precision {model.precision} (rows not named by precision). Full-test times are EXTRAPOLATED from the timed users. "
             f"Target: {args.target_minutes:g} min = {need:.1f} users/s.", "",
             f"Compute bound: {info['forward_tokens_per_user']:.0f} forward tokens per user (own prompt tokens + "
             f"{args.beam} beams x {model.trie.n_levels - 1} levels) = {info['forward_flops_per_user'] / 1e9:.2f} GFLOP; "
             f"dense 1024^2 matmul measured now: {info['dense_peak_flops_per_cpu_s'] / 1e9:.0f} GFLOP per CPU-second "
             f"-> at most {info['users_per_cpu_s_bound_at_peak']:.1f} users per CPU-second.", "",
             "| variant | users/s (wall) | users per CPU-s | GFLOP per CPU-s (engine's FLOPs per user) | extrapolated full test, min (wall) | (CPU) | load 1m |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['users_per_s']:.2f} | {r['users_per_cpu_s']:.2f} | {r['achieved_flops_per_cpu_s'] / 1e9:.0f} | "
              f"{r['extrapolated_full_test_min']:.1f} | "
              f"{r['extrapolated_full_test_min_cpu']:.1f} | {r['load_1m']:.1f} |" for r in rows]
    if "dense_peak_flops_per_cpu_s_bf16" in info:
        lines += ["", f"Dense 1024^2 matmul in bf16: {info['dense_peak_flops_per_cpu_s_bf16'] / 1e9:.0f} GFLOP per CPU-second "
                  f"(fp32 {info['dense_peak_flops_per_cpu_s'] / 1e9:.0f})."]
    for name in ("int8", "bf16"):
        if name in info:
            a = info[name]
            lines += ["", f"{name} vs fp32 on these users: top-10 overlap {a['top10_overlap']:.3f}, same top-1 "
                      f"{a['top1_same']:.3f}, NDCG@10 {a['ndcg10'][0]:.4f} (fp32) vs {a['ndcg10'][1]:.4f} ({name})."]
    if "profile" in info:
        lines += ["", f"Self CPU time by operator (`--profile`, evaluate() of {min(n, 256)} users), top {len(info['profile'])}:", "",
                  "| operator | share of self CPU time | calls |", "|---|---|---|"]
        lines += [f"| {p['op']} | {p['share']:.1%} | {p['calls']} |" for p in info["profile"]]
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
