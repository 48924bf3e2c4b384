"""Trie-constrained beam search over semantic IDs, batched across users AND beams.

For a batch of B prompts: the prompt runs once (left-padded, one forward, KV cache kept) and the
level-0 scores come from its last position. The cache is NOT copied per beam: each later level is
one forward of the W current beams' newest tokens *per user* (B x W tokens), appended to the same
B-row cache, with a 4D attention mask ("tree attention") that lets a beam's token see the prompt,
its own ancestors' tokens and itself only. Positions are the prompt length + level, as if each beam
were its own sequence, so results equal per-beam decoding exactly while memory traffic stays that
of B sequences (expanding the cache to B x W rows and re-ordering it every level was 80 % of the
time on MiniLM). At every level the ID-only head gives log-probabilities over that level's K_l tokens
(normalised before the mask, like HF `generate`, which masks after its log-softmax), the trie's
allowed-codes mask sets invalid codes to -inf, and the best W of the W x K_l candidates per user
survive. Distinct beams are distinct trie paths, so the k returned items are valid and unique.

Three savings that do not change any score:
- Shared prefix. The prompts of a call usually start with the same tokens (the instruction before
  the user's ID). Their keys/values depend only on those tokens and their positions (causal
  attention), so `shared_prefix` computes them ONCE per call; each micro-batch starts its cache with
  them and runs only the user-specific rest, laid out [prefix | left padding | rest] with the padding
  masked and positions continuing after the prefix.
- Reserved cache. HF's `DynamicCache` re-concatenates the whole cache at every level; `_ReservedLayer`
  writes each level's keys/values into a buffer sized for prompt + all levels (the concatenation was
  12 % of the profiled time; end to end this one's gain was within the noise of the shared machine).
- Last level. Only the top k (< beam) are returned, a child never scores above its parent and beams
  are sorted: after the best k beams' children, the beams scoring below the k-th best child cannot
  enter the top k and are not fed (with a trained model: ~9 of the 10 beams past the k-th).
"""
from __future__ import annotations

import numpy as np
import torch

from transformers.cache_utils import DynamicCache, DynamicLayer

from ttds.index.trie import IDTrie


def left_pad(prompts: list[np.ndarray], pad: int = 0, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.as_tensor(p)
        mask[i, P - len(p):] = 1
    return ids.to(device), mask.to(device)


class _ReservedLayer(DynamicLayer):
    """A `DynamicLayer` that writes new keys/values into a buffer of `capacity` positions instead of
    concatenating the whole cache at every step; `keys`/`values` are views of the filled part. It can
    start with a shared prefix's keys/values ([1, H, S, D], broadcast to the batch)."""

    def __init__(self, capacity: int, prefix: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.capacity, self.prefix, self.n = capacity, prefix, 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            B, H, _, D = key_states.shape
            self.kbuf = key_states.new_empty(B, H, self.capacity, D)
            self.vbuf = value_states.new_empty(B, H, self.capacity, D)
        n = self.n + key_states.shape[-2]
        if n > self.capacity:
            raise RuntimeError(f"reserved KV cache: {n} positions > capacity {self.capacity}")
        self.kbuf[:, :, self.n:n], self.vbuf[:, :, self.n:n] = key_states, value_states
        self.n = n
        self.keys, self.values = self.kbuf[:, :, :n], self.vbuf[:, :, :n]
        return self.keys, self.values

    def start(self, batch: int) -> None:
        """Fill the first S positions with the shared prefix for a batch of `batch` rows."""
        k, v = self.prefix
        self.lazy_initialization(k, v)
        self.kbuf = k.new_empty(batch, k.shape[1], self.capacity, k.shape[3])
        self.vbuf = v.new_empty(batch, v.shape[1], self.capacity, v.shape[3])
        self.n = 0
        self.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))


def _reserved_cache(capacity: int, batch: int, prefix_kv: list | None = None) -> DynamicCache:
    cache = DynamicCache()
    if prefix_kv is None:
        cache.layer_class_to_replicate = lambda: _ReservedLayer(capacity)
    else:
        cache.layer_class_to_replicate = None
        cache.layers = [_ReservedLayer(capacity, kv) for kv in prefix_kv]
        for layer in cache.layers:
            layer.start(batch)
    return cache


def common_prefix_length(prompts: list[np.ndarray]) -> int:
    """Length of the longest common prefix of all prompts, leaving every prompt at least one own token
    (the last position's hidden state gives the first level's scores)."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        if n <= 0:
            break
        diff = np.flatnonzero(p[:n] != first[:n])
        n = int(diff[0]) if len(diff) else n
    return max(n, 0)


@torch.no_grad()
def shared_prefix(model, prompts: list[np.ndarray], min_length: int = 2):
    """(S, per-layer [(keys, values)] of shape [1, H, S, D]) of the prompts' common first S tokens,
    or None when they share fewer than `min_length` tokens."""
    S = common_prefix_length(prompts)
    if S < min_length:
        return None
    device = model.id_bias.device
    ids = torch.as_tensor(prompts[0][:S], device=device).unsqueeze(0)
    _, cache = model.hidden(ids, torch.ones_like(ids), torch.arange(S, device=device).unsqueeze(0), use_cache=True)
    return S, [(layer.keys, layer.values) for layer in cache.layers]


@torch.no_grad()
def beam_search(model, prompts: list[np.ndarray], trie: IDTrie, group0: int, beam: int = 20, k: int = 10,
                prefix=None, prune_last: bool = True, exclude: list | None = None):
    """One batch. Returns (entities [B, k] long, -1 = none; log-prob scores [B, k]). `prefix`: the
    prompts' shared first tokens' keys/values from `shared_prefix` (None: run the whole prompts).
    `prune_last`: at the last level skip the beams that cannot reach the top k (same results).
    `exclude`: per prompt, entities that must not come out (serving: the user's own items); the trie
    masks every prefix that leads only to them, so no beam is spent on them and k others come out."""
    device = model.id_bias.device
    S = prefix[0] if prefix is not None else 0
    ids, attn = left_pad([p[S:] for p in prompts], device=device)
    B, P = ids.shape
    pos = S + (attn.cumsum(1) - 1).clamp(min=0)
    capacity = S + P + beam * (trie.n_levels - 1)
    cache = _reserved_cache(capacity, B, prefix[1] if prefix is not None else None)
    if S:
        attn = torch.cat([attn.new_ones(B, S), attn], 1)  # [prefix | padding | own tokens]
        P += S
    h, cache = model.hidden(ids, attn, pos, cache=cache, use_cache=True)
    logp = torch.log_softmax(model.level_logits(h[:, -1], group0).float(), -1)
    node = trie.root(B)
    excl = trie.excluded(exclude) if exclude is not None else None
    brow = torch.arange(B, device=device)
    logp = logp.masked_fill(~trie.allowed(node, 0, brow, excl), float("-inf"))
    W = min(beam, logp.shape[1])
    score, code = logp.topk(W, dim=1)  # [B, W]
    node = trie.step(node.repeat_interleave(W), code.reshape(-1), 0)
    prompt_mask = attn.bool()  # [B, P]
    anc = torch.zeros(B, W, 0, dtype=torch.long, device=device)  # cache slots of each beam's earlier tokens
    cur = P  # cache length
    rows = torch.arange(B, device=device).unsqueeze(1)

    def level(t: int, sel: torch.Tensor) -> torch.Tensor:
        """Feed the level t-1 tokens of beams `sel` [B, n] (row b's j-th to cache slot cur + j); returns their
        children's scores [B, n, K_t] (parent score + masked log-prob)."""
        nonlocal cache, cur
        n = sel.shape[1]
        tok = model.n_words + model.offsets[group0 + t - 1] + code.gather(1, sel)  # [B, n]
        allowed = torch.zeros(B, n, cur + n, dtype=torch.bool, device=device)
        allowed[:, :, :P] = prompt_mask.unsqueeze(1)
        allowed.scatter_(2, anc.gather(1, sel.unsqueeze(2).expand(-1, -1, anc.shape[2])), True)
        allowed[:, torch.arange(n, device=device), cur + torch.arange(n, device=device)] = True
        h, cache = model.hidden(tok, allowed.unsqueeze(1), (pos[:, -1:] + t).expand(B, n), cache=cache, use_cache=True)
        cur += n
        logp = torch.log_softmax(model.level_logits(h, group0 + t).float(), -1)  # [B, n, K]
        ok = trie.allowed(node.view(B, W).gather(1, sel).reshape(-1), t, brow.repeat_interleave(n), excl)
        logp = logp.masked_fill(~ok.view(B, n, -1), float("-inf"))
        return score.gather(1, sel).unsqueeze(2) + logp

    done = torch.full((B, W), -1, dtype=torch.long, device=device)  # entity of a beam whose (short) ID ended
    for t in range(1, trie.n_levels):
        base = cur  # cache slot of the first fed beam's token of this level
        K = trie.level_sizes[t]
        # a short ID (no disambiguation token) ends at its node of depth t: that beam has no children, is not fed,
        # and competes with its own score ("stay"); only the last level holds short IDs (SemanticIndex)
        ends = trie.ends(node, t).view(B, W)
        finished = ends >= 0
        stay = torch.where(finished, score, torch.full_like(score, float("-inf")))
        ar = torch.arange(W, device=device).expand(B, W)
        order = torch.where(finished, ar + W, ar).argsort(1)  # per row: open beams first, each group in score order
        n_open = int((~finished).sum(1).max())
        if prune_last and t == trie.n_levels - 1 and k < W:
            # last level, only the top k are returned: beams are sorted by score and a child never scores
            # above its parent, so after the best k open beams, a beam scoring below the k-th best candidate so
            # far cannot reach the top k: feed only the beams that can (usually none or a few)
            first = min(k, n_open)
            sel = order[:, :first]
            c = level(t, sel) if first else score.new_zeros(B, 0, K)
            kth = torch.cat([c.reshape(B, -1), stay], 1).topk(k, dim=1).values[:, -1:]
            rest = order[:, first:n_open]
            m = int(((score.gather(1, rest) >= kth) & ~finished.gather(1, rest)).sum(1).max()) if rest.shape[1] else 0
            if m:
                sel = torch.cat([sel, rest[:, :m]], 1)
                c = torch.cat([c, level(t, rest[:, :m])], 1)
        else:
            sel = order[:, :n_open]
            c = level(t, sel) if n_open else score.new_zeros(B, 0, K)
        n = sel.shape[1]
        cand = torch.cat([c.reshape(B, n * K), stay], 1)  # children of the fed beams, then every beam's "stay"
        W2 = min(beam, n * K + (W if bool(finished.any()) else 0))
        score, flat = cand.topk(W2, dim=1)
        child = flat < n * K
        parent = torch.where(child, sel.gather(1, (flat // K).clamp(max=max(n - 1, 0))) if n else flat, flat - n * K)
        code = torch.where(child, flat % K, torch.zeros_like(flat))
        done = torch.where(child, torch.full_like(flat, -1), ends.gather(1, parent))
        slot = torch.where(child, base + flat // K, torch.zeros_like(flat))  # cache slot of the new token
        anc = torch.cat([anc.gather(1, parent.unsqueeze(2).expand(-1, -1, anc.shape[2])), slot.unsqueeze(2)], 2)
        node = trie.step(node[(rows * W + parent).reshape(-1)], code.reshape(-1), t)
        node = node.masked_fill(~child.reshape(-1), -1)
        W = W2
    ent = torch.where(done >= 0, done, trie.ends(node, trie.n_levels).view(B, W))
    ent = ent.masked_fill(~torch.isfinite(score), -1)
    if W < k:
        ent = torch.cat([ent, ent.new_full((B, k - W), -1)], 1)
        score = torch.cat([score, score.new_full((B, k - W), float("-inf"))], 1)
    return ent[:, :k], score[:, :k]


@torch.no_grad()
def beam_search_prompts(model, prompts: list[np.ndarray], trie: IDTrie, group0: int, beam: int = 20, k: int = 10,
                        batch: int = 32, exclude: list | None = None):
    """Many prompts: sorted by length into micro-batches of `batch` (little padding), original order kept;
    their common prefix is run once for all (`shared_prefix`). `exclude`: per prompt (see `beam_search`)."""
    order = np.argsort([len(p) for p in prompts], kind="stable")
    prefix = shared_prefix(model, prompts) if len(prompts) > 1 else None
    ents, scores = torch.full((len(prompts), k), -1, dtype=torch.long), torch.full((len(prompts), k), float("-inf"))
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        e, sc = beam_search(model, [prompts[i] for i in idx], trie, group0, beam, k, prefix,
                            exclude=None if exclude is None else [exclude[i] for i in idx])
        ents[torch.as_tensor(idx)], scores[torch.as_tensor(idx)] = e.cpu(), sc.cpu()
    return ents, scores


@torch.no_grad()
def exhaustive_scores(model, prompt: np.ndarray, codes: np.ndarray, group0: int = 0) -> torch.Tensor:
    """Reference scorer: log P(ID | prompt) of every entity (teacher forcing; a short ID's -1 adds no
    token), [n]. For tests and small catalogues: one forward per entity."""
    device = model.id_bias.device
    codes = np.asarray(codes)
    offs = np.asarray(model.offsets[group0:group0 + codes.shape[1]])
    seqs = [np.concatenate([prompt, model.n_words + offs + np.where(c >= 0, c, 0)]) for c in codes]
    ids = torch.as_tensor(np.stack(seqs), device=device)
    attn = torch.ones_like(ids)
    h = model.hidden(ids, attn, torch.arange(ids.shape[1], device=device).expand_as(ids))
    P, L = len(prompt), codes.shape[1]
    total = torch.zeros(len(codes), device=device)
    for t in range(L):
        logp = torch.log_softmax(model.level_logits(h[:, P - 1 + t], group0 + t).float(), -1)
        c = torch.as_tensor(codes[:, t], device=device)
        total += torch.where(c >= 0, logp.gather(1, c.clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    return total
