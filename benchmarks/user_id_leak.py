"""Does a twin-tower model read the future from its user IDs?

A user's ID comes from one static profile: the mean of the vectors of the user's last 20 *training* items
(`ttds.data.dataset.profile_items`, seq[:-2]). Whole-sequence training predicts every one of those items from
the prompt "... user <ID>, history: item_1 .. item_{t-1}", so the ID it reads already holds item t and the
items after it. If the model learns to use that, its validation and test prompts (whose targets are never in
the profile) ask for something it was not trained to do.

The probe re-computes user IDs from modified profiles through the model's own user tower
(`ttds.index.profiles.ProfileIDs`: base codes from the tower's quantiser, then the user's own ID when the base
codes are theirs, else the first free disambiguation code) and evaluates the same users with each, side by side:

  stored         the IDs the model was trained and evaluated with
  recomputed     profile = the training items, through the probe's path (checks the path: close to stored)
  +target        profile = the training items + the evaluation target (the leak, made available at test time)
  +random item   profile = the training items + a random other item (control: the same size of change)
  +latest item   test split only: profile = training items + the validation item (seq[:-1]): no target
                 information, just a fresher profile, as a served user's would be
  no user ID     the prompt says "the user" instead of an ID

If `+target` beats `+random item` by far, the model learned to look up the next item in its user ID (what
`tasks.user_profile: all` teaches; `earlier` codes each training prompt's ID from the items before its targets).

    python benchmarks/user_id_leak.py --model-dir runs/s10/ttss-Games --data ../shared/data/Games --users 1000 \\
        --split valid --threads 1 --out benchmarks/results/user_id_leak-Games-ttss
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch


def profile_ids(model, cfg: dict, run: Path, ds):
    """`ttds.index.profiles.ProfileIDs` of the model's user tower: TTDS its own tower and item X, a static run its
    saved tokenizer.user and the pretrained backbone's item vectors (what the tower was fitted on)."""
    from ttds.index.profiles import item_profile_ids, static_profile_ids
    from ttds.models.ttds import TTDSRecommender
    from ttds.train.generative import _backbone

    if getattr(model, "user_index", None) is None:
        raise SystemExit(f"{run}: the model has no user IDs (no user tower)")
    if isinstance(model, TTDSRecommender):
        return item_profile_ids(cfg, ds, model.user_index, model.towers["user"].tokenizer, model.towers["item"].x)
    return static_profile_ids(cfg, ds, run, model.user_index, _backbone(cfg, "cpu"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="valid", choices=("valid", "test"))
    ap.add_argument("--users", type=int, default=1000, help="evaluation users, a fixed sample (with --split valid and "
                    "--users = train.valid_users: the training run's own validation users)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="of the random control items")
    ap.add_argument("--out", default=None, help="OUT.md and OUT.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from ttds.data.dataset import leave_one_out, profile_items
    from ttds.data.readers import load_dataset
    from ttds.errors import TTDSError
    from ttds.eval.evaluator import evaluate
    from ttds.io import write_json, write_text
    from ttds.recipes import load_model
    from ttds.train.loop import sample_users

    run = Path(args.model_dir)
    cfg, model = load_model(run, "cpu")
    model.eval()
    ds = load_dataset(args.data)
    sp = leave_one_out(ds, int(cfg["data"]["max_history"]))
    ev = sample_users(getattr(sp, args.split), args.users, int(cfg.get("seed", 42)))
    try:
        pid = profile_ids(model, cfg, run, ds)
    except TTDSError as e:
        raise SystemExit(str(e)) from None

    users = [int(u) for u in ev.users]
    train_items = [profile_items(ds, u) for u in users]
    rng = np.random.default_rng(args.seed)
    variants = {"stored": None, "recomputed": train_items,
                "+target": [p + [int(t)] for p, t in zip(train_items, ev.target)],
                "+random item": [p + [int(rng.integers(ds.n_items))] for p in train_items]}
    if args.split == "test":
        variants["+latest item"] = [p + [int(ds.sequences[u][-2])] for p, u in zip(train_items, users)]
    variants["no user ID"] = "none"

    original = model.codec.user_tokens
    rows = []
    for name, profiles in variants.items():
        table = original.copy()
        if isinstance(profiles, list):
            new = model.id_tokens("user", pid.codes(profiles, users))
            changed = float((new != original[np.asarray(users)]).any(1).mean())
            table[np.asarray(users)] = new
        else:
            changed = 0.0 if profiles is None else 1.0
        model.codec.user_tokens = table
        eval_users = ev if profiles != "none" else type(ev)(np.full_like(ev.users, -1), ev.history, ev.target)
        t = time.perf_counter()
        m = evaluate(model, eval_users, batch_size=1024, progress=False)
        rows.append({"variant": name, "ids_changed": changed, **{k: m[k] for k in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")},
                     "seconds": round(time.perf_counter() - t, 1)})
        print(f"{name:14s} IDs changed {changed:6.1%}  NDCG@10 {m['NDCG@10']:.4f}  HR@10 {m['HR@10']:.4f}  "
              f"({rows[-1]['seconds']} s)", flush=True)
    model.codec.user_tokens = original

    cmd = (f"python benchmarks/user_id_leak.py --model-dir {args.model_dir} --data {args.data} --split {args.split} "
           f"--users {args.users} --threads {args.threads} --seed {args.seed}" + (f" --out {args.out}" if args.out else ""))
    lines = [f"# User-ID probe: {run.name} on {ds.name}, {args.split} split, {len(ev)} users", "",
             f"Command: `{cmd}`", "", "| user IDs from | IDs changed | HR@1 | HR@5 | HR@10 | NDCG@5 | NDCG@10 | eval s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ids_changed']:.1%} | " + " | ".join(f"{r[k]:.4f}" for k in
                     ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")) + f" | {r['seconds']} |")
    print("\n".join(lines))
    if args.out:
        write_text(f"{args.out}.md", "\n".join(lines) + "\n")
        write_json(f"{args.out}.json", {"command": cmd, "rows": rows, "model_dir": str(run), "dataset": ds.name})


if __name__ == "__main__":
    main()
