"""Run setup shared by every recipe: seeds, threads, device, output folder, log file, machine info."""
from __future__ import annotations

import logging
import os
import platform
import random
from pathlib import Path

import numpy as np

from ttds.config import dump
from ttds.io import write_text

log = logging.getLogger("ttds")


def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_torch(cfg: dict):
    """Threads, determinism and device from the config; returns a torch.device.

    `deterministic` (default true) turns on torch's deterministic algorithms. Without it, gradients that
    accumulate into indexed rows (`codebook[codes]` in the RQ-VAE, index_put with accumulate on CPU) sum in
    thread order when threads > 1, and an RQ-VAE fit on 2 threads gave different codes for every item from run
    to run (benchmarks/results/LOG.md, session 15). Ops without a deterministic version warn instead of failing."""
    import torch

    from ttds.errors import TTDSError

    threads = int(cfg.get("threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    device = str(cfg.get("device") or "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TTDSError(f"config device={device!r}: CUDA is not available on this machine; use device=cpu")
    deterministic = cfg.get("deterministic", True)
    if not isinstance(deterministic, bool):
        raise TTDSError(f"config deterministic={deterministic!r}: expected true or false")
    if deterministic and device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    return torch.device(device)


PRECISIONS = ("fp32", "bf16", "auto")


def has_fast_bf16(device) -> bool:
    """Whether bf16 matmuls are fast on `device`: a CUDA GPU with bf16, or a CPU with AMX or AVX-512 BF16
    units. Measured (`benchmarks/eval_speed.py --bf16`): on an AMX Xeon a bf16 matmul ran 7x fp32's FLOP/s; on an
    AVX2-only EPYC bf16 ran under 1 GFLOP/s (../shared/NOTES.md), so there it must stay off; on an AMD EPYC with
    AVX-512 BF16 but no AMX, beam search ran 1.76x fp32's users per CPU-second, top-10 overlap 0.986
    (benchmarks/results/eval_speed-Scientific-bf16-zen4.md)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "cpu":  # torch has no public test for these units; a missing one reads as "no"
        return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return False


def resolve_precision(value, device, key: str) -> str:
    """A precision setting (`key` names it in errors) as fp32 | bf16; `auto` = bf16 where `has_fast_bf16`."""
    from ttds.errors import TTDSError

    if value not in PRECISIONS:
        raise TTDSError(f"config {key}={value!r}: expected one of {', '.join(PRECISIONS)}")
    if value == "auto":
        return "bf16" if has_fast_bf16(device) else "fp32"
    return value


def setup_logging(out_dir: str | Path | None = None, level: int = logging.INFO) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        root.addHandler(sh)
    if out_dir is not None:
        path = Path(out_dir) / "run.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
            fh = logging.FileHandler(path, encoding="utf-8")
            fh.setFormatter(fmt)
            root.addHandler(fh)


def start_run(cfg: dict, out_dir: str | Path):
    """Create the output folder, write the resolved config, log to a file, seed, pick device."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", dump(cfg))
    setup_logging(out)
    set_seed(int(cfg.get("seed", 0)))
    return setup_torch(cfg)


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
