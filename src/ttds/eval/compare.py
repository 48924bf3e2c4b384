"""Paired comparison of two models on the same users: is B better than A, or is it noise?

    ttds compare runs/ttss-Scientific runs/ttds-Scientific
    ttds compare A42,A43,A44 B42,B43,B44 --metric NDCG@10 --metric HR@1     # paired by position (seeds)

Every evaluation writes each user's rank of the target (`ranks-test.safetensors` in a run folder,
`eval-<data>-<split>....ranks.safetensors` from `ttds eval`). Both models saw the same users with the same
targets, so the per-user differences d = metric_B(u) - metric_A(u) are paired: the table gives their mean with
a 95 % confidence interval and a two-sided p-value (paired t-test, normal approximation: fine for the
thousands of users of a test set), and how many users each side wins. With several pairs (seeds) it adds a
pooled row over all (user, pair) differences and the mean ± std of the pairs' differences.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ttds.errors import TTDSError
from ttds.eval.metrics import parse_metric, per_user

DEFAULT_METRICS = ("NDCG@10", "HR@10", "HR@1")


def ranks_path(path: str | Path, split: str = "test") -> Path:
    """A ranks file, or a run folder's `ranks-<split>.safetensors` (its training's evaluation), else its
    `eval-<data>-<split>.ranks.safetensors` (from `ttds eval`, fp32, the model's own seen-item rule)."""
    path = Path(path)
    if path.is_dir():
        found = [path / f"ranks-{split}.safetensors"] + sorted(path.glob(f"eval-*-{split}.ranks.safetensors"))
        for f in found:
            if f.is_file():
                return f
        raise TTDSError(f"{path}: no ranks-{split}.safetensors (run folders from before session 16 have none; "
                        f"`ttds eval --model-dir {path} --data DATA --split {split}` writes one)")
    if not path.is_file():
        raise TTDSError(f"{path}: no such run folder or ranks file")
    return path


def load_ranks(path: str | Path, split: str = "test") -> dict:
    """{"users", "targets", "ranks": int64 arrays, "k": ranks searched, "path"}."""
    from safetensors import safe_open

    f = ranks_path(path, split)
    try:
        with safe_open(str(f), "pt") as h:
            meta, t = h.metadata() or {}, {k: h.get_tensor(k) for k in h.keys()}
    except Exception as e:  # not a safetensors file
        raise TTDSError(f"{f}: not a ranks file ({e})") from None
    if not {"users", "targets", "ranks"} <= set(t) or not meta.get("k", "").isdigit():
        raise TTDSError(f"{f}: expected tensors users, targets, ranks and metadata k (written by an evaluation)")
    return {"users": t["users"].numpy(), "targets": t["targets"].numpy(), "ranks": t["ranks"].numpy(),
            "k": int(meta["k"]), "path": f}


def _check_metric(metric: str, k: int, where: Path) -> None:
    try:
        cut = parse_metric(metric)[1]
    except ValueError:
        raise TTDSError(f"--metric {metric!r}: expected HR@k, NDCG@k or MRR") from None
    if cut > k:
        raise TTDSError(f"--metric {metric}: {where} holds ranks up to {k} only")


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean of A, of B, of d = b - a with a 95 % CI, the paired t statistic and its two-sided p-value
    (normal approximation), users where B is ahead / behind."""
    d = b - a
    n = len(d)
    diff = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    t = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    return {"n": n, "a": float(a.mean()), "b": float(b.mean()), "diff": diff, "lo": diff - 1.96 * se, "hi": diff + 1.96 * se,
            "t": t, "p": math.erfc(abs(t) / math.sqrt(2)), "b_ahead": int((d > 0).sum()), "b_behind": int((d < 0).sum())}


def compare(base: list[str | Path], other: list[str | Path], metrics=DEFAULT_METRICS, split: str = "test") -> dict:
    """Paired statistics of `other[i]` against `base[i]` for each metric, and pooled over the pairs."""
    if len(base) != len(other) or not base:
        raise TTDSError(f"compare: {len(base)} base and {len(other)} other runs: expected two lists of the same, non-zero length")
    pairs, diffs = [], {m: [] for m in metrics}
    for a_path, b_path in zip(base, other):
        a, b = load_ranks(a_path, split), load_ranks(b_path, split)
        if not (np.array_equal(a["users"], b["users"]) and np.array_equal(a["targets"], b["targets"])):
            raise TTDSError(f"{a['path']} and {b['path']}: different users or targets (not the same data and split)")
        row = {"base": str(a["path"]), "other": str(b["path"]), "metrics": {}}
        for m in metrics:
            _check_metric(m, min(a["k"], b["k"]), a["path"] if a["k"] <= b["k"] else b["path"])
            va, vb = per_user(a["ranks"], m), per_user(b["ranks"], m)
            row["metrics"][m] = paired(va, vb)
            diffs[m].append((va, vb))
        pairs.append(row)
    out = {"split": split, "pairs": pairs}
    if len(pairs) > 1:
        out["pooled"] = {}
        for m in metrics:
            va = np.concatenate([x for x, _ in diffs[m]])
            vb = np.concatenate([y for _, y in diffs[m]])
            per_pair = np.array([r["metrics"][m]["diff"] for r in pairs])
            out["pooled"][m] = paired(va, vb) | {"pair_mean": float(per_pair.mean()), "pair_std": float(per_pair.std(ddof=1))}
    return out


def _name(path: str) -> str:
    p = Path(path)
    return p.parent.name if p.name.startswith(("ranks-", "eval-")) else p.name  # a run folder's file: the run


def format_compare(result: dict) -> str:
    """A plain text table: one line per (pair, metric), then the pooled lines."""
    lines = [f"{'other vs base':<52} {'metric':<8} {'base':>8} {'other':>8} {'diff':>9} {'95% CI':>21} {'p':>8} {'ahead/behind':>14}"]

    def line(label: str, m: str, r: dict) -> str:
        ci = f"[{r['lo']:+.4f}, {r['hi']:+.4f}]"
        return (f"{label:<52} {m:<8} {r['a']:>8.4f} {r['b']:>8.4f} {r['diff']:>+9.4f} {ci:>21} {r['p']:>8.2g} "
                f"{r['b_ahead']:>7}/{r['b_behind']:<6}")

    for row in result["pairs"]:
        label = f"{_name(row['other'])} vs {_name(row['base'])}"[:52]
        lines += [line(label, m, r) for m, r in row["metrics"].items()]
    for m, r in (result.get("pooled") or {}).items():
        lines.append(line(f"pooled ({len(result['pairs'])} pairs)", m, r) + f"  pairs: {r['pair_mean']:+.4f} ± {r['pair_std']:.4f}")
    n = result["pairs"][0]["metrics"]
    n = next(iter(n.values()))["n"] if n else 0
    lines.append(f"({result['split']} split, {n} users per pair; diff = other - base, paired t-test with the normal "
                 "approximation; ahead/behind = users where other scores higher / lower)")
    return "\n".join(lines)

