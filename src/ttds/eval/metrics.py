"""Full-ranking leave-one-out metrics: HR@K, NDCG@K, MRR from the 0-based rank of each target.

One target per user, so HR@K = 1[rank < K], NDCG@K = 1[rank < K] / log2(rank + 2),
MRR = 1 / (rank + 1) (no cut-off; a miss of a ranked list counts 0).

Ties are broken PESSIMISTICALLY: the target ranks after every other item with an equal score,
so a model that gives every item the same score ranks every target last and scores 0.
"""
from __future__ import annotations

import numpy as np
import torch

MISS = 2**62  # rank of a target that a ranked list does not contain


def ranks_from_scores(scores: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of `targets[b]` among `scores[b, :]` (higher score = better), pessimistic ties.

    `seen` (optional, [B, N] item ids, negative = padding) masks those items out of the ranking
    unless they are the target. Off in every reported table. A NaN target score is a miss.
    """
    scores = scores.float()
    targets = targets.to(scores.device).long()
    if seen is not None:
        seen = seen.to(scores.device).long()
        valid = seen >= 0
        rows = torch.arange(scores.shape[0], device=scores.device).unsqueeze(1).expand_as(seen)
        keep_target = seen == targets.unsqueeze(1)
        drop = valid & ~keep_target
        scores = scores.clone()
        scores[rows[drop], seen[drop]] = float("-inf")
    t = scores.gather(1, targets.unsqueeze(1))  # [B, 1]
    # items with score >= the target's, minus the target itself
    rank = (scores >= t).sum(1) - 1
    return torch.where(torch.isnan(t.squeeze(1)), torch.full_like(rank, MISS), rank)


def ranks_from_lists(lists, targets, n_items: int) -> np.ndarray:
    """0-based rank of each target in a ranked list of item ids ([B, k]); MISS when absent.

    Repeated ids are dropped (the first occurrence keeps its place, later items move up).
    An invalid id (< 0 or >= n_items) occupies its slot but never matches.
    """
    lists = np.asarray(lists.cpu() if isinstance(lists, torch.Tensor) else lists, dtype=np.int64)
    targets = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64)
    if lists.ndim != 2 or lists.shape[0] != targets.shape[0]:
        raise ValueError(f"lists must be [B, k] with B = len(targets); got {lists.shape} and {targets.shape}")
    out = np.full(len(targets), MISS, dtype=np.int64)
    for b in range(len(targets)):
        seen: set[int] = set()
        pos = 0
        for item in lists[b].tolist():
            if 0 <= item < n_items:
                if item in seen:
                    continue
                seen.add(item)
                if item == targets[b]:
                    out[b] = pos
                    break
            pos += 1
    return out


def parse_metric(metric: str) -> tuple[str, int]:
    """("HR" | "NDCG", k) or ("MRR", 0); ValueError for any other name."""
    if metric == "MRR":
        return "MRR", 0
    name, _, k = metric.partition("@")
    if name not in ("HR", "NDCG") or not k.isdigit() or int(k) < 1:
        raise ValueError(f"metric {metric!r}: expected HR@k, NDCG@k or MRR")
    return name, int(k)


def per_user(ranks, metric: str) -> np.ndarray:
    """One user's value of `metric` ("HR@k", "NDCG@k" or "MRR") for each 0-based rank, [n] float64."""
    name, k = parse_metric(metric)
    r = np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks, dtype=np.float64)
    if name == "MRR":
        return 1.0 / (r + 1.0)
    hit = r < k
    return hit.astype(np.float64) if name == "HR" else np.where(hit, 1.0 / np.log2(np.minimum(r, k) + 2.0), 0.0)


def metrics_from_ranks(ranks, ks=(1, 5, 10)) -> dict[str, float]:
    """HR@k and NDCG@k for each k, and MRR, averaged over users."""
    if np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks).size == 0:
        raise ValueError("no ranks to average")
    names = [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks] + ["MRR"]
    return {m: float(per_user(ranks, m).mean()) for m in names}
