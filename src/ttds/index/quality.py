"""Is an index semantic? Entities sharing a code prefix vs random pairs, and a printable report.

For pairs of entities that share their first `level` codes and for random pairs: mean title-word
Jaccard similarity and category agreement (same category path). The ratio prefix / random is
above 1 when codes carry meaning (about 1 for random IDs).
"""
from __future__ import annotations

import re

import numpy as np

from ttds.data.dataset import RecDataset
from ttds.index.base import SemanticIndex
from ttds.index.collisions import code_report

_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def prefix_pairs(codes: np.ndarray, level: int, n_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """[p, 2] random pairs of distinct entities sharing their first `level` codes (entity-weighted)."""
    _, inverse, counts = np.unique(codes[:, :level], axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    eligible = np.flatnonzero(counts[inverse] > 1)
    if not len(eligible):
        return np.zeros((0, 2), dtype=np.int64)
    order = np.argsort(inverse, kind="stable")
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes)) - np.repeat(starts, counts)
    a = rng.choice(eligible, n_pairs)
    g = inverse[a]
    offset = 1 + (rng.random(n_pairs) * (counts[g] - 1)).astype(np.int64)
    b = order[starts[g] + (rank[a] + offset) % counts[g]]
    return np.stack([a, b], 1)


def pair_similarity(pairs: np.ndarray, words: list[frozenset], cats: list[str] | None) -> tuple[float, float | None]:
    jac = []
    for a, b in pairs:
        u = words[a] | words[b]
        jac.append(len(words[a] & words[b]) / len(u) if u else 0.0)
    cat = None
    if cats is not None:
        both = [(cats[a], cats[b]) for a, b in pairs if cats[a] and cats[b]]
        cat = float(np.mean([x == y for x, y in both])) if both else None
    return float(np.mean(jac)) if jac else 0.0, cat


def semantic_check(index: SemanticIndex, texts: list[str], cats: list[str] | None = None, level: int = 2,
                   n_pairs: int = 20000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    words = [_words(t) for t in texts]
    if cats is not None and sum(bool(c.strip()) for c in cats) < 0.5 * len(cats):
        cats = None  # too little category text to judge (e.g. Games has titles only)
    same = prefix_pairs(index.codes, level, n_pairs, rng)
    rand = rng.integers(0, index.n, (n_pairs, 2))
    rand = rand[rand[:, 0] != rand[:, 1]]
    js, cs = pair_similarity(same, words, cats)
    jr, cr = pair_similarity(rand, words, cats)
    out = {"level": level, "pairs": int(len(same)), "jaccard_prefix": js, "jaccard_random": jr,
           "jaccard_ratio": js / jr if jr else None, "category_prefix": cs, "category_random": cr,
           "category_ratio": (cs / cr if cr else None) if cs is not None else None}
    return out


def entity_texts(ds: RecDataset, tower: str) -> tuple[list[str], list[str] | None]:
    """Words to compare: item titles (+ categories), or user texts (no categories)."""
    if tower == "item":
        return ds.item_text["title"], ds.item_text.get("categories")
    from ttds.backbone.texts import user_texts

    return user_texts(ds, None, 0), None


def index_stats(index: SemanticIndex, raw: np.ndarray | None = None, build_stats: dict | None = None) -> dict:
    """Figures for `ttds index stats`: from the build when known, else from the index itself."""
    if build_stats:
        return dict(build_stats)
    n_base = index.n_levels - (1 if index.prefixes and index.prefixes[-1] in ("p", "up") else 0)
    raw = index.codes[:, :n_base] if raw is None else raw
    return code_report(raw, index.codes, index.level_sizes[:n_base])


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_stats(stats: dict, semantic: dict | None = None) -> str:
    lines = [f"entities             {stats['n']}"]
    for k in ("kind", "tower", "collisions", "dim", "epochs"):
        if k in stats:
            lines.append(f"{k:<21}{stats[k]}")
    lines += [
        f"collision rate       before {stats['collision_rate_before']:.4f}   after {stats['collision_rate_after']:.4f}",
    ]
    if "collision_rate_sinkhorn" in stats:
        lines.append(f"after Sinkhorn       {stats['collision_rate_sinkhorn']:.4f} (LC-Rec re-assignment, before the extra level)")
    lines += [
        f"distinct IDs before  {stats['distinct_ids_before']} (largest colliding set {stats['max_collision_set']})",
        f"ID length            {stats['levels_after']} tokens"
        + (f" ({stats['short_ids']:.1%} of IDs one shorter: no collision, no disambiguation token)" if stats.get("short_ids") else ""),
        "level  size  used  usage   perplexity",
    ]
    for lv in stats["levels"]:
        lines.append(f"{lv['level']:>5}  {lv['size']:>4}  {lv['used']:>4}  {lv['usage']:.3f}  {lv['perplexity']:>10.1f}")
    times = [(k, stats[k]) for k in ("encode_seconds", "fit_seconds", "total_seconds") if k in stats]
    if times:
        lines.append("time                 " + "  ".join(f"{k.replace('_seconds', '')} {v:.1f}s" for k, v in times)
                     + ("  (embeddings from cache)" if stats.get("embeddings_cached") else ""))
    if "loss_first" in stats:
        lines.append(f"rq-vae loss          {stats['loss_first']:.4f} -> {stats['loss_last']:.4f} (recon {stats['recon_last']:.4f}, re-seeded codes {stats['reseeded_codes']})")
    if semantic:
        s = semantic
        lines.append(f"semantic check       {s['pairs']} pairs sharing a {s['level']}-code prefix vs random pairs")
        lines.append(f"  title-word Jaccard {_fmt(s['jaccard_prefix'])} vs {_fmt(s['jaccard_random'])}  ratio {_fmt(s['jaccard_ratio'])}")
        lines.append(f"  category agreement {_fmt(s['category_prefix'])} vs {_fmt(s['category_random'])}  ratio {_fmt(s['category_ratio'])}")
    return "\n".join(lines)
