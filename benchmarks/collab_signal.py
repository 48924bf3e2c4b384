"""How much collaborative signal an item index (and the text vectors X behind it) carries (prints a table).

    .venv/bin/python benchmarks/collab_signal.py --data ../shared/data/Scientific \
        runs/s2/ttss-Scientific/index.item.json runs/s3/ttds-s42/model.safetensors runs/s4/ttds-cosm2-s42/model.safetensors

The paper's case for a *dynamic* index is that IDs re-assigned during joint training absorb collaborative
signal. This measures it on the training part of the leave-one-out split (validation and test items never
enter): for every consecutive pair (a -> b) of a training sequence, whether a's and b's IDs share their first
1, 2, 3 codes, against the same for (a -> b') where b' is the b of a random other pair (same popularity mix).
Lift = shared share / random share (1 = no collaborative structure). For a TTDS checkpoint (its buffers
`item_codes` and `towers.item.x`) it also reports the AUC of the text vectors: how often cos(x_a, x_b) >
cos(x_a, x_b') after centring X (0.5 = none). Each argument: an index JSON (`index.item.json`, LC-Rec
layout) or a TTDS checkpoint (`model.safetensors` / `last.safetensors`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def pairs(sequences: list[np.ndarray], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, b') over consecutive training pairs with a != b; b' = b shuffled across pairs."""
    a = np.concatenate([s[:-2][:-1] for s in sequences if len(s) > 3])
    b = np.concatenate([s[:-2][1:] for s in sequences if len(s) > 3])
    keep = a != b
    a, b = a[keep], b[keep]
    return a, b, b[np.random.default_rng(seed).permutation(len(b))]


def prefix_lifts(codes: np.ndarray, a, b, r, depths=(1, 2, 3)) -> list[tuple[float, float]]:
    """Per depth d: (share of pairs whose IDs share the first d codes, lift over shuffled pairs)."""
    out = []
    for d in depths:
        same = (codes[a, :d] == codes[b, :d]).all(1).mean()
        rand = (codes[a, :d] == codes[r, :d]).all(1).mean()
        out.append((float(same), float(same / rand) if rand > 0 else float("inf")))
    return out


def x_auc(x: torch.Tensor, a, b, r, chunk: int = 65536) -> float:
    x = x.float() - x.float().mean(0)
    x = torch.nn.functional.normalize(x, dim=-1)
    wins = 0.0
    for s in range(0, len(a), chunk):
        ia, ib, ir = (torch.as_tensor(v[s:s + chunk]) for v in (a, b, r))
        pos, neg = (x[ia] * x[ib]).sum(1), (x[ia] * x[ir]).sum(1)
        wins += float((pos > neg).sum() + 0.5 * (pos == neg).sum())
    return wins / len(a)


def load_source(path: str) -> tuple[np.ndarray, torch.Tensor | None]:
    from ttds.index.base import SemanticIndex
    from ttds.io import load_safetensors

    if path.endswith(".safetensors"):
        state = load_safetensors(path)
        key = next((k for k in state if k.endswith("item_codes")), None)
        if key is None:
            raise SystemExit(f"{path}: no item_codes buffer (expected a TTDS checkpoint)")
        xk = next((k for k in state if k.endswith("towers.item.x")), None)
        return state[key].numpy(), (state[xk] if xk else None)
    return SemanticIndex.load(Path(path)).codes, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("sources", nargs="+", help="index JSON files and/or TTDS checkpoints")
    args = ap.parse_args()

    from ttds.data.readers import load_dataset

    ds = load_dataset(args.data)
    a, b, r = pairs(ds.sequences)
    print(f"{ds.name}: {len(a):,} consecutive training pairs (a -> b, a != b), {ds.n_items:,} items\n")
    print("| source | shares 1st code (lift) | first 2 (lift) | first 3 (lift) | X AUC |\n|---|---|---|---|---|")
    for src in args.sources:
        codes, x = load_source(src)
        if len(codes) != ds.n_items:
            raise SystemExit(f"{src}: {len(codes)} items, the dataset has {ds.n_items}")
        cells = [f"{s:.4f} ({lift:.1f}x)" for s, lift in prefix_lifts(codes, a, b, r)]
        auc = f"{x_auc(x, a, b, r):.3f}" if x is not None else "-"
        print(f"| {src} | " + " | ".join(cells) + f" | {auc} |")


if __name__ == "__main__":
    main()
