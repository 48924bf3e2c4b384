"""Caser: personalized top-N sequential recommendation via convolutional sequence embedding
(Tang & Wang, WSDM 2018, arXiv 1809.07426), as in RecBole: the last L items form an L x d "image";
horizontal filters of heights 1..L (max-pooled over time) and vertical filters (over the L rows)
are concatenated, mapped to d, concatenated with the user embedding, and dotted with a separate
2d output embedding plus a bias. Every position is scored from the L items ending there, which
is the same as training on every sliding window.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ttds.models.base import SeqModel


@dataclass
class CaserConfig:
    arch: str = "caser"
    embedding: int = 64
    window: int = 5  # L
    n_v: int = 4
    n_h: int = 16
    dropout: float = 0.4
    loss: str = "ce"


def sliding(seq: torch.Tensor, L: int) -> torch.Tensor:
    """[B, N] -> [B, N, L]: the L items ending at each position (0-padded on the left)."""
    return F.pad(seq, (L - 1, 0)).unfold(1, L, 1)


class Caser(SeqModel):
    train_mode = "all"

    def __init__(self, cfg: CaserConfig, n_items: int, n_users: int, max_len: int):
        super().__init__(n_items, n_users, max_len)
        self.loss_type, self.L = cfg.loss, cfg.window
        d, L = cfg.embedding, cfg.window
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.user_emb = nn.Embedding(n_users, d)
        self.conv_v = nn.Conv2d(1, cfg.n_v, (L, 1))
        self.conv_h = nn.ModuleList(nn.Conv2d(1, cfg.n_h, (h, d)) for h in range(1, L + 1))
        self.fc = nn.Linear(cfg.n_v * d + cfg.n_h * L, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.out_emb = nn.Embedding(n_items, 2 * d)
        self.out_bias = nn.Parameter(torch.zeros(n_items))
        for m in (self.item_emb, self.user_emb, self.out_emb):
            nn.init.normal_(m.weight, 0, 1.0 / d)

    def encode(self, users: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        B, N = seq.shape
        win = sliding(seq, self.L).reshape(B * N, self.L)
        x = self.item_emb(win).unsqueeze(1)  # [BN, 1, L, d]
        out_v = self.conv_v(x).flatten(1)  # [BN, n_v * d]
        out_h = [F.relu(conv(x)).squeeze(3).amax(2) for conv in self.conv_h]  # each [BN, n_h]
        z = F.relu(self.fc(self.drop(torch.cat([out_v] + out_h, 1))))
        u = self.user_emb(users).unsqueeze(1).expand(B, N, -1)
        return torch.cat([z.view(B, N, -1), u], -1)

    def output_embeddings(self):
        return self.out_emb.weight, self.out_bias
