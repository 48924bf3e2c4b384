"""Distributed training and sharded inference with torch.distributed (DDP; FSDP2 as an option).

The same command runs on one process or many:

    ttds train --model sasrec --data builtin                                   # one process
    torchrun --standalone --nproc_per_node 2 -m ttds train --model sasrec --data builtin
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --rdzv_backend c10d \
             --rdzv_endpoint HOST:29500 -m ttds train --model ttss --data ... --set dist.backend=nccl

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; without them
every function here is a no-op for one process (rank 0 of 1), so single-process runs are unchanged.

Semantics (what makes N processes equal one):
- A batch is GLOBAL: `train.batch_size` is the batch of the whole job. Every rank builds the same epoch
  (same seed, same shuffle) and takes its contiguous part of each global batch (`shard`); the loss of a
  part is scaled so that DDP's mean over ranks is the global batch's mean (`shard` returns the factor).
  Resuming on another world size therefore continues the same global path.
- Weights start identical (same seed; DDP also broadcasts rank 0's), gradients are all-reduced, the
  optimizer steps on the same gradients everywhere; checkpoints hold the unwrapped model's state and
  are written by rank 0 only (atomic files), followed by a barrier before anyone reads them.
- Evaluation splits the evaluation BATCHES round-robin over ranks (each batch is exactly the one a single
  process would run, so float results are bit-identical) and gathers the per-user ranks back in order.
- Random streams that must differ per rank (dropout, sampled negatives) use `rank_seed(seed)`; rank 0 of
  any world uses `seed` itself.
- Nothing here pickles: objects travel as tensors (arrays) or JSON bytes.

Config section `dist:` (`DistConfig`): backend auto|gloo|nccl, strategy ddp|fsdp, timeout_minutes,
find_unused_parameters.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from ttds.errors import TTDSError

log = logging.getLogger(__name__)


@dataclass
class DistConfig:
    backend: str = "auto"  # auto (nccl when the device is CUDA, else gloo) | gloo | nccl
    strategy: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard: parameters, gradients and optimizer state sharded)
    timeout_minutes: float = 30.0
    find_unused_parameters: bool | None = None  # None: the recipe's default (DDP must know if some weights get no gradient)


# ---------------------------------------------------------------- process group


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world() -> int:
    return tdist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def env_rank() -> int:
    """This process's rank from the torchrun environment (valid before and after the group exists)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(backend: str = "auto", device: str = "cpu", timeout_minutes: float = 30.0) -> bool:
    """Join the process group described by the torchrun environment (idempotent). False for one process."""
    if active():
        return True
    if env_world() <= 1:
        return False
    if backend == "auto":
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend not in ("gloo", "nccl"):
        raise TTDSError(f"config dist.backend={backend!r}: expected auto, gloo or nccl")
    if backend == "nccl" and not (torch.cuda.is_available() and tdist.is_nccl_available()):
        raise TTDSError("config dist.backend=nccl: NCCL needs CUDA GPUs; use dist.backend=gloo on CPU")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise TTDSError(f"environment: WORLD_SIZE={env_world()} but {key} is not set; launch with torchrun")
    tdist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    log.info("process group: rank %d of %d, backend %s", rank(), world(), backend)
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 logs for the job
    return True


def setup(cfg: dict, device: torch.device) -> torch.device:
    """Called by a recipe after `start_run`: join the group, pick this rank's device, and share the CPU
    threads among the processes of a node."""
    from ttds.config import section

    dc = section(cfg, "dist", DistConfig)
    if dc.strategy not in ("ddp", "fsdp"):
        raise TTDSError(f"config dist.strategy={dc.strategy!r}: expected ddp or fsdp")
    if not init(dc.backend, str(device), dc.timeout_minutes):
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world()))
        torch.set_num_threads(max(1, torch.get_num_threads() // local))
    return device


def rank_seed(seed: int) -> int:
    """A per-rank seed for streams that should differ between ranks; rank 0 keeps `seed`."""
    return int(seed) + 1_000_003 * rank()


def barrier() -> None:
    if active():
        tdist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. writes a file), then the others (who may read it)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


# ---------------------------------------------------------------- data sharding


def shard(batch: np.ndarray | list, counts: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """This rank's contiguous part of a GLOBAL batch and the loss factor that turns DDP's gradient mean
    over ranks into the mean over the whole batch.

    `counts[i]` = how many loss terms sample i contributes (e.g. target positions; default 1 each).
    If the local loss is the mean over its part's terms, multiplying it by the factor
    world * (terms of the part) / (terms of the batch) makes the average over ranks the global mean.
    A rank whose part would be empty (batch smaller than the world) gets the batch's first sample and
    factor 0, so every rank still runs forward/backward (DDP's all-reduce needs all of them).
    One process: (batch, 1.0), unchanged.
    """
    batch = np.asarray(batch)
    if not active():
        return batch, 1.0
    w, r = world(), rank()
    part = np.array_split(batch, w)[r]
    if len(part) == 0:
        return batch[:1], 0.0
    if counts is None:
        return part, w * len(part) / len(batch)
    total = float(sum(counts[int(i)] for i in batch))  # counts: an array or a dict by sample
    return part, (w * float(sum(counts[int(i)] for i in part)) / total) if total else 0.0


_UNSHARDED = False


@contextlib.contextmanager
def unsharded():
    """Inside this block evaluation is not split over ranks: for code that only one rank runs."""
    global _UNSHARDED
    keep, _UNSHARDED = _UNSHARDED, True
    try:
        yield
    finally:
        _UNSHARDED = keep


def sharding() -> bool:
    """Split evaluation/pre-compute over ranks? Under torchrun the group is joined on first use (gloo on CPU),
    so `torchrun ... -m ttds eval` shards too."""
    if not _UNSHARDED and env_world() > 1 and not (tdist.is_available() and tdist.is_initialized()):
        init()
    return active() and not _UNSHARDED


def shard_starts(n: int, batch_size: int) -> list[int]:
    """Start offsets of this rank's evaluation batches: batch j goes to rank j % world."""
    starts = list(range(0, n, batch_size))
    return starts[rank()::world()] if sharding() else starts


# ---------------------------------------------------------------- model wrapping


class Method(nn.Module):
    """Makes `model.<method>(...)` the forward of a module, so DDP/FSDP hooks run around it
    (DDP synchronises gradients only for calls that go through forward)."""

    def __init__(self, model: nn.Module, method: str = "loss"):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args, **kwargs):
        return getattr(self.model, self.method)(*args, **kwargs)


def wrap(model: nn.Module, cfg: dict, method: str = "loss", find_unused: bool = False, fsdp: bool = False,
         module: nn.Module | None = None, sync_buffers: bool = True) -> nn.Module:
    """A module whose call runs `model.<method>` (or `module`, a module holding `model`, e.g. a step's loss): DDP
    (or FSDP2) over it in a process group, the plain module otherwise. Keep using `model` itself for evaluation.
    `find_unused`: the recipe's default for DDP's find_unused_parameters (config dist.find_unused_parameters wins).
    `fsdp`: the recipe supports dist.strategy=fsdp, i.e. it builds its optimizer AFTER wrapping (FSDP2 replaces the
    parameters by sharded DTensors), saves full tensors (`full_tensor`) and evaluates inside `unsharded_params(net)`.
    `sync_buffers`: DDP re-sends rank 0's buffers before every forward (False when the recipe keeps them equal; they
    are still synchronised once, when wrapping)."""
    from ttds.config import section

    dc = section(cfg, "dist", DistConfig)
    net = module if module is not None else Method(model, method)
    if not active():
        return net
    if dc.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        if not fsdp:
            raise TTDSError(f"config dist.strategy=fsdp: recipe {cfg.get('recipe')!r} does not support FSDP yet; use dist.strategy=ddp")
        for t in model.state_dict().values():  # rank 0's weights everywhere (DDP does this itself; FSDP shards what it gets)
            tdist.broadcast(t, 0)
        for m in model.modules():  # shard every transformer block, then the rest at the root
            if m.__class__.__name__.endswith(("DecoderLayer", "Layer", "Block")) and m is not model:
                fully_shard(m)
        return fully_shard(net)
    dev = next(model.parameters()).device
    ids = [dev.index] if dev.type == "cuda" else None
    unused = find_unused if dc.find_unused_parameters is None else bool(dc.find_unused_parameters)
    return nn.parallel.DistributedDataParallel(net, device_ids=ids, find_unused_parameters=unused,
                                               forward_sync_buffers=sync_buffers)


def average_gradients(model: nn.Module) -> None:
    """All-reduce (mean over ranks) every gradient, in one flat buffer: the alternative to DDP for trainers with
    several losses or backward passes outside forward (call after the last backward, before clipping).
    A parameter without a gradient on some ranks gets zeros there; one without any on every rank stays None."""
    if not active():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=_backend_device())
    tdist.all_reduce(has, tdist.ReduceOp.MAX)
    grads = []
    for p, h in zip(params, has.tolist()):
        if h and p.grad is None:
            p.grad = torch.zeros_like(p)
        if h:
            grads.append(p.grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).to(_backend_device())
    tdist.all_reduce(flat)
    flat /= world()
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def no_sync(net: nn.Module, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-batches (`sync` False); sync on the last one."""
    if sync or not hasattr(net, "no_sync"):
        return contextlib.nullcontext()
    return net.no_sync()


@contextlib.contextmanager
def unsharded_params(net: nn.Module):
    """FSDP2: the full parameters on every rank inside the block, for code that bypasses the root forward
    (evaluation, re-encoding). Modules do not reshard after their forward in the block, so ranks may run
    different numbers of forwards (sharded evaluation) without collectives. A no-op without FSDP."""
    mods = [m for m in net.modules() if hasattr(m, "unshard") and hasattr(m, "set_reshard_after_forward")]
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            if m is not net:  # the root keeps FSDP's default (no reshard after forward)
                m.set_reshard_after_forward(True, recurse=False)
        if mods and hasattr(net, "reset_iter_state"):
            # the block's forwards left per-rank traces (e.g. the post-forward order FSDP prefetches by in the next
            # backward; sharded evaluation runs different numbers of forwards per rank): clear them, reshard all
            net.reset_iter_state()
        else:
            for m in mods:
                m.reshard()


def is_sharded(t) -> bool:
    """An FSDP2-sharded tensor (a DTensor)?"""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a sharded one; others are returned as they are)."""
    return t.full_tensor() if is_sharded(t) else t


def full_state_dict(model: nn.Module) -> dict:
    """The whole model's state on every rank (FSDP-sharded parameters are gathered to full tensors)."""
    return {k: full_tensor(v) for k, v in model.state_dict().items()}


def shard_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """After `opt.load_state_dict` of FULL tensors (a checkpoint): each state tensor of a sharded parameter
    becomes that parameter's shard on this rank (FSDP2). A no-op without sharded parameters."""
    from torch.distributed.tensor import distribute_tensor

    for group in opt.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and not is_sharded(v) and tuple(v.shape) == tuple(p.shape):
                    opt.state[p][k] = distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements)


# ---------------------------------------------------------------- collectives (no pickle: tensors + JSON bytes)


def _backend_device() -> torch.device:
    if active() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(x: float | np.ndarray | torch.Tensor, op: str = "sum") -> float | np.ndarray | torch.Tensor:
    """Sum (or max/min) of a number/array over ranks; returned in the type given."""
    if not active():
        return x
    t = torch.as_tensor(np.asarray(x, dtype=np.float64) if not isinstance(x, torch.Tensor) else x).to(_backend_device())
    t = t.clone()
    tdist.all_reduce(t, {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}[op])
    if isinstance(x, torch.Tensor):
        return t.to(x.device)
    return float(t) if np.ndim(x) == 0 else t.cpu().numpy()


def mean(x: float) -> float:
    return all_reduce(float(x)) / world()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any rank (e.g. a time budget ran out somewhere)."""
    return bool(all_reduce(1.0 if flag else 0.0, "max")) if active() else bool(flag)


def all_gather_array(a: np.ndarray) -> list[np.ndarray]:
    """Every rank's array (any length along axis 0, same trailing shape and dtype), in rank order."""
    a = np.ascontiguousarray(a)
    if not active():
        return [a]
    dev = _backend_device()
    n = torch.tensor([a.shape[0]], dtype=torch.long, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world())]
    tdist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = np.zeros((max(sizes),) + a.shape[1:], dtype=a.dtype)
    pad[: a.shape[0]] = a
    t = torch.from_numpy(pad).to(dev)
    out = [torch.empty_like(t) for _ in sizes]
    tdist.all_gather(out, t)
    return [o.cpu().numpy()[:s] for o, s in zip(out, sizes)]


def broadcast_array(a: np.ndarray | None, src: int = 0) -> np.ndarray:
    """Rank `src`'s array on every rank (others may pass None)."""
    if not active():
        return a
    dev = _backend_device()
    if rank() == src:
        a = np.ascontiguousarray(a)
        head = json.dumps({"shape": list(a.shape), "dtype": a.dtype.str}).encode()
    else:
        head = b""
    head = json.loads(broadcast_bytes(head, src))
    t = torch.from_numpy(a).to(dev) if rank() == src else torch.empty(head["shape"], dtype=torch.from_numpy(
        np.zeros(0, dtype=np.dtype(head["dtype"]))).dtype, device=dev)
    tdist.broadcast(t, src)
    return t.cpu().numpy()


def broadcast_bytes(b: bytes, src: int = 0) -> bytes:
    if not active():
        return b
    dev = _backend_device()
    n = torch.tensor([len(b)], dtype=torch.long, device=dev)
    tdist.broadcast(n, src)
    t = torch.from_numpy(np.frombuffer(b, dtype=np.uint8).copy()).to(dev) if rank() == src else \
        torch.empty(int(n), dtype=torch.uint8, device=dev)
    tdist.broadcast(t, src)
    return bytes(t.cpu().numpy().tobytes())


def broadcast_json(obj, src: int = 0):
    """Rank `src`'s JSON-able object on every rank."""
    if not active():
        return obj
    return json.loads(broadcast_bytes(json.dumps(obj).encode() if rank() == src else b"", src))


def digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(a.dtype.str.encode() + str(a.shape).encode() + a.tobytes()).hexdigest()


def same_on_all_ranks(a: np.ndarray) -> bool:
    """True when `a` has the same bytes on every rank (checks a digest, not the data)."""
    if not active():
        return True
    d = np.frombuffer(bytes.fromhex(digest(a)), dtype=np.uint8)
    return all(np.array_equal(d, g) for g in all_gather_array(d))


# ---------------------------------------------------------------- indices and gathered results


def broadcast_index(index, src: int = 0):
    """Rank `src`'s SemanticIndex on every rank (call on all ranks after each (re-)assignment so every
    rank trains and decodes with the same IDs). Returns the index itself on one process."""
    from ttds.index.base import SemanticIndex

    if not active():
        return index
    meta = broadcast_json({"level_sizes": [int(s) for s in index.level_sizes], "prefixes": list(index.prefixes),
                           "tower": index.tower} if rank() == src else None, src)
    codes = broadcast_array(index.codes.astype(np.int64) if rank() == src else None, src)
    return SemanticIndex(codes, meta["level_sizes"], meta["prefixes"], meta["tower"])


def gather_batches(pieces: list[np.ndarray], n_batches: int) -> list[np.ndarray]:
    """Undo `shard_starts`: every rank's per-batch results back in global batch order (batch j came
    from rank j % world, as its (j // world)-th piece). Every rank receives the full list."""
    if not sharding():
        return pieces
    w = world()
    lens = np.asarray([len(p) for p in pieces], dtype=np.int64)
    flat = np.concatenate(pieces) if pieces else np.zeros((0,), dtype=np.int64)
    all_lens, all_flat = all_gather_array(lens), all_gather_array(flat)
    split = [np.split(f, np.cumsum(l)[:-1]) if len(l) else [] for l, f in zip(all_lens, all_flat)]
    out = [split[j % w][j // w] for j in range(n_batches)]
    return out


def gather_recs(users: list[int], recs: list[list[tuple]], k: int) -> tuple[list[int], list[list[tuple]]]:
    """Every rank's (user, ranked list of (item, score or None)) pairs, concatenated in rank order.
    Lists may be shorter than `k`; a None score travels as NaN."""
    if not active():
        return users, recs
    n = len(users)
    items, scores = np.full((n, k), -1, dtype=np.int64), np.full((n, k), np.nan)
    lengths, has_score = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for r, lst in enumerate(recs):
        lengths[r] = len(lst)
        has_score[r] = int(any(s is not None for _, s in lst))
        for j, (i, s) in enumerate(lst[:k]):
            items[r, j], scores[r, j] = i, np.nan if s is None else s
    g = [np.concatenate(all_gather_array(a)) for a in (np.asarray(users, dtype=np.int64), items, scores, lengths, has_score)]
    out = [[(int(i), float(s) if h else None) for i, s in zip(g[1][r, :m], g[2][r, :m])]
           for r, (m, h) in enumerate(zip(g[3], g[4]))]
    return [int(u) for u in g[0]], out


def sync_model_index(model) -> None:
    """After a (dynamic) re-assignment: rank 0's item and user indices on every rank, via
    `model.set_index(items, users)`. A no-op on one process."""
    if not active():
        return
    users = getattr(model, "user_index", None)
    model.set_index(broadcast_index(model.item_index), broadcast_index(users) if users is not None else None)
