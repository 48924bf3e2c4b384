"""User IDs for item profiles that are not a user's stored profile.

A user tower codes a user from a *profile*: the mean vector of their last `PROFILE_ITEMS` training items
(`ttds.data.dataset.profile_items`, when user vectors come from items). `ProfileIDs` codes any list of items
the same way: the tower's quantiser gives the base codes of the profile's mean item vector; the ID is the
owner's stored ID when those base codes are the owner's, else the base codes with the first disambiguation
code no indexed user holds under them (the rule of a new entity, `ttds.index.collisions.assign_new_id`).

Why (`tasks.user_profile: earlier`, benchmarks/user_id_leak.py): whole-sequence training predicts every item
of a user's training sequence after a prompt that holds the user's ID, and that ID is coded from the same
items, the targets included. A model learns to read the next item from it (on Games, putting the evaluation
target into the profile doubled NDCG@10). With `earlier`, a training example's ID is coded from the items
before its first target only.

Codes are the quantiser's plain nearest codes. A dynamic tower re-assigns its stored codes stickily (an
entity keeps its code unless another is clearly closer); a profile is not coded stickily to its owner's
stored codes, because those came from the full profile and would carry the targets back into the ID.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ttds.data.dataset import PROFILE_ITEMS
from ttds.errors import TTDSError
from ttds.index.base import SemanticIndex


class ProfileIDs:
    """Codes [n, L] of the user index's shape for item profiles (see module doc)."""

    def __init__(self, index: SemanticIndex, quantiser, item_x: torch.Tensor):
        self.index, self.quantiser, self.item_x = index, quantiser, item_x
        self.m = len(quantiser.level_sizes)  # base levels; the index may add a disambiguation level
        self.first_free: dict[tuple, int] = {}
        if index.n_levels > self.m:
            used: dict[tuple, set] = {}
            for row in index.codes.tolist():
                used.setdefault(tuple(row[:self.m]), set()).add(row[self.m])
            for prefix, codes in used.items():
                self.first_free[prefix] = next(c for c in range(len(codes) + 1) if c not in codes)

    @torch.no_grad()
    def codes(self, profiles: Sequence[Sequence[int]], owners: Sequence[int] | None = None) -> np.ndarray:
        """One ID per profile (a non-empty list of item ids; its newest `PROFILE_ITEMS` count); `owners[i]` >= 0
        is the profile's user, whose stored ID is kept when the base codes are theirs."""
        if any(len(p) == 0 for p in profiles):
            raise ValueError("ProfileIDs.codes: empty profile")
        x = torch.stack([self.item_x[torch.as_tensor(list(p)[-PROFILE_ITEMS:], dtype=torch.long)].float().mean(0)
                         for p in profiles]) if len(profiles) else self.item_x.new_zeros(0, self.item_x.shape[1])
        base = self.quantiser.encode(x).cpu().numpy().astype(np.int64)
        out = np.zeros((len(base), self.index.n_levels), dtype=np.int64)
        out[:, :self.m] = base
        stored = self.index.codes
        for i, b in enumerate(base):
            u = -1 if owners is None else int(owners[i])
            if u >= 0 and np.array_equal(b, stored[u, :self.m]):
                out[i] = stored[u]
            elif self.index.n_levels > self.m:
                code = self.first_free.get(tuple(b.tolist()), -1 if self.index.short_ids else 0)  # -1: a short ID
                out[i, self.m] = code if code < self.index.level_sizes[self.m] else 0  # level full: its code 0
        return out


def profile_coding_problem(cfg: dict, ds, user_source: str | None) -> str | None:
    """None when a user tower of kind `user_source` codes any item profile (an RQ-VAE or LSH fitted on item-mean
    user vectors), else why not, for an error line. The one rule behind `tasks.user_profile` (auto and earlier)."""
    from ttds.index.build import index_config, user_vector_source

    if user_source not in ("rqvae", "lsh"):
        return f"needs an RQ-VAE or LSH user tower (index.user_source), this one is {user_source or 'none'}"
    if user_vector_source(ds, index_config(cfg)) != "items":
        return (f"needs user vectors made from items (index.options.user_vectors=items); "
                f"{ds.name} users are coded from their text")
    return None


def item_profile_ids(cfg: dict, ds, index: SemanticIndex, quantiser, item_x: torch.Tensor,
                     user_source: str = "rqvae") -> ProfileIDs:
    """`ProfileIDs` of a user tower fitted on item-mean user vectors; TTDSError when it cannot code item profiles."""
    why = profile_coding_problem(cfg, ds, user_source)
    if why:
        raise TTDSError(f"config tasks.user_profile=earlier: {why}")
    return ProfileIDs(index, quantiser, item_x)


def static_profile_ids(cfg: dict, ds, run_dir: str | Path, index: SemanticIndex, encoder) -> ProfileIDs:
    """`ProfileIDs` of a static user tower saved in run_dir/tokenizer.user (RQ-VAE or LSH, fitted on item-mean
    user vectors); `encoder`: the model that embedded the items for the index (the backbone before training)."""
    from ttds.index.build import encoder_for, index_config, load_index, tower_vectors
    from ttds.io import read_json

    folder = Path(run_dir) / "tokenizer.user"
    kind = read_json(folder / "config.json").get("kind") if (folder / "config.json").is_file() else None
    why = profile_coding_problem(cfg, ds, kind)
    if why:
        raise TTDSError(f"config tasks.user_profile=earlier: {why} ({folder})")
    x, _, _ = tower_vectors(ds, "item", index_config(cfg), encoder_for(encoder, index_config(cfg)))
    return item_profile_ids(cfg, ds, index, load_index(folder)[1], x, kind)
