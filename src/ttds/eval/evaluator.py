"""The one evaluation protocol: leave-one-out, full ranking over the whole catalogue, no masking.

`evaluate(model, evalset)` works for any model with `scores(users, history)` (all items scored)
or `recommend(users, history, k)` (a ranked list of ids); see `ttds.models.base`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ttds import dist
from ttds.data.dataset import EvalSet
from ttds.eval.metrics import MISS, metrics_from_ranks, ranks_from_lists, ranks_from_scores
from ttds.io import save_safetensors, write_json
from ttds.models.base import has_recommend, has_scores, inference_region

log = logging.getLogger(__name__)


def evaluate_ranks(model, evalset: EvalSet, batch_size: int = 1024, k: int = 10, mask_seen: bool = False,
                   device: torch.device | str = "cpu", progress: bool = True, desc: str = "eval",
                   return_seen_top1: bool = False):
    """0-based rank of every target (pessimistic ties; MISS when a list does not contain it). With
    `return_seen_top1` also, per user, 1 when the model's first recommendation is an item of the history
    (without `mask_seen`: its unmasked scores' top item)."""
    if not (has_scores(model) or has_recommend(model)):
        raise TypeError(f"{type(model).__name__} has neither scores() nor recommend()")
    if isinstance(model, torch.nn.Module):
        model.eval()
    out, seen1 = [], []
    starts = dist.shard_starts(len(evalset), batch_size)  # under torchrun: this rank's batches
    bar = tqdm(starts, desc=desc, leave=False, disable=not progress or not dist.is_main(), unit="batch")
    with torch.no_grad(), inference_region(model):
        for start in bar:
            sl = slice(start, start + batch_size)
            users = torch.as_tensor(evalset.users[sl], device=device)
            hist = torch.as_tensor(evalset.history[sl], device=device)
            target = torch.as_tensor(evalset.target[sl], device=device)
            if has_scores(model):
                s = model.scores(users, hist)
                out.append(ranks_from_scores(s, target, hist if mask_seen else None).cpu().numpy())
                top1 = s.argmax(1)
            else:
                if mask_seen and not getattr(model, "accepts_exclude", False):
                    raise ValueError(f"eval.mask_seen: {type(model).__name__} can neither score all items nor search around seen ones")
                # seen items other than the target are searched around (as ranks_from_scores masks them)
                excl = [[i for i in h.tolist() if i >= 0 and i != t] for h, t in zip(hist.cpu(), target.tolist())] if mask_seen else None
                lists = model.recommend(users, hist, k, exclude=excl) if mask_seen else model.recommend(users, hist, k)
                out.append(ranks_from_lists(lists, target, model.n_items))
                top1 = torch.as_tensor(np.asarray(lists))[:, 0].to(hist.device)
            if return_seen_top1:
                seen1.append(((hist == top1.unsqueeze(1)).any(1) & (top1 >= 0)).long().cpu().numpy())
    n_batches = -(-len(evalset) // batch_size)
    out = dist.gather_batches(out, n_batches)  # every rank gets all users, in order
    ranks = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    if not return_seen_top1:
        return ranks
    seen1 = dist.gather_batches(seen1, n_batches)
    return ranks, (np.concatenate(seen1) if seen1 else np.zeros(0, dtype=np.int64))


def evaluate(model, evalset: EvalSet, batch_size: int = 1024, ks=(1, 5, 10), mask_seen: bool = False,
             device: torch.device | str = "cpu", progress: bool = True, desc: str = "eval",
             ranks_to: str | Path | None = None) -> dict:
    """Metrics over `evalset` plus `n` (users), `eval_seconds` (wall) and `eval_cpu_seconds` (this process).
    `ranks_to`: also write every user's rank there (`save_ranks`), for paired comparisons (`ttds compare`)."""
    t0, c0 = time.perf_counter(), time.process_time()
    ranks, seen1 = evaluate_ranks(model, evalset, batch_size, max(ks), mask_seen, device, progress, desc, return_seen_top1=True)
    if ranks_to is not None and dist.is_main():
        save_ranks(ranks_to, evalset, ranks, max(ks))
    out = metrics_from_ranks(ranks, ks)
    if not mask_seen:  # share of users whose first recommendation is an item they already have
        out["seen@1"] = float(seen1.mean()) if len(seen1) else 0.0
    out["n"] = int(len(ranks))
    out["eval_seconds"] = round(time.perf_counter() - t0, 2)
    out["eval_cpu_seconds"] = round(time.process_time() - c0, 2)
    return out


def save_ranks(path: str | Path, evalset: EvalSet, ranks: np.ndarray, k: int) -> None:
    """Per user of `evalset`: user id, target item and the target's 0-based rank (MISS beyond the k searched;
    a scoring model's ranks are exact at any depth), as safetensors (atomic)."""
    save_safetensors(path, {"users": torch.as_tensor(np.asarray(evalset.users), dtype=torch.long),
                            "targets": torch.as_tensor(np.asarray(evalset.target), dtype=torch.long),
                            "ranks": torch.as_tensor(np.asarray(ranks), dtype=torch.long)},
                     {"k": str(int(k)), "miss": str(MISS)})


METRIC_ORDER = ("HR@1", "HR@5", "HR@10", "NDCG@1", "NDCG@5", "NDCG@10", "MRR", "seen@1")


def format_metrics(rows: dict[str, dict], digits: int = 4) -> str:
    """A plain text table: one row per name, the metric columns that exist."""
    cols = [c for c in METRIC_ORDER if any(c in r for r in rows.values())]
    cols += sorted({c for r in rows.values() for c in r if c.startswith(("HR@", "NDCG@")) and c not in cols})
    width = max([len("model")] + [len(n) for n in rows])
    lines = [f"{'':{width}}  " + "  ".join(f"{c:>8}" for c in cols)]
    for name, r in rows.items():
        cells = [f"{r[c]:>8.{digits}f}" if isinstance(r.get(c), (int, float)) else f"{'-':>8}" for c in cols]
        lines.append(f"{name:{width}}  " + "  ".join(cells))
    note = "; seen@1 = share of users whose top item is one they already have" if "seen@1" in cols else ""
    return "\n".join(lines) + f"\n(full ranking over all items, leave-one-out, seen items not masked{note})"


def save_metrics(path: str | Path, metrics: dict, **extra) -> None:
    write_json(path, {**extra, **metrics})
