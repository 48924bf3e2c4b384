"""Batch pre-compute: every user's top-K into a store, resumable, published atomically at the end.

The version tag is a hash of (model version, dataset content, K, seen-item rule), so re-running the same command after
an interruption re-opens the same unfinished version, skips the users already written and carries on;
each batch is written in one transaction, so a user is either fully written or not at all.
Users go longest history first (`by_history_length`: less padding per model call).
Only when every user is present is the version published (readers switch over in one step).
Under torchrun every rank computes a slice of each round of users; rank 0 gathers them and is the only writer.
"""
from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
from tqdm import tqdm

from ttds import dist
from ttds.models.base import inference_region
from ttds.serve.store import Entry, Store

log = logging.getLogger(__name__)


def version_tag(engine, k: int) -> str:
    seen = getattr(engine, "exclude_history", None)
    h = hashlib.sha256(f"{engine.model_version}|k={k}|users={engine.n_users}|items={engine.n_items}|seen={seen}|".encode())
    for u in range(engine.n_users):
        h.update(np.asarray(engine.user_history(u), dtype=np.int64).tobytes() + b"|")
    return "v" + h.hexdigest()[:16]


def by_history_length(engine, users: list[int]) -> list[int]:
    """`users`, longest (model-visible) history first, ties in id order. A model call then gets users of about
    one prompt length, so its micro-batches carry little padding; in id order the lengths of a call are mixed
    (on Games the first users also have the longest histories). Longest first also makes the progress
    bar's rate only rise, so its time estimate errs on the long side."""
    cap = getattr(engine, "max_history", None)  # RecommenderEngine: the model sees the last `max_history` items

    def length(u: int) -> int:
        n = len(engine.user_history(u))
        return n if cap is None else min(n, cap)

    return sorted(users, key=lambda u: -length(u))


def precompute(engine, store: Store, k: int = 50, batch_size: int = 256, progress: bool = True, on_batch=None) -> dict:
    """Write every user's top-`k` into `store` and publish it. Returns figures (users, seconds, users/s).

    `on_batch(n_done)` is called after each committed batch (tests use it to interrupt a run).
    """
    dist.init(device=str(getattr(engine, "device", "cpu")))  # joins the torchrun group, if any
    tag = version_tag(engine, k)
    info = store.begin(tag, engine.model_version, k, engine.n_users) if dist.is_main() else None
    done = set(dist.broadcast_json(sorted(store.done_users(tag)) if dist.is_main() else None))
    todo = by_history_length(engine, [u for u in range(engine.n_users) if u not in done])
    log.info("precompute %s -> %s version %s: %d users, %d already written", engine.model_version, store.url, tag, engine.n_users, len(done))
    t0, written = time.perf_counter(), 0
    step = batch_size * dist.world()  # one round: batch_size users per rank
    with tqdm(total=engine.n_users, initial=len(done), unit="user", desc="precompute", disable=not progress or not dist.is_main()) as bar, \
            inference_region(getattr(engine, "model", None)):
        for s in range(0, len(todo), step):
            part, live = dist.shard(todo[s:s + step])
            users = [int(u) for u in part] if live else []
            recs = engine.recommend_histories([engine.user_history(u) for u in users], k, None, users) if users else []
            users, recs = dist.gather_recs(users, recs, k)  # rank 0 receives every rank's users, in order
            now = time.time()
            if dist.is_main():
                store.put_many(tag, [
                    Entry(u, [i for i, _ in r], [sc for _, sc in r], engine.model_version, now, k) for u, r in zip(users, recs)
                ])
            written += len(users)
            bar.update(len(users))
            if on_batch:
                on_batch(len(done) + written)
    seconds = time.perf_counter() - t0
    have = engine.n_users
    if dist.is_main():  # the only writer checks and publishes; the other ranks wait for it
        have = store.count(tag)
        if have != engine.n_users:
            raise RuntimeError(f"precompute: version {tag} holds {have} users, expected {engine.n_users}")
        if info.state != "published" or store.active() != tag:
            store.publish(tag)
    dist.barrier()
    log.info("published %s (%d users, %.1f s, %.1f users/s)", tag, have, seconds, written / seconds if seconds else 0)
    return {"tag": tag, "users": have, "written": written, "seconds": seconds, "users_per_s": written / seconds if seconds > 0 else 0.0}
