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
    B, P = ids.shape
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    h, cache = model.hidden(ids, attn, pos, use_cache=True)
    logp = torch.log_softmax(model.level_logits(h[:, -1], group0).float(), -1)
    node = trie.root(B)
    logp = logp.masked_fill(~trie.allowed(node, 0), float("-inf"))
    W = min(beam, logp.shape[1])
    score, code = logp.topk(W, dim=1)  # [B, W]
    node = trie.step(node.repeat_interleave(W), code.reshape(-1), 0)
    prompt_mask = attn.bool()  # [B, P]
    anc = torch.zeros(B, W, 0, dtype=torch.long, device=device)  # cache slots of each beam's earlier tokens
    cur = P  # cache length
    rows = torch.arange(B, device=device).unsqueeze(1)
    for t in range(1, trie.n_levels):
        # feed every beam's level t-1 token; beam w's token goes to cache slot cur + w
        tok = model.n_words + model.offsets[group0 + t - 1] + code  # [B, W]
        own = cur + torch.arange(W, device=device)
        allowed = torch.zeros(B, W, cur + W, dtype=torch.bool, device=device)
        allowed[:, :, :P] = prompt_mask.unsqueeze(1)
        allowed.scatter_(2, anc, True)
        allowed[:, torch.arange(W, device=device), own] = True
        h, cache = model.hidden(tok, allowed.unsqueeze(1), (pos[:, -1:] + t).expand(B, W), past_key_values=cache, use_cache=True)
        logp = torch.log_softmax(model.level_logits(h, group0 + t).float(), -1)  # [B, W, K]
        logp = logp.masked_fill(~trie.allowed(node, t).view(B, W, -1), float("-inf"))
        K = logp.shape[2]
        cand = (score.unsqueeze(2) + logp).view(B, W * K)
        W2 = min(beam, W * K)
        score, flat = cand.topk(W2, dim=1)
        parent, code = flat // K, flat % K
        anc = torch.cat([anc.gather(1, parent.unsqueeze(2).expand(-1, -1, anc.shape[2])), (cur + parent).unsqueeze(2)], 2)
        node = trie.step(node[(rows * W + parent).reshape(-1)], code.reshape(-1), t)
        cur, W = cur + W, W2
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
