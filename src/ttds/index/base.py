"""`SemanticIndex`: entity (item or user) -> semantic ID, the one type every index kind produces.

A semantic ID is one code per level, e.g. codes [12, 7, 201, 3] with prefixes a,b,c,d is
`<a_12><b_7><c_201><d_3>`. When colliding IDs are disambiguated, one more level is appended
(prefix `p` for items, `up` for users) holding the order inside the colliding set, and every
entity then has a unique ID. As in the paper, only colliding IDs carry that extra token: an entity
whose codes are its own has -1 ("no token") there, so IDs are 4 or 5 tokens long and no ID is the
prefix of another (`is_unique`). An index where every ID has the extra token (`index.options.disambiguate:
all`, and run folders from before session 16) is the special case without -1. Static (RQ-VAE, LSH,
random, a given LC-Rec file) and dynamic indices all hand the recommender this type.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ttds.errors import TTDSError
from ttds.io import read_json, write_json

ITEM_PREFIXES = ("a", "b", "c", "d", "e", "f", "g", "h")
USER_PREFIXES = ("ua", "ub", "uc", "ud", "ue", "uf", "ug", "uh")
DISAMBIG_PREFIX = {"item": "p", "user": "up"}
_TOKEN = re.compile(r"^<([a-z]+)_(\d+)>$")


def level_prefixes(tower: str, levels: int, disambig: bool) -> list[str]:
    base = ITEM_PREFIXES if tower == "item" else USER_PREFIXES
    if levels > len(base):
        raise TTDSError(f"index levels={levels}: at most {len(base)} levels are supported")
    return list(base[:levels]) + ([DISAMBIG_PREFIX[tower]] if disambig else [])


@dataclass
class SemanticIndex:
    codes: np.ndarray  # [n, L] int64, one code per level (the last may be the disambiguation level, -1 = no token)
    level_sizes: list[int]  # number of codes per level
    prefixes: list[str]  # token prefix per level
    tower: str = "item"  # "item" | "user"

    def __post_init__(self):
        self.codes = np.asarray(self.codes, dtype=np.int64)
        if self.codes.ndim != 2 or self.codes.shape[1] != len(self.level_sizes) or len(self.prefixes) != len(self.level_sizes):
            raise ValueError("SemanticIndex: codes [n, L], level_sizes [L] and prefixes [L] disagree")
        if len(self.codes) and ((self.codes[:, :-1] < 0).any() or (self.codes[:, -1] < -1).any()
                                or (self.codes >= np.asarray(self.level_sizes)).any()):
            raise ValueError("SemanticIndex: a code is outside its level's size (-1, no token, only at the last level)")

    @property
    def n(self) -> int:
        return len(self.codes)

    @property
    def n_levels(self) -> int:
        return len(self.level_sizes)

    def token(self, level: int, code: int) -> str:
        return f"<{self.prefixes[level]}_{int(code)}>"

    @property
    def short_ids(self) -> bool:
        """True when IDs without a collision have no disambiguation token (some code is -1)."""
        return bool(len(self.codes) and (self.codes[:, -1] < 0).any())

    def tokens(self, entity: int) -> list[str]:
        return [self.token(l, c) for l, c in enumerate(self.codes[entity]) if c >= 0]

    def id_string(self, entity: int) -> str:
        return "".join(self.tokens(entity))

    def vocabulary(self) -> list[str]:
        """Every ID token of every level, level by level (what the LM's vocabulary is extended with)."""
        return [self.token(l, c) for l, k in enumerate(self.level_sizes) for c in range(k)]

    def is_unique(self) -> bool:
        """Every ID maps to one entity: no two rows alike, and no short ID (-1 at the end) is the prefix of another."""
        if len(np.unique(self.codes, axis=0)) != self.n:
            return False
        short = self.codes[:, -1] < 0
        if not short.any():
            return True
        heads = np.unique(self.codes[:, :-1], axis=0, return_counts=True)
        count = dict(zip(map(tuple, heads[0].tolist()), heads[1].tolist()))
        return all(count[tuple(r)] == 1 for r in self.codes[short, :-1].tolist())

    def collision_rate(self) -> float:
        """Share of entities whose ID is shared with another entity."""
        if not self.n:
            return 0.0
        _, inverse, counts = np.unique(self.codes, axis=0, return_inverse=True, return_counts=True)
        return float((counts[inverse.ravel()] > 1).mean())

    def lookup(self) -> dict[tuple[int, ...], int]:
        """Full code tuple (without the -1 of a short ID) -> entity (only meaningful when the index is unique)."""
        return {tuple(int(c) for c in row if c >= 0): e for e, row in enumerate(self.codes)}

    # ------------------------------------------------------------ files (LC-Rec index.json format)

    def to_json(self) -> dict:
        return {str(e): self.tokens(e) for e in range(self.n)}

    def save(self, path: str | Path) -> None:
        """LC-Rec-compatible `{"<id>": ["<a_1>", ...]}` plus a sidecar with level sizes (atomic)."""
        path = Path(path)
        write_json(path, self.to_json(), None)
        write_json(path.with_suffix(".meta.json"), {"level_sizes": self.level_sizes, "prefixes": self.prefixes, "tower": self.tower})

    @classmethod
    def from_tokens(cls, mapping: dict, tower: str = "item", source: str = "index") -> "SemanticIndex":
        """Parse `{"<id>": ["<a_1>", "<b_2>", ...]}` (LC-Rec format). Ids must be 0..n-1. An ID may lack the
        last level's token (a short ID of an index that disambiguates colliding IDs only)."""
        n = len(mapping)
        rows: list[list[int]] = [None] * n  # type: ignore[list-item]
        prefixes: list[str] | None = None
        longest = max((toks for toks in mapping.values() if isinstance(toks, list)), key=len, default=[])
        for key, toks in mapping.items():
            try:
                e = int(key)
            except ValueError:
                raise TTDSError(f"{source}: key {key!r}: expected an integer id") from None
            if not 0 <= e < n:
                raise TTDSError(f"{source}: key {key!r}: ids must be 0..{n - 1}")
            parsed = []
            for t in toks:
                m = _TOKEN.match(t) if isinstance(t, str) else None
                if not m:
                    raise TTDSError(f"{source}: entity {key}: token {t!r}: expected the form <x_12>")
                parsed.append((m.group(1), int(m.group(2))))
            pre = [p for p, _ in parsed]
            if prefixes is None:
                prefixes = [_TOKEN.match(t).group(1) for t in longest if isinstance(t, str) and _TOKEN.match(t)]
            short_ok = bool(prefixes) and prefixes[-1] in DISAMBIG_PREFIX.values()  # only the disambiguation token may be absent
            if pre != prefixes and not (short_ok and pre == prefixes[:-1]):
                if len(pre) != len(prefixes) and not (short_ok and len(pre) == len(prefixes) - 1):
                    raise TTDSError(f"{source}: entity {key}: {len(pre)} levels, expected {len(prefixes)}")
                raise TTDSError(f"{source}: entity {key}: token prefixes {pre} differ from {prefixes}")
            rows[e] = [c for _, c in parsed] + [-1] * (len(prefixes) - len(pre))
        codes = np.asarray(rows, dtype=np.int64).reshape(n, len(prefixes or []))
        sizes = [max(1, int(codes[:, l].max()) + 1) if n else 0 for l in range(codes.shape[1])]
        return cls(codes, sizes, list(prefixes or []), tower)

    @classmethod
    def load(cls, path: str | Path, tower: str = "item") -> "SemanticIndex":
        path = Path(path)
        idx = cls.from_tokens(read_json(path), tower, str(path))
        meta = path.with_suffix(".meta.json")
        if meta.is_file():
            m = read_json(meta)
            sizes, prefixes = m.get("level_sizes"), m.get("prefixes")
            if (isinstance(prefixes, list) and len(prefixes) == idx.n_levels + 1 and prefixes[:-1] == idx.prefixes
                    and prefixes[-1] in DISAMBIG_PREFIX.values()):  # no ID collided: every one is short
                idx = cls(np.hstack([idx.codes, np.full((idx.n, 1), -1)]), idx.level_sizes + [1], prefixes, idx.tower)
            if not (isinstance(sizes, list) and len(sizes) == idx.n_levels and all(s >= k for s, k in zip(sizes, idx.level_sizes))):
                raise TTDSError(f"{meta}: key 'level_sizes': expected {idx.n_levels} sizes covering the codes in {path.name}")
            idx = cls(idx.codes, [int(s) for s in sizes], idx.prefixes, m.get("tower", tower))
        return idx
