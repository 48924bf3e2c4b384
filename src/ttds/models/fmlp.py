"""FMLP-Rec: filter-enhanced MLP for sequential recommendation (Zhou et al., WWW 2022,
arXiv 2202.13556): item + position embeddings, then blocks of a learnable frequency-domain filter
(FFT over the sequence, element-wise complex weights, inverse FFT; dropout, residual, LayerNorm)
and a GELU feed-forward layer. The FFT mixes every position with every other one, so the model is
not causal: it is trained on the last position of every prefix (as RecBole does), not with
teacher forcing, which would let positions see their own targets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ttds.models.base import SeqModel


@dataclass
class FMLPConfig:
    arch: str = "fmlp"
    hidden: int = 64
    layers: int = 2
    inner: int = 256
    dropout: float = 0.5
    loss: str = "ce"


class FilterBlock(nn.Module):
    def __init__(self, d: int, max_len: int, inner: int, dropout: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, max_len // 2 + 1, d, 2) * 0.02)
        self.ln1 = nn.LayerNorm(d, eps=1e-12)
        self.ff = nn.Sequential(nn.Linear(d, inner), nn.GELU(), nn.Linear(inner, d))
        self.ln2 = nn.LayerNorm(d, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N = x.shape[1]
        f = torch.fft.rfft(x, dim=1, norm="ortho") * torch.view_as_complex(self.weight)
        x = self.ln1(x + self.drop(torch.fft.irfft(f, n=N, dim=1, norm="ortho")))
        return self.ln2(x + self.drop(self.ff(x)))


class FMLPRec(SeqModel):
    train_mode = "last"

    def __init__(self, cfg: FMLPConfig, n_items: int, n_users: int, max_len: int):
        super().__init__(n_items, n_users, max_len)
        self.loss_type = cfg.loss
        d = cfg.hidden
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, d)
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(FilterBlock(d, max_len, cfg.inner, cfg.dropout) for _ in range(cfg.layers))
        self.init_weights()

    def encode(self, users: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        N = seq.shape[1]
        if N != self.max_len:  # the filter has one weight per frequency of a max_len sequence
            seq = torch.nn.functional.pad(seq, (self.max_len - N, 0))
        x = self.drop(self.ln(self.item_emb(seq) + self.pos_emb.weight))
        for block in self.blocks:
            x = block(x)
        return x[:, -1]

    def output_embeddings(self):
        return self.item_emb.weight[1:], None
