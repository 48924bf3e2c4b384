"""GRU4Rec: session-based recommendation with recurrent neural networks (Hidasi et al., ICLR 2016,
arXiv 1511.06939), in RecBole's form: item embedding, dropout, a GRU, and a linear map back to
the embedding size; the state after item t scores every item (tied embeddings) for t + 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ttds.models.base import SeqModel


@dataclass
class GRU4RecConfig:
    arch: str = "gru4rec"
    embedding: int = 64
    hidden: int = 128
    layers: int = 1
    dropout: float = 0.3
    loss: str = "ce"


class GRU4Rec(SeqModel):
    train_mode = "all"

    def __init__(self, cfg: GRU4RecConfig, n_items: int, n_users: int, max_len: int):
        super().__init__(n_items, n_users, max_len)
        self.loss_type = cfg.loss
        self.item_emb = nn.Embedding(n_items + 1, cfg.embedding, padding_idx=0)
        self.drop = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.embedding, cfg.hidden, cfg.layers, batch_first=True, bias=False)
        self.dense = nn.Linear(cfg.hidden, cfg.embedding)
        nn.init.xavier_normal_(self.item_emb.weight)
        with torch.no_grad():  # re-initialising overwrote the padding row: padding must read as zeros
            self.item_emb.weight[0].zero_()
        for name, p in self.gru.named_parameters():
            (nn.init.xavier_uniform_ if "weight_ih" in name else nn.init.orthogonal_)(p)
        nn.init.xavier_normal_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def encode(self, users: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        # left padding: the GRU reads zero vectors first, then the items; outputs at item positions are used
        h, _ = self.gru(self.drop(self.item_emb(seq)))
        return self.dense(h)

    def output_embeddings(self):
        return self.item_emb.weight[1:], None
