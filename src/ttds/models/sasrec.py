"""SASRec: Self-Attentive Sequential Recommendation (Kang & McAuley, ICDM 2018, arXiv 1808.09781).

Item + position embeddings, LayerNorm and dropout, then causal post-LN transformer blocks;
the hidden state at position t scores every item for position t + 1 against the (tied) item
embedding table. Architecture as in RecBole's SASRec. Trained with teacher forcing on every
position; `loss: ce` is cross-entropy over all items (RecBole's default), `loss: bce` the
paper's binary loss with one sampled negative per position.

Positions count from the first item of the (left-padded) window, as in RecBole (`positions:
start`). Then, with the causal mask, the hidden state at position t of a training window is
exactly what inference computes for the prefix ending there: training on every position and
scoring from the last one agree. Counting from the most recent item instead (`positions: end`,
the original TensorFlow code) puts an item at a different position in training than at test time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ttds.errors import TTDSError
from ttds.models.base import SeqModel, TransformerBlock, attention_mask


@dataclass
class SASRecConfig:
    arch: str = "sasrec"
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    inner: int = 256
    dropout: float = 0.5
    attn_dropout: float = 0.5
    loss: str = "ce"  # ce | bce
    positions: str = "start"  # start: index from the window's first item (RecBole) | end: from the last
    tied: bool = True  # score items against the input item embeddings (RecBole); false: a separate output table
    seen_bias: bool = False  # a learned score offset for items already in the history (SeqModel.enable_seen_bias)


class SASRec(SeqModel):
    train_mode = "all"

    def __init__(self, cfg: SASRecConfig, n_items: int, n_users: int, max_len: int):
        super().__init__(n_items, n_users, max_len)
        self.loss_type = cfg.loss
        if cfg.positions not in ("start", "end"):
            raise TTDSError(f"config model.positions={cfg.positions!r}: expected start or end")
        self.positions = cfg.positions
        d = cfg.hidden
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, d)
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d, cfg.heads, cfg.inner, cfg.dropout, cfg.attn_dropout) for _ in range(cfg.layers)
        )
        self.out_emb = None if cfg.tied else nn.Embedding(n_items, d)
        self.init_weights()
        if cfg.seen_bias:
            self.enable_seen_bias()

    def encode(self, users: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        if self.positions == "start":  # left-padded: the first item is at 0, padding at 0 too (masked)
            pos = ((seq > 0).long().cumsum(1) - 1).clamp(min=0)
        else:  # the most recent item is at max_len - 1
            pos = torch.arange(self.max_len - seq.shape[1], self.max_len, device=seq.device)
        x = self.drop(self.ln(self.item_emb(seq) + self.pos_emb(pos)))
        mask = attention_mask(seq, causal=True)
        for block in self.blocks:
            x = block(x, mask)
        return x

    def output_embeddings(self):
        w = self.item_emb.weight[1:] if self.out_emb is None else self.out_emb.weight
        return w, None
