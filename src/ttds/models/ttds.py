"""TTDS: the generative recommender with *dynamic* twin-tower tokenizers (Yin et al., WWW 2025, §4.2).

    text C --backbone f--> X = f(C) --tokenizer (RQ-VAE encoder + residual codebooks)--> codes --> semantic IDs
    ID token embeddings  E_l = P_tower(codebook_l) + R_l    (projected codebook vectors + free rows)
    L_all = L_LLM + alpha * L_DM-VAE,   L_DM-VAE = L_ID + beta * L_Token                  (eq. 12-15)

How the recommendation loss reaches the tokenizers (the design choice of this implementation):
  * The embedding of `<b_7>` (item tower, level 1, code 7) is `P_item(codebook_1[7]) + R[<b_7>]`: a
    linear projection of the RQ-VAE code vector into the backbone's width plus a free row of
    `GenerativeRecommender.id_emb` (`dynamic.id_rows`; false = the projection only). At the start
    (`dynamic.id_init`) either the free rows are zero, so E = P(codebook) (`projected`), or they are
    random like TTSS's rows and P is zero (`random`; P and the codebooks then learn from there). It is
    used both as the input embedding and as the tied output row of the ID-only head
    (`GenerativeRecommender.id_table`). With P non-zero, every gradient of L_LLM on an ID token therefore lands on a
    codebook vector (and on P); the free row gives the ID tokens the same freedom as in the static
    twin (TTSS), whose rows are all free, so the comparison measures the dynamic index, not a
    constrained embedding. Levels without a codebook (the disambiguation level that makes IDs unique,
    and every level of an LSH index) have only their free rows.
  * L_ID pulls the backbone's representation of an entity's ID sequence (mean of the last hidden
    states over its ID tokens), decoded by a linear head, towards that entity's text representation X_e
    (cosine distance, each centred on its own mean so that a common direction cannot satisfy it). Its
    gradient reaches the backbone and, through the tied embeddings, the codebooks.
  * L_Token is the per-level residual term of the RQ-VAE (codebook + commitment) plus the tokenizer's
    reconstruction, computed on X_e; it trains the tokenizer's encoder and keeps the codebooks on the
    encoder's residuals (`TowerTokenizer.token_loss` says why the reconstruction is needed).
  * Re-assignment is sticky (`dynamic.reassign_margin`): an entity keeps its code at a level unless
    another code is closer by more than the margin, so IDs change where the tokenizer moved, not
    where two codes were already near-ties.
  * X = f(C) comes from the run's own backbone. With `dynamic.refresh_text` it is re-encoded with the
    *current* (fine-tuned) backbone at every code re-assignment (the paper's wording), so the tokenizers
    quantise the representation the recommender learns; off by default, because that drift moved about
    30 % of the IDs per re-assignment and cost what the LM had learned about them (README, "TTDS").
    Codes are argmins, so no gradient crosses the assignment itself; the re-assignment does.

`TowerTokenizer` is one tower (items or users); `TTDSRecommender` is the recommender with the towers
inside (their parameters are model parameters: trained by the same optimizer, saved in the same
checkpoint). The current codes are buffers of the model, so a checkpoint carries its own index.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ttds.errors import TTDSError
from ttds.index import collisions
from ttds.index.base import SemanticIndex, level_prefixes
from ttds.index.rqvae import RQVAE
from ttds.models.generative import GenerativeRecommender

log = logging.getLogger(__name__)

ID_INITS = ("projected", "random")  # `dynamic.id_init`: how the ID embeddings start (TTDSRecommender)


def level_scaled(codebook: torch.Tensor) -> torch.Tensor:
    """A codebook level over its RMS, the RMS a constant of the step (`dynamic.level_norm`)."""
    return codebook / codebook.detach().pow(2).mean().sqrt().clamp_min(1e-8)


class TowerTokenizer(nn.Module):
    """One tower: its tokenizer module (RQ-VAE, or LSH without parameters), the text representation
    X of every entity (a buffer refreshed with the backbone), and the codebook -> ID-embedding
    projection. The disambiguation level has a fixed capacity so the token space never changes."""

    def __init__(self, tower: str, tokenizer: nn.Module, x: torch.Tensor, d_model: int, collision: str = "ttds",
                 capacity: int = 64, word_std: float = 0.05, text_head: bool = True, behaviour: bool = False,
                 only_colliding: bool = True, level_norm: bool = False):
        super().__init__()
        self.tower, self.collision, self.only_colliding = tower, collision, only_colliding
        self.tokenizer = tokenizer
        self.register_buffer("x", x.float().clone())
        if behaviour:  # `dynamic.behaviour_weight` > 0: the LM states that predicted each entity since the last re-assignment
            if x.shape[1] != d_model:
                raise TTDSError(f"dynamic.behaviour_weight: the {tower} text vectors have {x.shape[1]} dims, the LM states "
                                f"{d_model}; fusing them needs X = f(C) from the backbone itself (index.options.encoder empty)")
            self.register_buffer("behaviour_sum", torch.zeros(len(x), d_model))
            self.register_buffer("behaviour_count", torch.zeros(len(x)))
        self.register_buffer("disambig_size", torch.tensor(int(capacity)))  # saved: fixes the token space
        self.has_codebooks = isinstance(tokenizer, RQVAE)
        self.n_code_levels = len(tokenizer.level_sizes)
        if text_head:  # L_ID's decoder: ID representation (backbone width) -> text representation X
            self.text_head = nn.Linear(d_model, x.shape[1], bias=False)
            with torch.no_grad():
                self.text_head.weight.copy_(torch.eye(x.shape[1], d_model))
        else:  # checkpoints from before the head existed compare h with X directly
            self.text_head = nn.Identity()
        if self.has_codebooks:
            if level_norm:  # saved, so a checkpoint rebuilds the same table (older checkpoints: raw codebooks)
                self.register_buffer("level_norm", torch.ones((), dtype=torch.bool))
            self.proj = nn.Linear(tokenizer.cfg.code_dim, d_model, bias=False)
            with torch.no_grad():  # start at the scale of the word embeddings
                out = self.proj(torch.cat([self.proj_input(lv) for lv in range(self.n_code_levels)]))
                self.proj.weight.mul_(word_std / out.std().clamp_min(1e-8))

    @property
    def n(self) -> int:
        return len(self.x)

    @property
    def capacity(self) -> int:
        return int(self.disambig_size)

    @property
    def level_sizes(self) -> list[int]:
        return list(self.tokenizer.level_sizes) + ([self.capacity] if self.collision != "none" else [])

    def proj_input(self, level: int) -> torch.Tensor:
        """[K, code_dim] what the projection P sees of a level's codebook: the code vectors, or with
        `dynamic.level_norm` the code vectors over the level's RMS (no gradient through the RMS). Residual levels
        shrink (SmolLM2-L10 on Scientific: RMS 0.44 / 0.17 / 0.08 / 0.04 at levels 0-3), so without it the deepest
        level's ID embeddings start 10x smaller than the first's; with it every level starts at the word scale."""
        cb = self.tokenizer.codebooks[level]
        return level_scaled(cb) if hasattr(self, "level_norm") else cb

    def level_embeddings(self, level: int) -> torch.Tensor | None:
        """[K, d] embeddings of a level's ID tokens, or None for a level without a codebook."""
        if self.has_codebooks and level < self.n_code_levels:
            return self.proj(self.proj_input(level))
        return None

    @torch.no_grad()
    def set_text(self, x: torch.Tensor) -> None:
        """New X (re-encoded by the current backbone). The tokenizer's input statistics follow it
        (RQ-VAE standardisation, LSH centre): the mean-pooled states of a fine-tuned LM share a growing
        common component, and without re-centring every entity ends up on the same codes."""
        self.x.copy_(x.to(self.x.device))
        if self.has_codebooks:
            self.tokenizer.set_input_stats(self.x)
        else:
            self.tokenizer.fit(self.x)

    @property
    def has_behaviour(self) -> bool:
        return hasattr(self, "behaviour_sum")

    @torch.no_grad()
    def fuse_behaviour(self, x_text: torch.Tensor, weight: float) -> torch.Tensor:
        """The tokenizer's input after a re-assignment with `dynamic.behaviour_weight` = w: each entity's text
        vector plus w x the mean (centred) LM state that predicted its ID since the last re-assignment, scaled to
        the text vectors' RMS; an entity never predicted keeps its text vector. The sums restart at zero."""
        out = x_text.float().clone()
        n = self.behaviour_count.to(out.device)
        seen = n > 0
        if weight > 0 and seen.any():
            b = self.behaviour_sum.to(out.device)[seen] / n[seen, None]
            b = b - b.mean(0)
            xt = out - out.mean(0)
            scale = xt.pow(2).sum(1).mean().sqrt() / b.pow(2).sum(1).mean().sqrt().clamp_min(1e-8)
            out[seen] += weight * scale * b
        self.behaviour_sum.zero_()
        self.behaviour_count.zero_()
        return out

    # ------------------------------------------------------------------ losses

    def token_loss(self, entities: torch.Tensor) -> torch.Tensor:
        """L_Token on X_e: the per-level residual terms sum_l ||sg(r_l) - c_l||^2 + beta_c ||r_l - sg(c_l)||^2
        plus the tokenizer's own reconstruction MSE. Without the reconstruction the commitment terms alone
        pull every z towards its level-0 code (their gradient on z is the sum of the later residuals):
        continuing a fitted tokenizer on them for 390 steps moved z by 0.95 of |r_1| and changed 93 % of
        level-1 codes; with the reconstruction, 0.26 and 23 % (Scientific items,
        benchmarks/tokenizer_drift.py)."""
        if not self.has_codebooks:
            return self.x.new_zeros(())
        return self.tokenizer(self.x[entities]).loss

    # ------------------------------------------------------------------ assignment

    @torch.no_grad()
    def resolved_codes(self, current: np.ndarray | None = None, margin: float = 0.0) -> np.ndarray:
        """Codes of every entity from the current X and tokenizer, collisions resolved [n, L(+1)].
        `current` (the codes in use) with `margin` > 0 makes the assignment sticky (`RQVAE.encode`)."""
        was = self.training
        self.eval()
        if current is not None and margin > 0 and self.has_codebooks:
            keep = torch.as_tensor(np.asarray(current)[:, :self.n_code_levels], device=self.x.device)
            raw = self.tokenizer.encode(self.x, keep=keep, margin=margin).cpu().numpy()
        else:
            raw = self.tokenizer.encode(self.x).cpu().numpy()
        dist = self.tokenizer.last_level_distances(self.x) if (self.collision == "lcrec" and self.has_codebooks) else None
        self.train(was)
        return collisions.resolve(raw, self.collision, dist, only_colliding=self.only_colliding)

    @torch.no_grad()
    def assign(self, current: np.ndarray | None = None, margin: float = 0.0) -> SemanticIndex | None:
        """Fresh codes for every entity, as a SemanticIndex in the fixed token space (sticky to `current`
        by `margin`, see `resolved_codes`). None when a colliding set does not fit the disambiguation level."""
        final = self.resolved_codes(current, margin)
        if self.collision != "none" and len(final) and int(final[:, -1].max()) >= self.capacity:
            log.warning("%s tower: a colliding set of %d entities exceeds the disambiguation capacity %d; codes kept",
                        self.tower, int(final[:, -1].max()) + 1, self.capacity)
            return None
        return SemanticIndex(final, list(self.level_sizes),
                             level_prefixes(self.tower, self.n_code_levels, self.collision != "none"), self.tower)


class TTDSRecommender(GenerativeRecommender):
    """`GenerativeRecommender` whose ID embeddings come from the towers' codebooks (see module doc)."""

    def __init__(self, backbone, item_index: SemanticIndex, user_index: SemanticIndex | None,
                 towers: dict[str, TowerTokenizer], max_text_tokens: int = 32, free_rows: bool = True,
                 id_init: str = "projected", prompt: str = "instruction"):
        super().__init__(backbone, item_index, user_index, max_text_tokens=max_text_tokens, prompt=prompt)
        self.towers = nn.ModuleDict(towers)
        self.free_rows = free_rows
        if free_rows:  # saved, so a checkpoint rebuilds the same table (older checkpoints: projection only)
            self.register_buffer("id_rows", torch.ones((), dtype=torch.bool))
            with torch.no_grad():
                for g, (tower, level, k) in enumerate(self.groups):
                    if tower in self.towers and self.towers[tower].level_embeddings(level) is not None:
                        self.id_emb[self.offsets[g]:self.offsets[g] + k] = 0
        self.register_buffer("item_codes", torch.as_tensor(item_index.codes))
        if user_index is not None:
            self.register_buffer("user_codes", torch.as_tensor(user_index.codes))
        self.id_embedding_provider = self._projected_table
        self._cache: tuple | None = None
        if id_init == "random":  # start as TTSS does: random free rows (word-embedding std), P = 0 (still trained)
            # (re-drawn rather than skipping the zeroing above: the draw that sessions 17-18's figures were made with)
            with torch.no_grad():
                self.id_emb.normal_(0.0, float(backbone.hf_model.get_input_embeddings().weight.std()))
                for t in self.towers.values():
                    if t.has_codebooks:
                        t.proj.weight.zero_()

    # ------------------------------------------------------------------ ID embeddings

    def _projected_table(self) -> torch.Tensor:
        """[n_id_tokens, d]: projected codebooks (+ free rows) where a level has one, free rows elsewhere.
        Without grad (beam search) the table is cached until a parameter changes in place."""
        params = [self.id_emb] + [p for t in self.towers.values() for p in t.parameters()]
        key = tuple(p._version for p in params)
        if not torch.is_grad_enabled() and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        parts = []
        for g, (tower, level, k) in enumerate(self.groups):
            e = self.towers[tower].level_embeddings(level) if tower in self.towers else None
            s = self.offsets[g]
            if e is None:
                parts.append(self.id_emb[s:s + k])
            else:
                parts.append(e.to(self.id_emb.dtype) + self.id_emb[s:s + k] if self.free_rows else e.to(self.id_emb.dtype))
        table = torch.cat(parts)
        self._cache = (key, table.detach()) if not torch.is_grad_enabled() else None
        return table

    # ------------------------------------------------------------------ index

    def set_index(self, item_index: SemanticIndex, user_index: SemanticIndex | None = None) -> None:
        super().set_index(item_index, user_index)
        if hasattr(self, "item_codes"):  # keep the buffers (what checkpoints carry) in step
            self.item_codes = torch.as_tensor(item_index.codes, device=self.item_codes.device)
            if user_index is not None:
                self.user_codes = torch.as_tensor(user_index.codes, device=self.user_codes.device)

    def add_item_vector(self, x: torch.Tensor) -> int:
        """A new item (serving, see `GenerativeRecommender.add_item`): its codes come from the item tower's
        tokenizer applied to X = f(C) of the served backbone; the tower keeps that X, so a later
        re-assignment includes the item."""
        item = super().add_item_vector(x)
        t = self.towers["item"]
        t.x = torch.cat([t.x, x.to(t.x)])
        return item

    def index_from_buffers(self) -> None:
        """After loading weights: re-install the index the checkpoint carries."""
        def idx(tower, codes):
            t = self.towers[tower]
            return SemanticIndex(codes.cpu().numpy(), t.level_sizes,
                                 level_prefixes(tower, t.n_code_levels, t.collision != "none"), tower)
        self.set_index(idx("item", self.item_codes), idx("user", self.user_codes) if self.user_index is not None else None)

    @torch.no_grad()
    def reassign(self, margin: float = 0.0, apply: bool = True) -> dict:
        """Re-assign the codes of every entity of every tower (sticky by `margin`, collisions re-resolved,
        tries and prompt codec rebuilt). Returns per tower the share of entities whose ID changed and,
        as `<tower>_levels`, the share whose code changed at each level. `apply=False` only measures
        (the codes in use stay)."""
        new, changed = {}, {}
        for tower in ("item", "user"):
            old = self.item_index if tower == "item" else self.user_index
            if old is None or tower not in self.towers:
                new[tower] = old
                continue
            idx = self.towers[tower].assign(old.codes, margin)
            if idx is None:
                new[tower], changed[tower] = old, 0.0
                continue
            new[tower] = idx
            diff = idx.codes != old.codes
            changed[tower] = float(diff.any(1).mean())
            changed[f"{tower}_levels"] = [round(float(v), 4) for v in diff.mean(0)]
        if apply:
            self.set_index(new["item"], new["user"])
        return changed

    @torch.no_grad()
    def record_target_states(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """`target_state_hook` of `loss()` (`dynamic.behaviour_weight`): adds the transformed state at each position
        that predicts the first ID token of an entity of a tower with behaviour sums to that entity's sum. `z` [N, d]
        and `y` [N] are the labelled positions in order, so an ID's L tokens (L - 1 for a short ID) are consecutive
        targets."""
        yid = y - self.n_words
        groups = self.token_group[yid.clamp(min=0)]
        for tower, t in self.towers.items():
            if not t.has_behaviour:
                continue
            g0 = 0 if tower == "item" else self.user_group0
            L = len(t.level_sizes)
            start = torch.nonzero((yid >= 0) & (groups == g0)).squeeze(1)
            if not len(start):
                continue
            raw = start.unsqueeze(1) + torch.arange(L, device=y.device)
            pos = raw.clamp(max=len(y) - 1)
            tok = yid[pos]
            match = (raw < len(y)) & (tok >= 0) & (groups[pos] == torch.arange(g0, g0 + L, device=y.device))
            n_tok = match.long().cumprod(1).sum(1)  # the ID's tokens: its L levels, or L - 1 for a short ID
            codes = tok - torch.as_tensor(self.offsets[g0:g0 + L], device=y.device)
            codes = torch.where(torch.arange(L, device=y.device) < n_tok.unsqueeze(1), codes, torch.full_like(codes, -1))
            ent = (self.trie if tower == "item" else self.user_trie).entities(codes)
            ok = (n_tok >= L - 1) & (ent >= 0)
            t.behaviour_sum.index_add_(0, ent[ok], z[start[ok]].float())
            t.behaviour_count.index_add_(0, ent[ok], torch.ones(int(ok.sum()), device=z.device))

    # ------------------------------------------------------------------ DM-VAE

    def id_representation(self, tower: str, entities: torch.Tensor) -> torch.Tensor:
        """Backbone's representation of the entities' ID token sequences: mean of the last hidden
        states over the ID tokens of "[BOS] <a_.><b_.>..." (one short causal forward), [B, d]."""
        codes = self.item_codes if tower == "item" else self.user_codes
        ids = torch.as_tensor(self.id_tokens(tower, codes[entities].cpu().numpy()), device=entities.device)
        bos = self.codec.bos
        if bos:
            ids = torch.cat([ids.new_full((len(ids), 1), bos[0]), ids], 1)
        attn = (ids >= 0).long()  # a short ID's missing last token: right padding, masked and left out of the mean
        h = self.hidden(ids.clamp(min=0), attn, torch.arange(ids.shape[1], device=ids.device).expand_as(ids))
        w = attn[:, len(bos):].unsqueeze(2).to(h.dtype)
        return (h[:, len(bos):] * w).sum(1) / w.sum(1)

    def dm_vae_loss(self, entities: dict[str, torch.Tensor], beta: float,
                    sample: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
        """L_DM-VAE = L_ID + beta * L_Token over a sample of entities per tower (eq. 12-14).

        L_ID = 1 - cos(W (h_e - mean h), X_e - mean X): the ID representation, centred on its mean over the
        whole `sample` (no gradient through that mean; under torchrun `entities` is this rank's part of
        the sample, so every rank centres alike), decoded by the tower's linear `text_head` W (starts at
        the identity), against the centred text representation. A shared direction cannot satisfy it.
        Without W (h compared with X directly, both in the backbone's space) the LM objective drove
        L_ID from 0.98 at the start to 1.87 (anti-aligned) within 20 warm-up steps on Scientific, and
        session 2's run (no W, h centred on the mean X) only got back to ~1.0 (no alignment) by step 340.
        With W it still rises early (1.72 at step 20) but reaches 0.92 by step 320 and 0.65 by step 661:
        the decoder lets the ID states keep the LM's geometry while carrying the text's information."""
        l_id = l_tok = self.id_emb.new_zeros(())
        for tower, ents in entities.items():
            t = self.towers[tower]
            h = self.id_representation(tower, ents)
            full = None if sample is None else sample.get(tower)
            if full is None or torch.equal(full, ents):
                h_mean = h.detach().mean(0)
            else:
                with torch.no_grad():
                    h_mean = self.id_representation(tower, full).mean(0)
            l_id = l_id + (1 - F.cosine_similarity(t.text_head(h - h_mean), t.x[ents] - t.x.mean(0), dim=-1)).mean()
            if beta:
                l_tok = l_tok + t.token_loss(ents)
        return l_id + beta * l_tok, {"l_id": float(l_id.detach()), "l_token": float(l_tok.detach())}
