"""`LSHIndexer`: static locality-sensitive hashing with random hyperplanes (Table 3 ablation).

Each of the M levels has log2(K) random hyperplanes through the mean of the embeddings; the
code is the bit pattern of which side of each plane the embedding falls on. Nothing is trained.
Same interface as `RQVAE`: `level_sizes`, `encode(x) -> codes [n, M]`, a state dict of tensors.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ttds.errors import TTDSError


class LSHIndexer(nn.Module):
    def __init__(self, in_dim: int, levels: int = 4, codebook_size: int = 256, seed: int = 0):
        super().__init__()
        bits = int(round(math.log2(codebook_size)))
        if 2 ** bits != codebook_size:
            raise TTDSError(f"config index.codebook_size={codebook_size}: LSH needs a power of two")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("planes", torch.randn(levels, bits, in_dim, generator=g))
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("powers", 2 ** torch.arange(bits))
        self.levels, self.codebook_size = levels, codebook_size

    @property
    def level_sizes(self) -> list[int]:
        return [self.codebook_size] * self.levels

    def fit(self, x: torch.Tensor) -> "LSHIndexer":
        self.mean.copy_(x.float().mean(0))
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        side = torch.einsum("nd,lbd->nlb", x.float() - self.mean, self.planes) > 0
        return (side.long() * self.powers).sum(-1)
