"""`RecDataset`: what every model reads, and the leave-one-out split shared by all of them.

Item ids are integers 0..n_items-1, user ids 0..n_users-1; original (external) ids are kept
in `item_ids` / `user_ids`. Sequences are chronological (oldest first).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TEXT_FIELDS = ("title", "description", "brand", "categories")
PAD = -1  # padding value in history matrices


@dataclass
class UserText:
    """One piece of user text: a review or a query, with the item it refers to when known."""

    text: str
    item: int | None = None


@dataclass
class RecDataset:
    name: str
    sequences: list[np.ndarray]
    item_text: dict[str, list[str]]
    user_ids: list[str]
    item_ids: list[str]
    user_text: list[list[UserText]] | None = None
    index: dict[int, list[str]] | None = None  # a given (precomputed) semantic index
    notes: list[str] = field(default_factory=list)  # warnings raised while reading

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def titles(self) -> list[str]:
        return self.item_text["title"]

    def has_user_text(self) -> bool:
        return self.user_text is not None and any(self.user_text)

    def item_text_available(self) -> bool:
        return any(t.strip() for f in TEXT_FIELDS for t in self.item_text[f])


# ---------------------------------------------------------------- leave-one-out split


@dataclass
class EvalSet:
    """One evaluation target per user: `history[u]` (left-padded with PAD) -> `target[u]`."""

    users: np.ndarray  # [n] user ids
    history: np.ndarray  # [n, max_history] item ids, PAD on the left
    target: np.ndarray  # [n] item ids

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class Split:
    """LC-Rec / TTDS leave-one-out: train seq[:-2], valid target seq[-2], test target seq[-1]."""

    train: list[np.ndarray]
    valid: EvalSet
    test: EvalSet
    max_history: int


def pad_left(seqs: list[np.ndarray], length: int) -> np.ndarray:
    out = np.full((len(seqs), length), PAD, dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-length:] if length else s[:0]
        if len(s):
            out[i, length - len(s):] = s
    return out


def leave_one_out(ds: RecDataset, max_history: int = 20) -> Split:
    users = np.arange(ds.n_users)
    for u, s in enumerate(ds.sequences):
        if len(s) < 3:
            raise ValueError(f"user {ds.user_ids[u]} has {len(s)} interactions; leave-one-out needs >= 3")
    train = [s[:-2] for s in ds.sequences]
    valid = EvalSet(users, pad_left(train, max_history), np.array([s[-2] for s in ds.sequences], dtype=np.int64))
    test = EvalSet(
        users,
        pad_left([s[:-1] for s in ds.sequences], max_history),
        np.array([s[-1] for s in ds.sequences], dtype=np.int64),
    )
    return Split(train, valid, test, max_history)


def repeat_rate(sequences: list[np.ndarray], max_history: int) -> float:
    """Share of next-item targets (every position after the first) that repeat one of the `max_history`
    items before them. 0 on the Amazon 5-core sets (no item repeats in a sequence); high on re-purchase data."""
    hits = total = 0
    for s in sequences:
        last: dict[int, int] = {}
        for j, item in enumerate(s.tolist()):
            if j:
                total += 1
                hits += item in last and last[item] >= j - max_history
            last[item] = j
    return hits / total if total else 0.0


# ---------------------------------------------------------------- user text without leaks


def training_user_text(ds: RecDataset, user: int) -> list[UserText]:
    """The user's text that may be used in training: drops text about the valid/test items."""
    if ds.user_text is None:
        return []
    held_out = set(int(i) for i in ds.sequences[user][-2:])
    return [t for t in ds.user_text[user] if t.item is None or t.item not in held_out]


PROFILE_ITEMS = 20  # the items a user profile is made of: the newest training items


def profile_items(ds: RecDataset, user: int, max_items: int = PROFILE_ITEMS) -> list[int]:
    """The items a user profile is made of: the user's last `max_items` *training* items (never seq[-2:])."""
    return [int(i) for i in ds.sequences[user][:-2][-max_items:]]


def profile_text(ds: RecDataset, user: int, max_items: int = PROFILE_ITEMS) -> str:
    """A user profile from the titles of the user's profile items."""
    titles = [ds.item_text["title"][i].strip() for i in profile_items(ds, user, max_items)]
    titles = [t for t in titles if t]
    return "Purchased: " + "; ".join(titles) if titles else ""


def user_texts(ds: RecDataset, user: int, max_items: int = PROFILE_ITEMS) -> list[str]:
    """User text for encoders and tasks: the user's own text when present, else the profile."""
    own = [t.text for t in training_user_text(ds, user) if t.text.strip()]
    if own:
        return own
    prof = profile_text(ds, user, max_items)
    return [prof] if prof else []
