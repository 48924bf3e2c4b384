"""RQ-VAE fit time by thread count and `deterministic` setting, in one process, rows round-robin.

    .venv/bin/python benchmarks/rqvae_threads.py [--n 300] [--dim 384] [--epochs 15] [--threads 1,2] [--repeats 1]

Fits the default RQ-VAE (4 x 256 codes, code dim 256) on n random vectors for a fixed number of epochs and prints
seconds per fit. Small fits are a string of small ops: with 2 threads on a machine where another job holds a core,
every op waits for the descheduled thread, which is why a loaded machine makes `make demo` slow (README, Results).
Prints a table; nothing is written.
"""
from __future__ import annotations

import argparse
import time

import torch

from ttds.index.rqvae import RQVAE, RQVAEConfig
from ttds.runtime import machine_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    x = torch.randn(a.n, a.dim, generator=torch.Generator().manual_seed(0))
    cfg = RQVAEConfig(epochs=a.epochs, max_steps=0)
    mi = machine_info()
    print(f"{mi['cpu']}, {mi['cores']} cores, torch {mi['torch']}; {a.n} x {a.dim} vectors, {a.epochs} epochs")
    print("| threads | deterministic | repeat | seconds |\n|---|---|---|---|")
    for r in range(a.repeats):
        for threads in (int(t) for t in a.threads.split(",")):
            for det in (False, True):
                torch.set_num_threads(threads)
                torch.use_deterministic_algorithms(det)
                t = time.perf_counter()
                RQVAE(a.dim, cfg).fit(x, progress=False)
                print(f"| {threads} | {str(det).lower()} | {r} | {time.perf_counter() - t:.2f} |", flush=True)


if __name__ == "__main__":
    main()
