"""HGN: hierarchical gating networks for sequential recommendation (Ma, Kang & Liu, KDD 2019,
arXiv 1906.09217), as in RecBole: over the last L items, a feature gate
E * sigmoid(E W1 + u W2) and an instance gate sigmoid(E_g w3 + u W4) pool the items into one
vector; the score of item j is (u + pooled + sum of the L item embeddings) . q_j with a separate
output embedding q (the item-item product term). Every position is scored from the L items
ending there (sliding windows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ttds.models.base import SeqModel
from ttds.models.caser import sliding


@dataclass
class HGNConfig:
    arch: str = "hgn"
    embedding: int = 64
    window: int = 5  # L
    loss: str = "ce"


class HGN(SeqModel):
    train_mode = "all"

    def __init__(self, cfg: HGNConfig, n_items: int, n_users: int, max_len: int):
        super().__init__(n_items, n_users, max_len)
        self.loss_type, self.L = cfg.loss, cfg.window
        d, L = cfg.embedding, cfg.window
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.user_emb = nn.Embedding(n_users, d)
        self.w1 = nn.Linear(d, d, bias=False)
        self.w2 = nn.Linear(d, d)
        self.w3 = nn.Linear(d, 1, bias=False)
        self.w4 = nn.Linear(d, L, bias=False)
        self.out_emb = nn.Embedding(n_items, d)
        self.out_bias = nn.Parameter(torch.zeros(n_items))
        for m in (self.item_emb, self.user_emb, self.out_emb):
            nn.init.normal_(m.weight, 0, 1.0 / d)
        for m in (self.w1, self.w2, self.w3, self.w4):
            nn.init.xavier_uniform_(m.weight)

    def encode(self, users: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        B, N = seq.shape
        win = sliding(seq, self.L)  # [B, N, L]
        e = self.item_emb(win)  # [B, N, L, d]
        u = self.user_emb(users)[:, None, None, :]  # [B, 1, 1, d]
        gated = e * torch.sigmoid(self.w1(e) + self.w2(u))  # feature gating
        inst = torch.sigmoid(self.w3(gated).squeeze(-1) + self.w4(u).squeeze(2))  # [B, N, L] instance gating
        inst = inst * (win > 0)
        pooled = (gated * inst.unsqueeze(-1)).sum(2) / inst.sum(2, keepdim=True).clamp(min=1e-8)
        return u.squeeze(2) + pooled + e.sum(2)

    def output_embeddings(self):
        return self.out_emb.weight, self.out_bias
