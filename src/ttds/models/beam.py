"""Trie-constrained beam search over semantic IDs, batched across users AND beams.

For a batch of B prompts: the prompt runs once (left-padded, one forward, KV cache kept); the
level-0 scores come from its last position; the cache is then expanded to the beams
(`batch_repeat_interleave`) and each of the remaining L-1 levels is one forward of a single token
for all B x W beams. At every level the ID-only head gives log-probabilities over that level's K_l
tokens (normalised before the mask, like HF `generate` which masks after its log-softmax), the
trie's allowed-codes mask sets invalid codes to -inf, and the best W of the W x K_l candidates per
user survive. Distinct beams are distinct trie paths, so the k returned items are valid and unique.
"""
from __future__ import annotations

import numpy as np
import torch

from ttds.index.trie import IDTrie


def left_pad(prompts: list[np.ndarray], pad: int = 0, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.as_tensor(p)
        mask[i, P - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def beam_search(model, prompts: list[np.ndarray], trie: IDTrie, group0: int, beam: int = 20, k: int = 10):
    """One batch. Returns (entities [B, k] long, -1 = none; log-prob scores [B, k])."""
    device = model.id_bias.device
    ids, attn = left_pad(prompts, device=device)
    B = ids.shape[0]
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    h, cache = model.hidden(ids, attn, pos, use_cache=True)
    logp = torch.log_softmax(model.level_logits(h[:, -1], group0).float(), -1)
    node = trie.root(B)
    logp = logp.masked_fill(~trie.allowed(node, 0), float("-inf"))
    W = min(beam, logp.shape[1])
    score, code = logp.topk(W, dim=1)  # [B, W]
    node = trie.step(node.repeat_interleave(W), code.reshape(-1), 0)
    cache.batch_repeat_interleave(W)
    attn = attn.repeat_interleave(W, 0)
    last = pos[:, -1].repeat_interleave(W)
    rows = torch.arange(B, device=device).unsqueeze(1)
    for t in range(1, trie.n_levels):
        tok = (model.n_words + model.offsets[group0 + t - 1] + code.reshape(-1, 1))
        attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], 1)
        h, cache = model.hidden(tok, attn, (last + t).unsqueeze(1), past_key_values=cache, use_cache=True)
        logp = torch.log_softmax(model.level_logits(h[:, -1], group0 + t).float(), -1)
        logp = logp.masked_fill(~trie.allowed(node, t), float("-inf"))
        K = logp.shape[1]
        cand = (score.reshape(-1, 1) + logp).view(B, W * K)
        W2 = min(beam, W * K)
        score, flat = cand.topk(W2, dim=1)
        parent, code = flat // K, flat % K
        g = (rows * W + parent).reshape(-1)
        if t < trie.n_levels - 1:
            cache.reorder_cache(g)
            attn, last = attn[g], last[g]
        node = trie.step(node[g], code.reshape(-1), t)
        W = W2
    ent = torch.where(node >= 0, trie.leaf_entity[node.clamp(min=0)], torch.full_like(node, -1)).view(B, W)
    ent = ent.masked_fill(~torch.isfinite(score), -1)
    if W < k:
        ent = torch.cat([ent, ent.new_full((B, k - W), -1)], 1)
        score = torch.cat([score, score.new_full((B, k - W), float("-inf"))], 1)
    return ent[:, :k], score[:, :k]


@torch.no_grad()
def beam_search_prompts(model, prompts: list[np.ndarray], trie: IDTrie, group0: int, beam: int = 20, k: int = 10,
                        batch: int = 32):
    """Many prompts: sorted by length into micro-batches of `batch` (little padding), original order kept."""
    order = np.argsort([len(p) for p in prompts], kind="stable")
    ents, scores = torch.full((len(prompts), k), -1, dtype=torch.long), torch.full((len(prompts), k), float("-inf"))
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        e, sc = beam_search(model, [prompts[i] for i in idx], trie, group0, beam, k)
        ents[torch.as_tensor(idx)], scores[torch.as_tensor(idx)] = e.cpu(), sc.cpu()
    return ents, scores


@torch.no_grad()
def exhaustive_scores(model, prompt: np.ndarray, codes: np.ndarray, group0: int = 0) -> torch.Tensor:
    """Reference scorer: log P(ID | prompt) of every entity (teacher forcing), [n]. For tests and
    small catalogues: one forward per entity."""
    device = model.id_bias.device
    seqs = [np.concatenate([prompt, model.n_words + np.asarray(model.offsets[group0:group0 + codes.shape[1]]) + c]) for c in codes]
    ids = torch.as_tensor(np.stack(seqs), device=device)
    attn = torch.ones_like(ids)
    h = model.hidden(ids, attn, torch.arange(ids.shape[1], device=device).expand_as(ids))
    P, L = len(prompt), codes.shape[1]
    total = torch.zeros(len(codes), device=device)
    for t in range(L):
        logp = torch.log_softmax(model.level_logits(h[:, P - 1 + t], group0 + t).float(), -1)
        total += logp.gather(1, torch.as_tensor(codes[:, t:t + 1], device=device)).squeeze(1)
    return total
