"""Making semantic IDs unique, and the figures that describe a code assignment.

Two strategies (config `index.collisions`):
  ttds   append one disambiguation level: an entity's code there is its order inside the set of
         entities that share its codes. Entities without a collision get no token there (-1: a
         short ID, as in the paper) or, with `index.options.disambiguate: all`, the code 0.
  lcrec  LC-Rec: re-assign the last level of colliding entities with a Sinkhorn-Knopp transport
         plan (uniform over codes) computed from their distances to the last codebook, repeated a
         few rounds; whatever still collides then gets the `ttds` disambiguation level.
  none   keep the codes as they are (IDs may collide).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ttds.errors import TTDSError

STRATEGIES = ("ttds", "lcrec", "none")


def colliding(codes: np.ndarray) -> np.ndarray:
    """Boolean [n]: the entity shares its full code with another entity."""
    if not len(codes):
        return np.zeros(0, dtype=bool)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return counts[inverse.ravel()] > 1


def collision_rate(codes: np.ndarray) -> float:
    return float(colliding(codes).mean()) if len(codes) else 0.0


DISAMBIGUATE = ("colliding", "all")  # which IDs get the disambiguation token (config index.options.disambiguate)


def disambiguate(codes: np.ndarray, only_colliding: bool = True) -> np.ndarray:
    """Append the order inside each colliding set as one more level: [n, L] -> [n, L+1], unique rows, no
    row the prefix of another. `only_colliding`: entities whose codes are their own get -1 (no token)."""
    codes = np.asarray(codes, dtype=np.int64)
    if not len(codes):
        return np.zeros((0, codes.shape[1] + 1), dtype=np.int64)
    _, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    order = np.argsort(inverse, kind="stable")  # entities grouped by code, id order inside a group
    grouped = inverse[order]
    starts = np.r_[0, np.flatnonzero(np.diff(grouped)) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    extra = np.empty(len(codes), dtype=np.int64)
    extra[order] = rank
    if only_colliding:
        extra[np.bincount(inverse)[inverse] == 1] = -1
    return np.concatenate([codes, extra[:, None]], axis=1)


def sinkhorn(cost: torch.Tensor, epsilon: float = 0.003, iters: int = 100) -> torch.Tensor:
    """Sinkhorn-Knopp in the log domain: transport plan [n, K] with rows summing to 1/n, columns to 1/K."""
    n, k = cost.shape
    c = cost / cost.max().clamp_min(1e-12)  # scale-free epsilon (as LC-Rec)
    log_q = -c / epsilon
    log_r, log_c = -math.log(n), -math.log(k)
    u = torch.zeros(n, dtype=cost.dtype)
    v = torch.zeros(k, dtype=cost.dtype)
    for _ in range(iters):
        u = log_r - torch.logsumexp(log_q + v[None, :], dim=1)
        v = log_c - torch.logsumexp(log_q + u[:, None], dim=0)
    return (log_q + u[:, None] + v[None, :]).exp()


def sinkhorn_reassign(codes: np.ndarray, last_distances: torch.Tensor, rounds: int = 20, epsilon: float = 0.003) -> np.ndarray:
    """LC-Rec: move colliding entities to other last-level codes, uniformly spread by Sinkhorn."""
    codes = np.asarray(codes, dtype=np.int64).copy()
    if last_distances.shape != (len(codes), last_distances.shape[1]):
        raise ValueError("sinkhorn_reassign: distances must be [n, K]")
    best = int(colliding(codes).sum())
    for _ in range(rounds):
        coll = np.flatnonzero(colliding(codes))
        if len(coll) == 0:
            break
        plan = sinkhorn(last_distances[torch.from_numpy(coll)].double(), epsilon)
        trial = codes.copy()
        trial[coll, -1] = plan.argmax(1).numpy()
        n_coll = int(colliding(trial).sum())
        if n_coll >= best:
            break
        codes, best = trial, n_coll
    return codes


def resolve(codes: np.ndarray, strategy: str = "ttds", last_distances: torch.Tensor | None = None,
            report: dict | None = None, only_colliding: bool = True) -> np.ndarray:
    """Apply a collision strategy; `ttds` and `lcrec` always return unique rows with one extra level
    (kept even when Sinkhorn leaves no collision, so the token space never changes; with `only_colliding`
    it holds -1 for every entity whose codes are its own). `report` receives the collision rate after the
    Sinkhorn re-assignment (lcrec)."""
    if strategy not in STRATEGIES:
        raise TTDSError(f"config index.collisions={strategy!r}: expected one of {', '.join(STRATEGIES)}")
    codes = np.asarray(codes, dtype=np.int64)
    if strategy == "none":
        return codes
    if strategy == "lcrec" and last_distances is not None:
        codes = sinkhorn_reassign(codes, last_distances)
        if report is not None:
            report["collision_rate_sinkhorn"] = collision_rate(codes)
    return disambiguate(codes, only_colliding)


# ---------------------------------------------------------------- figures


def level_usage(codes: np.ndarray, level_sizes: list[int]) -> list[dict]:
    """Per level: codes used, share of the codebook used, perplexity (exp of the code entropy)."""
    out = []
    for level, k in enumerate(level_sizes):
        col = codes[:, level][codes[:, level] >= 0] if len(codes) else codes[:0, 0]  # -1: a short ID's missing token
        counts = np.bincount(col, minlength=k) if len(col) else np.zeros(k)
        p = counts[counts > 0] / max(1, counts.sum())
        out.append({"level": level, "size": int(k), "used": int((counts > 0).sum()), "usage": float((counts > 0).mean()),
                    "perplexity": float(np.exp(-(p * np.log(p)).sum())) if len(p) else 0.0})
    return out


def code_report(raw: np.ndarray, final: np.ndarray, level_sizes: list[int]) -> dict:
    """Collision rate before/after, max colliding-set size, per-level usage of the raw codes."""
    sizes = np.unique(raw, axis=0, return_counts=True)[1] if len(raw) else np.zeros(0)
    return {
        "n": int(len(raw)),
        "collision_rate_before": collision_rate(raw),
        "collision_rate_after": collision_rate(final),
        "distinct_ids_before": int(len(sizes)),
        "max_collision_set": int(sizes.max()) if len(sizes) else 0,
        "levels": level_usage(raw, level_sizes),
        "levels_after": int(final.shape[1]) if final.ndim == 2 else 0,
        # IDs without the disambiguation token (the paper's rule: only colliding IDs get it)
        "short_ids": float((final[:, -1] < 0).mean()) if final.ndim == 2 and len(final) and final.shape[1] > raw.shape[1] else 0.0,
    }


def assign_new_id(index, base_codes) -> tuple[np.ndarray, list[int]]:
    """Semantic ID for one new item from its tokenizer codes, with TTDS collision handling.

    `index` is a SemanticIndex whose last level is the disambiguation level (prefix `p`) when
    `len(base_codes) == index.n_levels - 1`. The new item gets the first disambiguation code not used by the
    items sharing its base codes; with short IDs (`index.short_ids`) a new item with base codes of its own gets
    none (-1), and an existing short ID with the same base codes gets the code 0 (its ID grows by one token).
    Returns (the index's new codes array: existing rows, possibly one grown, then the new row; new level sizes).
    """
    base = np.asarray(base_codes, dtype=np.int64).reshape(-1)
    codes, sizes = index.codes.copy(), list(index.level_sizes)
    if len(base) == index.n_levels:  # no disambiguation level: the ID must be free as it is
        if len(codes) and (codes == base).all(axis=1).any():
            raise TTDSError(f"new item: semantic ID {base.tolist()} is taken and the index has no disambiguation level")
        row = base
    elif len(base) == index.n_levels - 1:
        same = np.flatnonzero((codes[:, :-1] == base).all(axis=1)) if len(codes) else np.zeros(0, np.int64)
        if not len(same):
            row = np.append(base, -1 if index.short_ids else 0)
        else:
            codes[same[codes[same, -1] < 0], -1] = 0  # a short ID that shared these codes gets the token 0
            used = set(codes[same, -1].tolist())
            row = np.append(base, next(j for j in range(len(used) + 1) if j not in used))
    else:
        raise ValueError(f"assign_new_id: {len(base)} codes for an index of {index.n_levels} levels")
    sizes = [max(s, int(c) + 1) for s, c in zip(sizes, row)]
    return np.vstack([codes, row[None]]) if len(codes) else row[None], sizes
