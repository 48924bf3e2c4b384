"""Raw Amazon Review 2018 files -> LC-Rec layout (`ttds data prepare-amazon`).

reviews: JSON lines (optionally .gz) with reviewerID, asin, unixReviewTime[, reviewText, summary]
meta:    JSON lines with asin[, title, description, brand, category]
Steps as LC-Rec: clean text, keep each (user, item) once (earliest), iterative k-core
filtering, chronological sequences (ties keep file order), ids by first appearance order
of sorted original ids, reviews kept as user text with the item they refer to.
"""
from __future__ import annotations

import html
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np

from ttds.data.dataset import TEXT_FIELDS, RecDataset, UserText
from ttds.errors import TTDSError
from ttds.io import iter_json_lines

log = logging.getLogger(__name__)


def clean_text(raw) -> str:
    """LC-Rec's clean_text: unescape HTML, drop quotes/newlines/tags, collapse the trailing dots."""
    if isinstance(raw, list):
        raw = " ".join(str(x) for x in raw)
    if not isinstance(raw, str):
        return ""
    text = html.unescape(raw)
    text = re.sub(r"<[^>]+>", " ", text)
    text = text.replace('"', "").replace("\n", " ").replace("\r", " ").replace("\t", " ")
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\.+$", ".", text)
    return text


def _require(path: Path, lineno: int, obj: dict, key: str, kind):
    if key not in obj:
        raise TTDSError(f"{path}: line {lineno}: missing key {key!r}")
    val = obj[key]
    if not isinstance(val, kind) or isinstance(val, bool):
        raise TTDSError(f"{path}: line {lineno}: key {key!r}: expected {kind.__name__ if isinstance(kind, type) else 'a value'}")
    return val


def k_core(pairs: list[tuple[str, str]], k: int) -> set[tuple[str, str]]:
    """Iteratively drop users and items with fewer than k interactions."""
    alive = set(pairs)
    while True:
        uc = Counter(u for u, _ in alive)
        ic = Counter(i for _, i in alive)
        keep = {(u, i) for u, i in alive if uc[u] >= k and ic[i] >= k}
        if len(keep) == len(alive):
            return keep
        alive = keep


def prepare_amazon(reviews: str | Path, meta: str | Path | None, name: str, k: int = 5) -> RecDataset:
    reviews = Path(reviews)
    first: dict[tuple[str, str], tuple[float, int, str]] = {}
    for lineno, obj in enumerate(iter_json_lines(reviews), 1):
        u = _require(reviews, lineno, obj, "reviewerID", str)
        i = _require(reviews, lineno, obj, "asin", str)
        t = float(_require(reviews, lineno, obj, "unixReviewTime", (int, float)))
        text = clean_text(" ".join(x for x in (obj.get("summary"), obj.get("reviewText")) if isinstance(x, str)))
        key = (u, i)
        if key not in first or t < first[key][0]:
            first[key] = (t, lineno, text)
    if not first:
        raise TTDSError(f"{reviews}: no reviews")
    keep = k_core(list(first), k)
    if not keep:
        raise TTDSError(f"{reviews}: no user/item survives {k}-core filtering")
    users = sorted({u for u, _ in keep})
    items = sorted({i for _, i in keep})
    item_of = {a: n for n, a in enumerate(items)}
    by_user: dict[str, list[tuple[float, int, int, str]]] = {u: [] for u in users}
    for (u, i) in keep:
        t, lineno, text = first[(u, i)]
        by_user[u].append((t, lineno, item_of[i], text))
    sequences, user_text = [], []
    for u in users:
        ev = sorted(by_user[u])
        sequences.append(np.asarray([e[2] for e in ev], dtype=np.int64))
        user_text.append([UserText(e[3], e[2]) for e in ev if e[3]])

    item_text = {f: [""] * len(items) for f in TEXT_FIELDS}
    if meta is not None:
        meta = Path(meta)
        for lineno, obj in enumerate(iter_json_lines(meta), 1):
            a = obj.get("asin")
            if not isinstance(a, str):
                raise TTDSError(f"{meta}: line {lineno}: missing key 'asin'")
            n = item_of.get(a)
            if n is None:
                continue
            item_text["title"][n] = clean_text(obj.get("title", ""))
            item_text["description"][n] = clean_text(obj.get("description", ""))
            item_text["brand"][n] = clean_text(obj.get("brand", ""))
            cats = obj.get("category", obj.get("categories", []))
            if isinstance(cats, list):
                cats = ",".join(clean_text(c) for c in cats if clean_text(c))
            item_text["categories"][n] = clean_text(cats)
    log.info("%s: %d users, %d items, %d interactions after %d-core", name, len(users), len(items), len(keep), k)
    return RecDataset(name=name, sequences=sequences, item_text=item_text, user_ids=users, item_ids=items,
                      user_text=user_text)
