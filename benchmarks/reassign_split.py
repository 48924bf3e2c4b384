"""Split one TTDS code re-assignment into tokenizer drift and text drift (prints a table).

    .venv/bin/python benchmarks/reassign_split.py RUN_DIR

RUN_DIR: a TTDS run whose best model (model.safetensors) was saved BEFORE its first re-assignment with
re-encoded texts and whose last.safetensors comes after it (e.g. runs/s3/ttds-s42: best = step 341).
For each tower it applies the sticky re-assignment (margins 0 / 0.5 / 1 / 2) to the codes in use with
(a) the trained tokenizer on the old X, (b) the trained tokenizer on the re-encoded X (from last.safetensors),
(c) the tokenizer as first fitted (tokenizer.<tower>/) on the re-encoded X, and reports the share of IDs
that change. The training log reports (a) and (b) at margin `dynamic.reassign_margin` live (`tokenizer_only`).
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from ttds.index.build import load_index
from ttds.io import load_safetensors
from ttds.train.dynamic import load


def main(out: str) -> None:
    model = load(out)
    last = load_safetensors(f"{out}/last.safetensors")
    print("| tower | tokenizer | X | margin | IDs changed | per level |\n|---|---|---|---|---|---|")
    for tower, t in model.towers.items():
        codes = (model.item_codes if tower == "item" else model.user_codes).cpu().numpy()
        x_old, x_new = t.x.clone(), last[f"model.towers.{tower}.x"].float()
        cos = torch.nn.functional.cosine_similarity(x_old - x_old.mean(0), x_new - x_new.mean(0), dim=-1)
        _, fitted = load_index(f"{out}/tokenizer.{tower}")
        for tok_name, x_name, x, state in (("trained", "old", x_old, None), ("trained", "re-encoded", x_new, None),
                                           ("as fitted", "re-encoded", x_new, fitted.state_dict())):
            if state is not None:
                t.tokenizer.load_state_dict(state)
            t.set_text(x)
            for margin in (0.0, 0.5, 1.0, 2.0):
                new = t.resolved_codes(codes, margin)
                diff = new != codes
                print(f"| {tower} | {tok_name} | {x_name} | {margin} | {diff.any(1).mean():.1%} | "
                      f"{' / '.join(f'{v:.1%}' for v in diff.mean(0))} |")
        print(f"\n{tower}: centred cosine(old X, re-encoded X) mean {cos.mean():.3f}, 10th percentile {cos.quantile(0.1):.3f}\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
