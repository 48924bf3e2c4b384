"""Dataset statistics (`ttds data stats`)."""
from __future__ import annotations

import numpy as np

from ttds.data.dataset import TEXT_FIELDS, RecDataset


def dataset_stats(ds: RecDataset) -> dict:
    lens = np.array([len(s) for s in ds.sequences]) if ds.sequences else np.zeros(1)
    n_items = max(ds.n_items, 1)
    out = {
        "dataset": ds.name,
        "users": ds.n_users,
        "items": ds.n_items,
        "interactions": ds.n_interactions,
        "mean_seq_len": round(float(lens.mean()), 2),
        "max_seq_len": int(lens.max()),
        "density": round(ds.n_interactions / max(ds.n_users * ds.n_items, 1), 6),
    }
    for f in TEXT_FIELDS:
        out[f"items_with_{f}"] = round(sum(1 for t in ds.item_text[f] if t.strip()) / n_items, 4)
    out["items_with_empty_title"] = sum(1 for t in ds.item_text["title"] if not t.strip())
    with_text = sum(1 for ts in ds.user_text or [] if any(t.text.strip() for t in ts))
    out["users_with_text"] = round(with_text / max(ds.n_users, 1), 4)
    if with_text:
        out["user_text_source"] = "user reviews/queries from the data"
    else:
        out["user_text_source"] = (
            "none in the data: profile built from the titles of each user's training items (seq[:-2])"
            if any(t.strip() for t in ds.item_text["title"])
            else "none (no user text and no item titles to build a profile from)"
        )
    out["given_index"] = ds.index is not None
    return out


def format_stats(stats: dict) -> str:
    width = max(len(k) for k in stats)
    lines = []
    for k, v in stats.items():
        if isinstance(v, int) and not isinstance(v, bool):
            v = f"{v:,}"
        elif isinstance(v, float) and k.startswith(("items_with", "users_with")):
            v = f"{v:.1%}"
        lines.append(f"{k:<{width}}  {v}")
    return "\n".join(lines)
