"""The one training loop of the LM recipes: `generative` (TTSS, LC-Rec, TIGER) and `dynamic` (TTDS).

    class MyTrainer(LMTrainer):          # a recipe overrides a few hooks
        def param_groups(self): ...
    metrics = MyTrainer(cfg, ds, out, split, model, device, load_fn).fit()

One optimizer step = `train.grad_accum` length-bucketed micro-batches of the epoch's task-mix examples
(`epoch_batches`: the same seed gives the same batches on every rank and after a resume; dropout masks come
from (seed, step, rank)). Under torchrun every GLOBAL micro-batch is split over the ranks (`dist.shard`) and
the losses are token-weighted so that N ranks take the same step as one process. AdamW with warm-up +
cosine, gradient clipping, tokens/s and MFU in the log, validation NDCG@10 (beam search on a fixed user
sample) every `train.eval_every` epochs or `train.eval_steps` steps with early stopping (`train.patience`),
budgets `train.max_steps` and `train.max_minutes`. last.safetensors (weights + optimizer + trainer state,
one atomic file written by rank 0) after each validation and epoch: the same command resumes exactly, on any
world size.

Hooks (override in a recipe; all optional but `param_groups`):
    param_groups()     the AdamW groups: dicts with params, lr, base_lr, name
    extra_state()      the recipe's fields of the trainer state (kept in checkpoints and state.json)
    on_resume()        after a checkpoint was loaded
    before_step()      e.g. freeze / unfreeze parameter groups
    set_lr()           this step's learning rates (default: warm-up + cosine); returns the multiplier
    grad_groups()      {log name: parameters} whose gradient norms are logged (default: all, "grad_norm")
    extra_loss()       (loss, parts) added to the last micro-batch of a step, INSIDE the wrapped forward
                       (so DDP / FSDP synchronise its gradients too); parts are floats to log, averaged over ranks
    after_step(parts)  True when the task data changed (the rest of the epoch is rebuilt with the same order)
    on_epoch_end()     after the epoch's validation
    on_best()          rank 0, after a new best model.safetensors was written
    extra_metrics()    the recipe's fields of metrics.json

Distributed: `dist.strategy: ddp` (default) or `fsdp` (FSDP2: parameters, gradients and optimizer state
sharded; checkpoints gather full tensors, so a run moves between strategies and world sizes). Code that
uses the parameters outside the forward (validation, re-assignment) runs inside `self.full_params()`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ttds import dist
from ttds.config import section
from ttds.data.dataset import EvalSet, RecDataset, Split, leave_one_out, repeat_rate
from ttds.errors import TTDSError
from ttds.eval.evaluator import evaluate
from ttds.io import load_safetensors, read_json, save_safetensors, write_json
from ttds.runtime import has_fast_bf16, machine_info, peak_rss_mb, resolve_precision, start_run
from ttds.tasks.builders import USER_PROFILES, TaskConfig, TaskData, build_epoch
from ttds.train.classic import _load_optim, _optim_tensors
from ttds.train.engine import bucket_batches, can_continue, collate, finished, dense_peak_flops, train_flops_per_token, warmup_cosine

log = logging.getLogger(__name__)


@dataclass
class GenTrainConfig:
    epochs: int = 10
    batch_size: int = 32  # sequences per GLOBAL micro-batch (all ranks together)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_tokens: int = 0  # cap on padded tokens per micro-batch (0 = none)
    lr: float = 1e-4  # backbone
    id_lr: float = 1e-3  # new parameters: ID embeddings, ID bias, head transform
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    patience: int = 3  # validations without improvement before stopping
    eval_every: int = 1  # epochs between validations (used when eval_steps = 0)
    eval_steps: int = 0  # optimizer steps between validations (0 = by epochs)
    valid_users: int = 2000  # validation on a fixed random sample of users (0 = all)
    checkpoint_steps: int = 0  # steps between last.safetensors saves (0 = at validations / epoch ends)
    max_minutes: float = 0.0  # training wall-clock budget (0 = none)
    max_steps: int = 0  # stop after this many optimizer steps (0 = none); the lr schedule then ends there (as HF Trainer)
    log_steps: int = 20
    precision: str = "fp32"  # fp32 | bf16 (autocast) | auto (bf16 on a GPU or CPU with bf16 units: runtime.has_fast_bf16)
    freeze_word_embeddings: bool = True  # the pretrained word table (half of MiniLM) stays fixed: faster steps


@dataclass
class GenEvalConfig:
    ks: list = field(default_factory=lambda: [1, 5, 10])
    batch_size: int = 1024  # users handed to recommend() at once
    mask_seen: bool = False
    beam: int = 20
    beam_batch: int = 32  # users per beam-search forward (x beam sequences)
    precision: str = "auto"  # beam search in fp32 | bf16 (autocast) | auto (bf16 where runtime.has_fast_bf16)
    template: int = 0  # the fixed template of the reported numbers
    template_mean_users: int = 2000  # test users for the mean over all templates (0 = all, -1 = skip)
    final_valid: bool = True  # also evaluate the best model on every validation user at the end
    # the model's own rule for the user's history items: keep (searched like any item) | exclude (searched around,
    # never recommended) | auto (exclude iff no training target repeats an item of its history window: the
    # maximum-likelihood seen-item bias is then -inf; resolved from the training data when training starts)
    seen_items: str = "keep"


SEEN_ITEMS = ("keep", "exclude", "auto")


def resolve_seen_items(cfg: dict, ds: RecDataset) -> str:
    """`eval.seen_items` as keep | exclude; `auto` is decided from the training part of `ds` and written back
    into `cfg` (the run's config.yaml then records the decision, and `load()` needs no data)."""
    mode = (cfg.get("eval") or {}).get("seen_items", "keep")
    if mode not in SEEN_ITEMS:
        raise TTDSError(f"config eval.seen_items={mode!r}: expected one of {', '.join(SEEN_ITEMS)}")
    if mode == "auto":
        H = int(cfg["data"]["max_history"])
        rate = repeat_rate([s[:-2] for s in ds.sequences], H)
        mode = "exclude" if rate == 0 else "keep"
        log.info("eval.seen_items=auto: %.4f of training targets repeat an item of their %d-item history -> %s", rate, H, mode)
        cfg.setdefault("eval", {})["seen_items"] = mode
    return mode


def resolve_user_profile(cfg: dict, ds: RecDataset, user_source: str | None) -> str:
    """`tasks.user_profile` as all | earlier, written back into `cfg` like `resolve_seen_items`. `auto` is `earlier`
    when the model's user tower can code any item profile (`ttds.index.profiles.profile_coding_problem`: rqvae or
    lsh on item-mean user vectors), else `all`. An explicit `earlier` that the tower cannot serve fails here, before
    any index is built (`user_source` None, no user tower: no user IDs, so `earlier` changes nothing)."""
    from ttds.index.profiles import profile_coding_problem

    tasks = cfg.setdefault("tasks", {})
    mode = tasks.get("user_profile", "all")
    if mode not in USER_PROFILES:
        raise TTDSError(f"config tasks.user_profile={mode!r}: expected one of {', '.join(USER_PROFILES)}")
    why = "no user tower" if user_source is None else profile_coding_problem(cfg, ds, user_source)
    if mode == "earlier" and user_source is not None and why:
        raise TTDSError(f"config tasks.user_profile=earlier: {why}")
    if mode == "auto":
        mode = "all" if why else "earlier"
        log.info("tasks.user_profile=auto: user tower %s -> %s%s", user_source or "none", mode, f" ({why})" if why else "")
        tasks["user_profile"] = mode
    return mode


# ---------------------------------------------------------------- checkpoints


def weights(model: nn.Module) -> dict:
    """state_dict without tied duplicates (BERT's LM-head decoder shares the word embeddings):
    safetensors refuses shared storage, and loading the first name restores the tie.
    FSDP-sharded tensors are gathered to full ones, so under FSDP every rank must call this."""
    out, seen = {}, set()
    for k, v in model.state_dict(keep_vars=True).items():
        if dist.is_sharded(v):
            key = id(v)  # a shard's storage says nothing about ties; the parameter object does
        else:
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            out[k] = dist.full_tensor(v).detach()
    return out


def load_weights(model: nn.Module, tensors: dict) -> None:
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    dropped = set(model.state_dict()) - set(weights(model))
    if unexpected or set(missing) - dropped:
        raise TTDSError(f"checkpoint does not match the model: missing {sorted(set(missing) - dropped)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")


def save_checkpoint(out: Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """One atomic file: weights + optimizer, the trainer state in its metadata; state.json beside it.
    Call on every rank (FSDP gathers the shards); rank 0 writes."""
    otensors, ometa = _optim_tensors(opt)
    tensors = {f"model.{k}": v for k, v in weights(model).items()}
    tensors.update({k: dist.full_tensor(v) for k, v in otensors.items()})
    if dist.is_main():
        save_safetensors(out / "last.safetensors", tensors, {"state": json.dumps(state), "optim": json.dumps(ometa)})
        write_json(out / "state.json", state)


def read_checkpoint(out: Path) -> tuple[dict, dict, dict]:
    """(tensors, optimizer metadata, trainer state) of out/last.safetensors."""
    from safetensors import safe_open

    with safe_open(str(out / "last.safetensors"), framework="pt") as f:
        meta = f.metadata()
    return load_safetensors(out / "last.safetensors"), json.loads(meta["optim"]), json.loads(meta["state"])


def start(cfg: dict, ds: RecDataset, out_dir: Path) -> tuple[Path, torch.device, Split | None]:
    """A recipe's first lines: the run folder (config.yaml, run.log, seeds), the torchrun process group and this
    rank's device, and the leave-one-out split (None when the run is already finished: metrics.json is its result)."""
    out = Path(out_dir)
    device = dist.setup(cfg, start_run(cfg, out))
    if finished(out, section(cfg, "train", GenTrainConfig)):
        log.info("%s: already trained (metrics.json); delete the folder to retrain, or raise a limit (train.max_steps, "
                 "max_minutes, epochs, patience) to continue it", out)
        return out, device, None
    return out, device, leave_one_out(ds, int(cfg["data"]["max_history"]))


# ---------------------------------------------------------------- small pieces


def epoch_batches(data: TaskData, task_cfg: TaskConfig, tc: GenTrainConfig, seed: int, epoch: int):
    """The epoch's task-mix examples and length-bucketed micro-batches. A fixed RNG stream per epoch: every
    rank, a resumed run and a rebuild after a code re-assignment get the same batches (buckets by `Example.slots`,
    which counts a short ID's missing token: a re-assignment that lengthens or shortens an ID moves no example)."""
    rng = np.random.default_rng([seed, epoch])
    examples = build_epoch(data, task_cfg, rng)
    return examples, bucket_batches(examples, tc.batch_size, rng, tc.max_tokens)


def sample_users(ev: EvalSet, n: int, seed: int) -> EvalSet:
    """A fixed random sample of `n` users of an evaluation set (all when n = 0 or n >= its size)."""
    if not n or n >= len(ev):
        return ev
    idx = np.sort(np.random.default_rng(seed).choice(len(ev), n, replace=False))
    return EvalSet(ev.users[idx], ev.history[idx], ev.target[idx])


def template_mean(model, ev: EvalSet, ec: GenEvalConfig, ks, device, seed: int) -> dict:
    """Metrics averaged over every sequential-recommendation template (on a fixed user sample)."""
    sample = sample_users(ev, ec.template_mean_users, seed + 7)
    per = []
    keep = model.eval_template
    for t in range(len(model.codec.seqrec)):
        model.eval_template = t
        per.append(evaluate(model, sample, ec.batch_size, ks, ec.mask_seen, device, progress=False, desc=f"template {t}"))
    model.eval_template = keep
    keys = [k for k in per[0] if k.startswith(("HR", "NDCG", "MRR"))]
    return {"n": len(sample), "templates": len(per), **{k: float(np.mean([p[k] for p in per])) for k in keys},
            "per_template": [{k: round(p[k], 5) for k in keys} for p in per]}


class StepLoss(nn.Module):
    """The forward DDP / FSDP wrap: a micro-batch's weighted LM loss, plus the recipe's extra loss on the last
    micro-batch of the step. Returns (LM loss, loss to backpropagate, extra parts)."""

    def __init__(self, model: nn.Module, extra_loss):
        super().__init__()
        self.model = model
        self.extra_loss = extra_loss

    def forward(self, ids, attn, labels, weight: float, last: bool):
        lm = self.model.loss(ids, attn, labels) * weight
        extra = self.extra_loss() if last else None
        if extra is None:
            return lm, lm, {}
        return lm, lm + extra[0], extra[1]


# ---------------------------------------------------------------- the loop


class LMTrainer:
    def __init__(self, cfg: dict, ds: RecDataset, out: Path, split: Split, model: nn.Module, device, load_fn):
        self.cfg, self.ds, self.out, self.split, self.model, self.device = cfg, ds, Path(out), split, model, device
        self.load_fn = load_fn  # out_dir, device -> the best model of the run (the recipe's `load`)
        self.tc = section(cfg, "train", GenTrainConfig)
        self.ec = section(cfg, "eval", GenEvalConfig)
        self.task_cfg = section(cfg, "tasks", TaskConfig)
        self.seed = int(cfg.get("seed", 0))
        self.ks = tuple(self.ec.ks)
        self.max_hist = int(cfg["data"]["max_history"])
        self.valid = sample_users(split.valid, self.tc.valid_users, self.seed)
        self.data: TaskData | None = None
        self.tc.precision = resolve_precision(self.tc.precision, device, "train.precision")
        if self.tc.precision == "bf16" and not has_fast_bf16(device):
            log.warning("train.precision=bf16 without bf16 units on %s: very slow (../shared/NOTES.md: <1 GFLOP/s)", device)

    # ------------------------------------------------------------ hooks (see the module doc)

    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def on_resume(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def set_lr(self) -> float:
        mult = warmup_cosine(self.state["step"], self.total_steps, self.tc.warmup_steps, self.tc.min_lr_ratio)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * mult
        return mult

    def extra_loss(self) -> tuple[torch.Tensor, dict] | None:
        return None

    def grad_groups(self) -> dict[str, list]:
        """{log name: parameters} whose gradient norm (before clipping) is logged with the loss. `train.grad_clip`
        clips all gradients together, whatever the groups."""
        return {"grad_norm": list(self.model.parameters())}

    def after_step(self, parts: dict) -> bool:
        return False

    def on_epoch_end(self) -> None:
        pass

    def on_best(self) -> None:
        pass

    def extra_metrics(self) -> dict:
        return {}

    # ------------------------------------------------------------ helpers for recipes

    def full_params(self):
        """Context: the full parameters on every rank (FSDP), for code that bypasses the forward."""
        return dist.unsharded_params(self.net)

    def profile_ids(self):
        """`ttds.index.profiles.ProfileIDs` of the model's user tower as it is now, for `tasks.user_profile: earlier`
        (None: the model cannot code item profiles)."""
        return None

    def new_task_data(self, buyers=None) -> TaskData:
        """The task data with the model's current IDs (`buyers`: reuse the item -> users lists of the previous one)."""
        tokens = None
        if self.task_cfg.user_profile == "earlier" and self.model.user_index is not None:
            pid = self.profile_ids()
            if pid is not None:
                def tokens(profiles, owners):
                    return self.model.id_tokens("user", pid.codes(profiles, owners))
        return TaskData(self.ds, self.split.train, self.model.codec, self.max_hist, buyers if buyers is not None else [], tokens)

    # ------------------------------------------------------------ the loop

    def setup(self) -> None:
        """Freeze, resume the weights, wrap (DDP / FSDP), build the optimizer, resume its state."""
        tc, out, model = self.tc, self.out, self.model
        if tc.freeze_word_embeddings:
            model.word_embeddings().requires_grad_(False)
        model.zero_grad(set_to_none=True)
        self.state = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best": -1.0, "best_step": 0, "bad": 0, "train_seconds": 0.0,
                      "valid_seconds": 0.0, "tokens": 0, "history": [], "done": False, "stopped": "", **self.extra_state()}
        ckpt = read_checkpoint(out) if (out / "last.safetensors").is_file() else None
        if ckpt is not None:  # weights before wrapping (FSDP shards what it is given), optimizer state after
            load_weights(model, {k[6:]: v for k, v in ckpt[0].items() if k.startswith("model.")})
        self.net = dist.wrap(model, self.cfg, module=StepLoss(model, self.extra_loss), find_unused=True, fsdp=True,
                             sync_buffers=False)  # buffers (codes, X) are kept equal by the recipe
        self.opt = torch.optim.AdamW([g for g in self.param_groups() if g["params"]], weight_decay=tc.weight_decay)
        if ckpt is not None:
            tensors, ometa, self.state = ckpt
            _load_optim(self.opt, tensors, ometa)
            dist.shard_optimizer_state(self.opt)  # FSDP: full tensors of the file -> this rank's shards
            log.info("resuming %s at epoch %d step %d (best valid NDCG@10 %.4f)", out, self.state["epoch"], self.state["step"],
                     self.state["best"])
            if self.state["done"] and can_continue(self.state, tc):  # a larger limit continues the run
                log.info("continuing a run stopped by %s: the config allows more", self.state["stopped"])
                self.state["done"], self.state["stopped"] = False, ""
            self.on_resume()
        self.data = self.new_task_data()
        # schedule length from the first epoch's batch count (the task mix is re-sampled each epoch)
        n_batches = len(bucket_batches(build_epoch(self.data, self.task_cfg, np.random.default_rng([self.seed, 0])), tc.batch_size,
                                       np.random.default_rng(0), tc.max_tokens))
        self.per_epoch = per_epoch = max(1, math.ceil(n_batches / tc.grad_accum))
        # the cosine ends where training ends: `train.max_steps` when it comes before the last epoch. (Until
        # session 4 it always ended after `train.epochs`: a 2-epoch budget of a 10-epoch plan kept the lr at
        # x0.93, and validation NDCG@10 swung by up to 0.015 between neighbouring checkpoints.) A resume with a
        # larger max_steps stretches the rest of the schedule.
        self.total_steps = max(1, min(tc.epochs * per_epoch, tc.max_steps) if tc.max_steps else tc.epochs * per_epoch)
        if tc.warmup_steps * 2 > self.total_steps:
            log.warning("train.warmup_steps=%d is over half of the %d planned steps: the lr peaks late or never "
                        "(set train.warmup_steps lower for a short run)", tc.warmup_steps, self.total_steps)
        # the epochs this run will reach: `train.max_steps` may end it first (what "the final epochs" count from)
        self.last_epoch = min(tc.epochs, math.ceil(tc.max_steps / per_epoch)) if tc.max_steps else tc.epochs
        # MFU on CPU: FLOP per CPU-second of this process against the matmul's (robust to a shared machine);
        # elsewhere per wall second
        self.clock = time.process_time if torch.device(self.device).type == "cpu" else time.perf_counter
        # against the peak of the precision the steps run in (a bf16 matmul is ~6x fp32's on an AMX CPU)
        self.peak = dense_peak_flops(clock=self.clock, dtype=torch.bfloat16 if tc.precision == "bf16" else torch.float32)
        self.flops_tok = None
        self.epoch_time = (0.0, 0.0)  # (wall, CPU) seconds of the current epoch's steps in this process
        self.budget = tc.max_minutes * 60 if tc.max_minutes else math.inf

    def save(self) -> None:
        save_checkpoint(self.out, self.model, self.opt, self.state)

    def validate(self) -> None:
        s, ec = self.state, self.ec
        t = time.perf_counter()
        with self.full_params():
            val = evaluate(self.model, self.valid, ec.batch_size, self.ks, ec.mask_seen, self.device, desc="valid")
        s["valid_seconds"] += time.perf_counter() - t
        score = val["NDCG@10"] if "NDCG@10" in val else val[f"NDCG@{max(self.ks)}"]
        if score > s["best"]:  # every rank has the same (gathered) metrics, so they all take this branch
            s["best"], s["best_step"], s["bad"] = score, s["step"], 0
            best = weights(self.model)  # on every rank: FSDP gathers the shards
            if dist.is_main():
                save_safetensors(self.out / "model.safetensors", best)
                self.on_best()
            dist.barrier()  # every rank sees the files before it checks for them
        else:
            s["bad"] += 1
        s["history"].append({"step": s["step"], "epoch": s["epoch"], "train_seconds": round(s["train_seconds"], 1),
                             "valid": {k: round(v, 5) for k, v in val.items() if k.startswith(("HR", "NDCG"))}})
        log.info("step %d: valid NDCG@10 %.4f HR@10 %.4f (best %.4f @ step %d), %.1fs", s["step"], score, val.get("HR@10", 0),
                 s["best"], s["best_step"], time.perf_counter() - t)
        if s["bad"] >= self.tc.patience:
            s["done"], s["stopped"] = True, "patience"
        self.model.train()

    def step(self, examples, batches) -> tuple[float, int, dict, float]:
        """One optimizer step over the next `grad_accum` global micro-batches: (loss, tokens, extra parts, lr multiplier)."""
        s, tc, device = self.state, self.tc, self.device
        t0, c0 = time.perf_counter(), time.process_time()
        self.before_step()
        # dropout masks from (seed, step, rank): a resumed run draws the masks the uninterrupted one would have,
        # and ranks draw different masks for their different sequences
        torch.manual_seed(dist.rank_seed(self.seed * 1_000_003 + s["step"]))
        first = s["step_in_epoch"] * tc.grad_accum
        group = batches[first:first + tc.grad_accum]
        n_tgt = {i: int(examples[i].target[1:].sum()) for b in group for i in b}
        total_tgt = max(1, sum(n_tgt.values()))
        loss_sum, tokens, parts = 0.0, 0, {}
        for j, b in enumerate(group):
            part, factor = dist.shard(b, n_tgt)  # this rank's part of the global micro-batch
            ids, attn, labels = (x.to(device) for x in collate([examples[i] for i in part]))
            w = factor * sum(n_tgt[i] for i in b) / total_tgt  # token-weighted mean over the accumulated batches
            last = j == len(group) - 1
            with dist.no_sync(self.net, last), \
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16"):
                lm, loss, p = self.net(ids, attn, labels, w, last)
                loss.backward()
            loss_sum += lm.item()
            tokens += int(attn.sum())
            parts.update(p)
        loss_sum, tokens = dist.mean(loss_sum), int(dist.all_reduce(tokens))  # the global step's loss and tokens
        parts = {k: dist.mean(v) for k, v in sorted(parts.items())}
        mult = self.set_lr()
        for name, params in self.grad_groups().items():  # logged before clipping (global norms: grads are synchronised)
            parts[name] = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], tc.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        s["step"] += 1
        s["step_in_epoch"] += 1
        s["tokens"] += tokens
        s.setdefault("losses", []).append(loss_sum)
        s.setdefault("lr_mult", []).append(round(mult, 6))
        dt = time.perf_counter() - t0
        s["train_seconds"] += dt
        self.epoch_time = (self.epoch_time[0] + dt, self.epoch_time[1] + time.process_time() - c0)
        return loss_sum, tokens, parts, mult

    def fit(self) -> dict:
        self.setup()
        s, tc = self.state, self.tc
        model = self.model
        log.info("%s on %s: %d items (ID levels %s), users %s, %.1fM trainable params, %d steps planned, %d process(es), "
                 "dense %s matmul peak %.1f GFLOP per %s", type(self).__name__, self.ds.name, model.item_index.n, model.item_index.level_sizes,
                 model.user_index.level_sizes if model.user_index is not None else "off",
                 sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, self.total_steps, dist.world(), tc.precision, self.peak / 1e9,
                 "CPU-second" if self.clock is time.process_time else "second")
        while not s["done"]:
            epoch = s["epoch"]
            if epoch >= tc.epochs:
                s["done"], s["stopped"] = True, s["stopped"] or "epochs"
                break
            examples, batches = epoch_batches(self.data, self.task_cfg, tc, self.seed, epoch)
            if self.flops_tok is None:
                mean_len = float(np.mean([len(e.tokens) for e in examples]))
                self.flops_tok = train_flops_per_token(model, int(mean_len))
                log.info("%d examples (%d batches), mean length %.0f tokens, %.2f MFLOP/token (training)", len(examples),
                         len(batches), mean_len, self.flops_tok / 1e6)
            steps_in_epoch = math.ceil(len(batches) / tc.grad_accum)
            model.train()
            bar = tqdm(total=steps_in_epoch, initial=s["step_in_epoch"], desc=f"epoch {epoch + 1}", unit="step", leave=False,
                       disable=not dist.is_main())
            win = {"t": time.perf_counter(), "c": self.clock(), "tok": 0, "loss": 0.0, "n": 0, "parts": {}}
            while s["step_in_epoch"] < steps_in_epoch and not s["done"]:
                loss, tokens, parts, mult = self.step(examples, batches)
                win["tok"], win["loss"], win["n"] = win["tok"] + tokens, win["loss"] + loss, win["n"] + 1
                for k, v in parts.items():
                    win["parts"][k] = win["parts"].get(k, 0.0) + v
                bar.update(1)
                if win["n"] >= tc.log_steps or s["step_in_epoch"] == steps_in_epoch:
                    el = time.perf_counter() - win["t"]
                    mfu = self.flops_tok * win["tok"] / max(self.clock() - win["c"], 1e-9) / self.peak
                    extra = {k: v / win["n"] for k, v in win["parts"].items()}
                    bar.set_postfix(loss=f"{win['loss'] / win['n']:.4f}", **{k: f"{v:.3f}" for k, v in extra.items()},
                                    tok_s=f"{win['tok'] / el:.0f}", mfu=f"{mfu:.0%}")
                    log.info("epoch %d step %d: loss %.4f%s, %.0f tokens/s, MFU %.1f%%, lr x%.3f", epoch + 1, s["step"],
                             win["loss"] / win["n"], "".join(f", {k} {v:.4f}" for k, v in extra.items()), win["tok"] / el,
                             100 * mfu, mult)
                    s.setdefault("mfu", []).append(round(mfu, 4))
                    win = {"t": time.perf_counter(), "c": self.clock(), "tok": 0, "loss": 0.0, "n": 0, "parts": {}}
                if tc.max_steps and s["step"] >= tc.max_steps:
                    s["done"], s["stopped"] = True, "max_steps"
                if self.budget < math.inf and dist.any_rank(s["train_seconds"] >= self.budget):
                    s["done"], s["stopped"] = True, "budget"
                if self.after_step(parts):  # e.g. codes re-assigned mid-epoch: the rest of the epoch with the new IDs, same order
                    examples, batches = epoch_batches(self.data, self.task_cfg, tc, self.seed, epoch)
                if tc.eval_steps and s["step"] % tc.eval_steps == 0:
                    self.validate()
                    self.save()
                elif tc.checkpoint_steps and s["step"] % tc.checkpoint_steps == 0:
                    self.save()
            bar.close()
            if s["step_in_epoch"] >= steps_in_epoch:
                s["epoch"], s["step_in_epoch"] = epoch + 1, 0
                # this process's training-step time of the epoch (wall, and CPU of this rank), as the classic recipe
                s.setdefault("epoch_seconds", []).append(round(self.epoch_time[0], 2))
                s.setdefault("epoch_cpu_seconds", []).append(round(self.epoch_time[1], 2))
                self.epoch_time = (0.0, 0.0)
                if not tc.eval_steps and (s["epoch"] % tc.eval_every == 0 or s["epoch"] >= tc.epochs):
                    self.validate()
                self.on_epoch_end()
            self.save()
        # the final weights are always a candidate: a step/minute budget can end training between validations
        if not (self.out / "model.safetensors").is_file() or not s["history"] or s["history"][-1]["step"] != s["step"]:
            self.validate()
        self.save()
        dist.barrier()  # model.safetensors and last.safetensors are written
        return self.finish()

    def finish(self) -> dict:
        """Test (and full validation) metrics of the best model; metrics.json and the final state.json."""
        s, ec, ks, device = self.state, self.ec, self.ks, self.device
        best = self.load_fn(self.out, device)
        t = time.perf_counter()
        test = evaluate(best, self.split.test, ec.batch_size, ks, ec.mask_seen, device, desc="test",
                        ranks_to=self.out / "ranks-test.safetensors")
        test_seconds = time.perf_counter() - t
        valid_full = evaluate(best, self.split.valid, ec.batch_size, ks, ec.mask_seen, device, desc="valid",
                              ranks_to=self.out / "ranks-valid.safetensors") if ec.final_valid else \
            next(({**h["valid"], "n": len(self.valid)} for h in s["history"] if h["step"] == s["best_step"]), {})
        metrics = {
            "model": self.cfg.get("name") or self.cfg.get("recipe"),
            "dataset": self.ds.name,
            "test": {k: v for k, v in test.items() if k != "eval_seconds"},
            "valid": {k: v for k, v in valid_full.items() if k != "eval_seconds"},
            "eval_template": ec.template,
            "steps": s["step"],
            "best_step": s["best_step"],
            "best_epoch": next((h["epoch"] for h in s["history"] if h["step"] == s["best_step"]), s["epoch"]),
            "epochs": s["epoch"],
            "stopped": s["stopped"],
            "world_size": dist.world(),
            "train_seconds": round(s["train_seconds"], 1),
            "valid_seconds": round(s["valid_seconds"], 1),
            "test_eval_seconds": round(test_seconds, 1),
            "eval_seconds": round(test_seconds, 1),
            "seconds_per_epoch": round(s["train_seconds"] / max(1, s["epoch"]), 1),
            "train_tokens_per_second": round(s["tokens"] / max(s["train_seconds"], 1e-9), 1),
            "train_flops_per_token": self.flops_tok,
            "dense_peak_flops": self.peak,
            "precision": {"train": self.tc.precision, "eval": getattr(best, "precision", "fp32")},
            "mfu": round(float(np.median(s["mfu"])), 4) if s.get("mfu") else None,
            "valid_history": s["history"],
            **self.extra_metrics(),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "machine": machine_info(),
            "protocol": "leave-one-out, full ranking over all items (trie-constrained beam search), seen items not masked",
        }
        if ec.template_mean_users >= 0 and len(best.codec.seqrec) > 1:  # one template (tasks.prompt: ids): the test row
            metrics["test_template_mean"] = template_mean(best, self.split.test, ec, ks, device, self.seed)
        s["done"] = True
        if dist.is_main():
            write_json(self.out / "metrics.json", metrics)
            write_json(self.out / "state.json", s)
        dist.barrier()
        return metrics
