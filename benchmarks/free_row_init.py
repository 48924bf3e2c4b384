"""Diagnostic (session 17): run the `ttds` CLI with TTDSRecommender's free ID rows initialised like TTSS's (normal,
word-embedding std) instead of zero, the codebook projections kept (the '+ random free rows' row of
benchmarks/results/demo_ttds-builtin-s17.md).

RAND_ROWS_PROJ=0 also zeroed the projections at init: that is now the setting `--set dynamic.id_init=random`
(the same initial weights, bit for bit: checked in session 18), which the wrapper passes on.

    python benchmarks/free_row_init.py train --model ttds --data builtin:users=600,items=300 ...
"""
import os
import sys

import torch

from ttds.models import ttds as M

if os.environ.get("RAND_ROWS_PROJ") == "0":
    args = [*sys.argv[1:], "--set", "dynamic.id_init=random"]
else:
    args = sys.argv[1:]
    _orig = M.TTDSRecommender.__init__

    def _init(self, *a, **k):
        _orig(self, *a, **k)
        with torch.no_grad():
            self.id_emb.normal_(0.0, float(self.backbone.hf_model.get_input_embeddings().weight.std()))

    M.TTDSRecommender.__init__ = _init
from ttds.cli import main  # noqa: E402

main(args)
