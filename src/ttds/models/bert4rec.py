"""BERT4Rec: sequential recommendation with bidirectional encoder representations from
transformers (Sun et al., CIKM 2019, arXiv 1904.06690), as in RecBole: item + position
embeddings, bidirectional post-LN transformer blocks, a cloze objective (random items are
replaced by [mask] and predicted with cross-entropy over all items), and at test time a [mask]
appended after the history is predicted. Output head: dense -> GELU -> LayerNorm, dotted with
the tied item embeddings plus a bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ttds.models.base import SeqModel, TransformerBlock, attention_mask


@dataclass
class BERT4RecConfig:
    arch: str = "bert4rec"
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    inner: int = 256
    dropout: float = 0.2
    attn_dropout: float = 0.2
    mask_ratio: float = 0.2
    loss: str = "ce"


class BERT4Rec(SeqModel):
    train_mode = "cloze"

    def __init__(self, cfg: BERT4RecConfig, n_items: int, n_users: int, max_len: int):
        super().__init__(n_items, n_users, max_len)
        if cfg.loss != "ce":
            raise ValueError("BERT4Rec is trained with the cloze cross-entropy (loss: ce)")
        d = cfg.hidden
        self.mask_ratio = cfg.mask_ratio
        self.mask_id = n_items + 1
        self.item_emb = nn.Embedding(n_items + 2, d, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len + 1, d)  # history + the [mask] slot
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d, cfg.heads, cfg.inner, cfg.dropout, cfg.attn_dropout) for _ in range(cfg.layers)
        )
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d, eps=1e-12))
        self.out_bias = nn.Parameter(torch.zeros(n_items))
        self.init_weights()

    def encode(self, users: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        N = seq.shape[1]
        pos = torch.arange(self.max_len + 1 - N, self.max_len + 1, device=seq.device)
        x = self.drop(self.ln(self.item_emb(seq) + self.pos_emb(pos)))
        mask = attention_mask(seq, causal=False)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(x)

    def output_embeddings(self):
        return self.item_emb.weight[1: self.n_items + 1], self.out_bias

    def last_hidden(self, users: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        seq = self.to_internal(history[:, -self.max_len:])
        seq = torch.cat([seq, torch.full_like(seq[:, :1], self.mask_id)], 1)
        return self.encode(users, seq)[:, -1]

    def loss(self, users: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """Cloze: mask `mask_ratio` of the items of each window (at least one) and predict them."""
        items = self.to_internal(seq)
        real = items > 0
        masked = (torch.rand(items.shape, device=items.device) < self.mask_ratio) & real
        none = ~masked.any(1)
        masked[none, -1] = True  # windows end with an item: mask the last one when nothing was drawn
        inputs = torch.where(masked, torch.full_like(items, self.mask_id), items)
        h = self.encode(users, inputs)[masked]
        return F.cross_entropy(self.logits(h), items[masked] - 1)
