"""Diagnostic (session 17, not a feature yet): run the `ttds` CLI with TTDSRecommender's free ID rows initialised
like TTSS's (normal, word-embedding std) instead of zero; RAND_ROWS_PROJ=0 also zeroes the codebook projections at
init (still trainable), so the initial ID embeddings are TTSS-like random rows.

    RAND_ROWS_PROJ=0 python benchmarks/free_row_init.py train --model ttds --data builtin:users=600,items=300 ...
"""
import os
import sys

import torch

from ttds.models import ttds as M

_orig = M.TTDSRecommender.__init__


def _init(self, *a, **k):
    _orig(self, *a, **k)
    with torch.no_grad():
        std = float(self.backbone.hf_model.get_input_embeddings().weight.std())
        self.id_emb.normal_(0.0, std)
        if os.environ.get("RAND_ROWS_PROJ") == "0":
            for t in self.towers.values():
                if getattr(t, "proj", None) is not None:
                    t.proj.weight.zero_()


M.TTDSRecommender.__init__ = _init
from ttds.cli import main  # noqa: E402

main(sys.argv[1:])
