"""How many semantic IDs a re-assignment changes when a fitted tokenizer keeps training (TTDS drift).

    .venv/bin/python benchmarks/tokenizer_drift.py --run RUN_DIR --data PATH [--tower item] [--steps 390]

Offline replay, no LM: the static RQ-VAE fit of a TTDS/TTSS run (RUN_DIR/tokenizer.<tower>/) keeps
training on its own loss the way the dynamic recipe trains it (AdamW, weight decay 0.01, batches of
`loss.dm_batch` entities, warm-up steps at `dynamic.warmup_lr`, then `dynamic.tokenizer_lr`, the loss
scaled by alpha * beta) on X = f(C) of the run's backbone (the embedding cache makes this free).
Rows: L_Token with or without the reconstruction term; then the share of IDs (and per level) whose
code changes at re-assignment, plain argmin (margin 0) and sticky margins. The LM gradient that also
moves the codebooks in a real run is not in the replay, so real runs change more.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch


def replay(tok0, x, steps: int, warm: int, warm_lr: float, lr: float, batch: int, scale: float, recon: bool):
    tok = copy.deepcopy(tok0).train()
    opt = torch.optim.AdamW(tok.parameters(), lr=warm_lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    for s in range(steps):
        for group in opt.param_groups:
            group["lr"] = warm_lr if s < warm else lr
        out = tok(x[torch.randint(len(x), (batch,), generator=g)])
        loss = out.loss if recon else out.quant_loss
        opt.zero_grad()
        (scale * loss).backward()
        opt.step()
    return tok.eval()


def main() -> None:
    from ttds.config import section
    from ttds.data.readers import load_dataset
    from ttds.index.build import index_config, load_index, tower_vectors
    from ttds.recipes import run_config
    from ttds.train.dynamic import DynamicConfig, LossConfig
    from ttds.train.generative import _backbone

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a TTDS or TTSS run folder with tokenizer.<tower>/")
    ap.add_argument("--data", required=True)
    ap.add_argument("--tower", default="item", choices=["item", "user"])
    ap.add_argument("--steps", type=int, default=390, help="tokenizer steps before the re-assignment (default: ~1 epoch)")
    ap.add_argument("--margins", default="0,0.2,0.5,1.0")
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = run_config(a.run)
    dyn, lc = section(cfg, "dynamic", DynamicConfig), section(cfg, "loss", LossConfig)
    backbone = _backbone(cfg, "cpu")
    icfg = index_config(cfg)
    x, _, _ = tower_vectors(load_dataset(a.data), a.tower, icfg, backbone)
    _, tok0 = load_index(a.run / f"tokenizer.{a.tower}")
    old = tok0.encode(x)
    z0 = tok0.embed(x).detach()
    print(f"{a.run} {a.tower} tower: {len(x)} entities, {a.steps} steps ({dyn.warmup_steps} at lr {dyn.warmup_lr}, "
          f"then {dyn.tokenizer_lr}), batch {lc.dm_batch}, loss x {lc.alpha * lc.beta}")
    print("\n| L_Token | margin | changed IDs | changed per level | mean encoder drift / mean level-1 residual |")
    print("|---|---|---|---|---|")
    for recon in (False, True):
        tok = replay(tok0, x, a.steps, dyn.warmup_steps, dyn.warmup_lr, dyn.tokenizer_lr, lc.dm_batch,
                     lc.alpha * lc.beta, recon)
        with torch.no_grad():
            drift = (tok.embed(x) - z0).norm(dim=1).mean() / tok0.quantize(z0).residuals[1].norm(dim=1).mean()
        for m in [float(v) for v in a.margins.split(",")] if recon else [0.0]:
            new = tok.encode(x, keep=old, margin=m)
            levels = ", ".join(f"{float(v):.1%}" for v in (new != old).float().mean(0))
            print(f"| {'residual + reconstruction' if recon else 'residual terms only'} | {m:g} | "
                  f"{float((new != old).any(1).float().mean()):.1%} | {levels} | {float(drift):.2f} |")
    print(f"\nwall {time.perf_counter() - t0:.0f} s, 1 thread")


if __name__ == "__main__":
    main()
