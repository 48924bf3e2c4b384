"""How large the two parts of a TTDS ID table are: the projected codebooks P(c) against the free rows.

    .venv/bin/python benchmarks/id_table_parts.py RUN_DIR/model.safetensors [more checkpoints ...]

E_l = P_tower(codebook_l) + R_l (ttds.models.ttds). Prints, per checkpoint, the RMS of the free rows R (all ID
tokens), and per tower and code level the RMS of P(c) over the level's codes, with P's largest weight. With
`dynamic.id_init: random` P starts at zero and learns at `dynamic.proj_lr_scale` x `train.id_lr`, so this shows how
far the recommendation loss can reach the codebooks through P (its gradient to c is P^T g).
"""
from __future__ import annotations

import sys

import torch

from ttds.io import load_safetensors
from ttds.models.ttds import level_scaled


def parts(path: str) -> list[tuple[str, float]]:
    t = load_safetensors(path)
    if "id_emb" not in t:
        raise SystemExit(f"{path}: no id_emb tensor (not a generative/TTDS checkpoint)")
    rows = [("free rows R, all ID tokens", float(t["id_emb"].float().pow(2).mean().sqrt()))]
    for tower in ("item", "user"):
        key = f"towers.{tower}.proj.weight"
        if key not in t:
            continue
        p = t[key].float()
        rows.append((f"{tower}: P largest abs weight", float(p.abs().max())))
        level = 0
        while f"towers.{tower}.tokenizer.codebooks.{level}" in t:
            cb = t[f"towers.{tower}.tokenizer.codebooks.{level}"].float()
            if f"towers.{tower}.level_norm" in t:
                cb = level_scaled(cb)
            rows.append((f"{tower}: P(c) RMS, level {level}", float((cb @ p.T).pow(2).mean().sqrt())))
            level += 1
    return rows


def main(paths: list[str]) -> None:
    if not paths:
        raise SystemExit(__doc__)
    for path in paths:
        print(f"\n{path}\n| part | value |\n|---|---|")
        for name, value in parts(path):
            print(f"| {name} | {value:.4g} |")


if __name__ == "__main__":
    main(sys.argv[1:])
