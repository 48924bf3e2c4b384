"""`RandomIndexer`: static random semantic IDs (Table 3 ablation): codes carry no meaning.

Entity i gets codes drawn from a generator seeded with (seed, i), so the same entity always gets
the same ID and a new entity can be added later. Same interface as `RQVAE` and `LSHIndexer`.
"""
from __future__ import annotations

import torch
from torch import nn


class RandomIndexer(nn.Module):
    def __init__(self, in_dim: int = 0, levels: int = 4, codebook_size: int = 256, seed: int = 0):
        super().__init__()
        self.register_buffer("seed", torch.tensor(seed))
        self.levels, self.codebook_size = levels, codebook_size

    @property
    def level_sizes(self) -> list[int]:
        return [self.codebook_size] * self.levels

    def fit(self, x: torch.Tensor) -> "RandomIndexer":
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Codes for entities start..start+len(x)-1 (x itself is ignored)."""
        g = torch.Generator()
        rows = []
        for i in range(start, start + len(x)):
            g.manual_seed(int(self.seed) * 1_000_003 + i)
            rows.append(torch.randint(self.codebook_size, (self.levels,), generator=g))
        return torch.stack(rows) if rows else torch.zeros(0, self.levels, dtype=torch.long)
