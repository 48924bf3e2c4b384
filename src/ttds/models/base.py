"""What the evaluator needs from a model, and the small base shared by the classical baselines.

A `Recommender` implements ONE of:
  scores(users [B], history [B, N]) -> [B, n_items]      (higher = better; full ranking)
  recommend(users [B], history [B, N], k) -> [B, k]       (ranked item ids, e.g. from beam search)
`history` holds item ids left-padded with PAD = -1 (the most recent item is the last column).

`SeqModel` is the base of the in-house sequential baselines (SASRec, GRU4Rec, ...). Their
training batches are left-padded windows `seq [B, N+1]` of a user's training sequence; how a
model learns from a window is `train_mode`:
  "all"   predict seq[:, 1:] from seq[:, :-1] at every position (causal models, teacher forcing)
  "last"  predict seq[:, -1] from seq[:, :-1]; the trainer feeds every prefix (augmentation)
  "cloze" the model masks items of the window itself (BERT4Rec)
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

PAD = -1


@runtime_checkable
class Recommender(Protocol):
    n_items: int


def has_scores(model) -> bool:
    return callable(getattr(model, "scores", None))


def has_recommend(model) -> bool:
    return callable(getattr(model, "recommend", None))


def inference_region(model):
    """The model's `inference()` region for many calls in a row (`GenerativeRecommender.inference`: one bf16
    copy of the weights shared by its calls), or a no-op for models without one (and for None)."""
    fn = getattr(model, "inference", None)
    return fn() if callable(fn) else nullcontext()


class SeqModel(nn.Module):
    """Items are stored shifted by one inside the model: index 0 is padding, item i is i + 1."""

    train_mode = "all"

    def __init__(self, n_items: int, n_users: int, max_len: int):
        super().__init__()
        self.n_items, self.n_users, self.max_len = n_items, n_users, max_len
        self.loss_type = "ce"
        self.seen_bias: nn.Parameter | None = None  # enable_seen_bias()

    # -- to implement ------------------------------------------------------------------------
    def encode(self, users: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """Internal ids [B, N] (0 = pad) -> hidden states [B, N, d] (or [B, d] for "last" models)."""
        raise NotImplementedError

    def output_embeddings(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weights [n_items, d], bias [n_items] or None) used to score items from a hidden state."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    @staticmethod
    def to_internal(items: torch.Tensor) -> torch.Tensor:
        return (items + 1).clamp(min=0)  # PAD (-1) -> 0

    SEEN_BIAS_SCALE = 10.0  # the offset is 10 x its parameter: Adam moves a parameter by about lr per step

    def enable_seen_bias(self) -> None:
        """Add a learned scalar (starting at 0) to the score of every item already in the input history.
        On data without repeat purchases it learns a large negative value, with repeats a positive one.
        It is part of the model: the evaluator still ranks every item and masks nothing. The offset needs
        to travel several logits; unscaled, at lr 1e-3 it reached only -0.94 after 29 epochs on Scientific."""
        self.seen_bias = nn.Parameter(torch.zeros(1))

    def seen_offset(self) -> torch.Tensor:
        return self.SEEN_BIAS_SCALE * self.seen_bias

    def logits(self, h: torch.Tensor, users: torch.Tensor | None = None, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [P, n_items] of hidden states h [P, d]; `seen` [P, N]: each row's history (for the seen bias)."""
        w, b = self.output_embeddings()
        out = h @ w.t()
        out = out + b if b is not None else out
        if self.seen_bias is not None and seen is not None:  # each (row, seen item) once, in place, O(P x N)
            srt = seen.sort(1).values
            first = (srt >= 0) & torch.cat([torch.ones_like(srt[:, :1], dtype=torch.bool), srt[:, 1:] != srt[:, :-1]], 1)
            row, col = first.nonzero(as_tuple=True)
            out = out.index_put_((row, srt[row, col]), self.seen_offset().expand(len(row)), accumulate=True)
        return out

    def last_hidden(self, users: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        h = self.encode(users, self.to_internal(history[:, -self.max_len:]))
        return h[:, -1] if h.dim() == 3 else h

    @torch.no_grad()
    def scores(self, users: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        return self.logits(self.last_hidden(users, history), users, history[:, -self.max_len:])

    def loss(self, users: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """Next-item loss on a batch of left-padded windows of item ids seq [B, N+1] (PAD = -1)."""
        inputs, targets = seq[:, :-1], seq[:, 1:]
        h = self.encode(users, self.to_internal(inputs))
        if self.train_mode == "last" or h.dim() == 2:
            h = h[:, -1] if h.dim() == 3 else h
            targets, u, seen = targets[:, -1], users, inputs
        else:
            keep = (targets >= 0) & (inputs >= 0)  # a target needs at least one item of history
            h, targets = h[keep], targets[keep]
            u = users.unsqueeze(1).expand_as(keep)[keep]
            seen = None
            if self.seen_bias is not None:  # position t has seen the window's items up to t
                N = inputs.shape[1]
                later = ~torch.ones(N, N, dtype=torch.bool, device=inputs.device).tril()
                seen = inputs.unsqueeze(1).expand(-1, N, -1).masked_fill(later, -1)[keep]
        return self.next_item_loss(h, targets, u, seen)

    def next_item_loss(self, h: torch.Tensor, targets: torch.Tensor, users: torch.Tensor,
                       seen: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy over all items, or the original binary loss with one random negative."""
        if self.loss_type == "ce":
            return F.cross_entropy(self.logits(h, users, seen), targets)
        w, b = self.output_embeddings()
        neg = torch.randint(0, self.n_items, targets.shape, device=targets.device)
        pos_s = (h * w[targets]).sum(-1)
        neg_s = (h * w[neg]).sum(-1)
        if b is not None:
            pos_s, neg_s = pos_s + b[targets], neg_s + b[neg]
        if self.seen_bias is not None and seen is not None:
            pos_s = pos_s + self.seen_offset() * (seen == targets[:, None]).any(1)
            neg_s = neg_s + self.seen_offset() * (seen == neg[:, None]).any(1)
        return F.binary_cross_entropy_with_logits(pos_s, torch.ones_like(pos_s)) + F.binary_cross_entropy_with_logits(
            neg_s, torch.zeros_like(neg_s)
        )

    def init_weights(self, std: float = 0.02) -> None:
        """RecBole's initialisation: normal(0, std) for linear/embedding, LayerNorm (1, 0)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


# ---------------------------------------------------------------- a post-LN transformer block (SASRec, BERT4Rec)


class TransformerBlock(nn.Module):
    """RecBole's TransformerLayer: multi-head attention and a GELU feed-forward, each followed by
    dropout, a residual connection and LayerNorm (post-norm)."""

    def __init__(self, d: int, heads: int, inner: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d, eps=1e-12)
        self.ff = nn.Sequential(nn.Linear(d, inner), nn.GELU(), nn.Linear(inner, d))
        self.ln2 = nn.LayerNorm(d, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, N, d]; mask [B, 1, N, N] bool, True = may attend."""
        B, N, d = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0)
        a = a.transpose(1, 2).reshape(B, N, d)
        x = self.ln1(x + self.drop(self.proj(a)))
        return self.ln2(x + self.drop(self.ff(x)))


def attention_mask(seq: torch.Tensor, causal: bool) -> torch.Tensor:
    """seq [B, N] internal ids (0 = pad) -> [B, 1, N, N]: keys that are items (and causal if asked);
    every position may always attend to itself so padded rows stay finite."""
    N = seq.shape[1]
    m = (seq > 0).unsqueeze(1).expand(-1, N, -1)
    if causal:
        m = m & torch.ones(N, N, dtype=torch.bool, device=seq.device).tril()
    m = m | torch.eye(N, dtype=torch.bool, device=seq.device)
    return m.unsqueeze(1)
