"""Pieces of the training engines: length-bucketed batches, the LR schedule, FLOPs and MFU, when a run continues.

Small and independent so the generative recipe (and the dynamic TTDS recipe) compose them.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from ttds.io import read_json
from ttds.tasks.builders import Example


def bucket_batches(examples: list[Example], batch_size: int, rng: np.random.Generator, max_tokens: int = 0) -> list[list[int]]:
    """Batches of similar length: sort by length (`Example.slots`, random tie-break), cut into batches of
    `batch_size` examples (or fewer when `max_tokens` caps padded slots per batch), shuffle the batch order."""
    lengths = np.asarray([e.slots or len(e.tokens) for e in examples])  # slots: unchanged by a code re-assignment
    order = np.lexsort((rng.random(len(lengths)), lengths))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) >= batch_size or (max_tokens and (len(cur) + 1) * lengths[i] > max_tokens)):
            batches.append(cur)
            cur = []
        cur.append(int(i))
    if cur:
        batches.append(cur)
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def collate(examples: list[Example], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T], attention mask [B, T], labels [B, T] (token predicted at p, -100 none)."""
    T = max(len(e.tokens) for e in examples)
    ids = torch.full((len(examples), T), pad, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.tokens)
        tok = torch.as_tensor(e.tokens)
        ids[b, :n] = tok
        attn[b, :n] = 1
        tgt = torch.as_tensor(e.target[1:])
        labels[b, : n - 1] = torch.where(tgt, tok[1:], torch.full_like(tok[1:], -100))
    return ids, attn, labels


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.05) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to `min_ratio`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def dense_peak_flops(n: int = 1024, repeats: int = 5, dtype=torch.float32, clock=time.perf_counter) -> float:
    """Achievable dense matmul FLOP per second of `clock` on the current threads (best of `repeats`). With
    `time.process_time` it is FLOP per CPU-second of this process: on a shared CPU, time spent waiting for a
    core counts in neither this peak nor the training's FLOP per CPU-second, so their ratio (MFU) holds."""
    g = torch.Generator().manual_seed(0)  # a private generator: measuring must not move the training RNG
    a, b = torch.randn(n, n, dtype=dtype, generator=g), torch.randn(n, n, dtype=dtype, generator=g)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        a @ b
        best = min(best, clock() - t)
    return 2 * n**3 / max(best, 1e-9)


def train_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (non-embedding parameters) + the attention term 12 x layers x d x T
    (PaLM appendix B). Embedding lookups are free; the ID-only head is counted in the parameters."""
    cfg = model.backbone.hf_model.config
    emb = model.backbone.hf_model.get_input_embeddings().weight.numel()
    pos = getattr(getattr(model.backbone.body, "embeddings", None), "position_embeddings", None)
    emb += pos.weight.numel() if pos is not None else 0
    n_params = sum(p.numel() for p in model.lm.parameters()) - emb
    out_emb = model.backbone.hf_model.get_output_embeddings()
    if out_emb is not None and out_emb.weight.data_ptr() != model.backbone.hf_model.get_input_embeddings().weight.data_ptr():
        n_params -= out_emb.weight.numel()  # the unused full-vocab LM head (BERT/LLaMA untied)
    n_params += sum(p.numel() for p in model.head.parameters())
    return 6.0 * n_params + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def can_continue(state: dict, tc) -> bool:
    """Whether a stopped run goes on when its command runs again: it stopped on a limit (`train.epochs`,
    `train.max_minutes`, `train.max_steps`, `train.patience`: validations without improvement) and the config now
    leaves room under every one of them. Shared by every recipe (`tc`: a GenTrainConfig or the classic TrainConfig)."""
    if state.get("stopped") not in ("epochs", "budget", "max_steps", "patience"):
        return False
    max_steps = getattr(tc, "max_steps", 0)
    return (state["epoch"] < tc.epochs and (not tc.max_minutes or state["train_seconds"] < tc.max_minutes * 60)
            and (not max_steps or state["step"] < max_steps) and state.get("bad", 0) < tc.patience)


def finished(out: Path, tc) -> bool:
    """A run folder whose training and test evaluation are complete (metrics.json written) and which the config
    `tc` does not continue (`can_continue`)."""
    if not ((out / "metrics.json").is_file() and (out / "state.json").is_file()):
        return False
    state = read_json(out / "state.json")
    return bool(state.get("done")) and not can_continue(state, tc)
