"""Recipe `generative`: the LM recommender on a static semantic index (TTSS, LC-Rec, TIGER-style).

    ttds train --model ttss --data builtin        # then: ttds eval --model-dir runs/ttss-builtin --data builtin

Steps: leave-one-out split -> backbone (`backbone:` section) -> item (and user) semantic index
(`index:`) -> `GenerativeRecommender` -> epochs of the task mix (`tasks:`), whole user sequences per
example, length-bucketed batches, gradient accumulation, AdamW with warm-up + cosine -> validation
NDCG@10 (beam search on a fixed sample of validation users) with early stopping -> test.

Files in out_dir: config.yaml (resolved), run.log, index.item.json (+ .meta.json; index.user.json),
tokenizer/, model.safetensors (best weights), last.safetensors (weights + optimizer + RNG + trainer
state: running the same command again resumes exactly), state.json, metrics.json.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ttds import dist
from ttds.config import section
from ttds.data.dataset import EvalSet, RecDataset, leave_one_out
from ttds.errors import TTDSError
from ttds.eval.evaluator import evaluate
from ttds.index.base import SemanticIndex
from ttds.io import load_safetensors, read_json, save_safetensors, write_json
from ttds.models.generative import GenerativeRecommender
from ttds.runtime import machine_info, peak_rss_mb, start_run
from ttds.tasks import templates
from ttds.tasks.builders import TaskConfig, TaskData, build_epoch
from ttds.train.classic import _load_optim, _optim_tensors
from ttds.train.engine import bucket_batches, collate, dense_peak_flops, train_flops_per_token, warmup_cosine

log = logging.getLogger(__name__)


@dataclass
class GenTrainConfig:
    epochs: int = 10
    batch_size: int = 32  # sequences per micro-batch
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
    max_steps: int = 0  # stop after this many optimizer steps (0 = none)
    log_steps: int = 20
    precision: str = "fp32"  # fp32 | bf16 (autocast; for GPUs: CPUs without bf16 units run it ~100x slower)
    freeze_word_embeddings: bool = True  # the pretrained word table (half of MiniLM) stays fixed: faster steps


@dataclass
class GenEvalConfig:
    ks: list = field(default_factory=lambda: [1, 5, 10])
    batch_size: int = 1024  # users handed to recommend() at once
    mask_seen: bool = False
    beam: int = 20
    beam_batch: int = 32  # users per beam-search forward (x beam sequences)
    template: int = 0  # the fixed template of the reported numbers
    template_mean_users: int = 2000  # test users for the mean over all templates (0 = all, -1 = skip)
    final_valid: bool = True  # also evaluate the best model on every validation user at the end


@dataclass
class RecIndexConfig:
    source: str = "rqvae"  # given (the dataset's LC-Rec index) | rqvae | lsh | random
    user: bool = True  # user tower (twin-tower IDs in prompts, user prediction task)
    user_source: str = "rqvae"  # rqvae | lsh | random
    options: dict = field(default_factory=dict)  # the index builder's settings (ttds.index.build.IndexConfig)


# ---------------------------------------------------------------- indices


def tower_index(cfg: dict, ds: RecDataset, backbone, tower: str, kind: str, out: Path) -> SemanticIndex:
    """One tower's static index from the index layer (`index.options` are its settings)."""
    import copy

    from ttds.index.build import build_index, given_index

    if kind == "given":
        idx = given_index(ds, tower)
        if not idx.is_unique():  # the shipped Games / Instruments indices have 1.6 % / 0.5 % colliding items
            from ttds.index.build import index_from_codes

            log.warning("%s.index.json: %.2f%% of items share an ID; appending a disambiguation level",
                        ds.name, 100 * idx.collision_rate())
            idx = index_from_codes(idx.codes, idx.level_sizes, tower, "ttds")
        return idx
    cfg = copy.deepcopy(cfg)
    cfg["index"].setdefault("options", {})["kind"] = kind
    return build_index(cfg, ds, None if kind == "random" else backbone, tower, out)


def build_indices(cfg: dict, ic: RecIndexConfig, ds: RecDataset, backbone, out: Path) -> tuple[SemanticIndex, SemanticIndex | None]:
    items = tower_index(cfg, ds, backbone, "item", ic.source, out)
    users = tower_index(cfg, ds, backbone, "user", ic.user_source, out) if ic.user else None
    return items, users


# ---------------------------------------------------------------- model assembly


def _backbone(cfg: dict, device):
    from ttds.backbone import Backbone, BackboneConfig

    bcfg = section(cfg, "backbone", BackboneConfig)
    bcfg.causal, bcfg.device = True, str(device)
    bb = Backbone.load(bcfg)
    if bcfg.use_lora:
        bb.apply_lora()  # ID embeddings live outside the word table and are trained directly
    return bb


def build_model(cfg: dict, backbone, items: SemanticIndex, users: SemanticIndex | None) -> GenerativeRecommender:
    tc = section(cfg, "tasks", TaskConfig)
    ec = section(cfg, "eval", GenEvalConfig)
    model = GenerativeRecommender(backbone, items, users, max_text_tokens=tc.max_text_tokens)
    model.beam, model.beam_batch = ec.beam, ec.beam_batch
    model.eval_template = ec.template
    if not 0 <= ec.template < len(templates.SEQREC):
        raise TTDSError(f"config eval.template={ec.template}: expected 0..{len(templates.SEQREC) - 1}")
    return model


def _optimizer(model: GenerativeRecommender, tc: GenTrainConfig) -> torch.optim.Optimizer:
    new = [model.id_emb, model.id_bias] + list(model.head.parameters())
    new_ids = {id(p) for p in new}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in new_ids]
    return torch.optim.AdamW([{"params": body, "lr": tc.lr, "base_lr": tc.lr},
                              {"params": [p for p in new if p.requires_grad], "lr": tc.id_lr, "base_lr": tc.id_lr}],
                             weight_decay=tc.weight_decay)


def _sample(ev: EvalSet, n: int, seed: int) -> EvalSet:
    if not n or n >= len(ev):
        return ev
    idx = np.sort(np.random.default_rng(seed).choice(len(ev), n, replace=False))
    return EvalSet(ev.users[idx], ev.history[idx], ev.target[idx])


# ---------------------------------------------------------------- checkpoints


def weights(model: torch.nn.Module) -> dict:
    """state_dict without tied duplicates (BERT's LM-head decoder shares the word embeddings):
    safetensors refuses shared storage, and loading the first name restores the tie."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            out[k] = v
    return out


def load_weights(model: torch.nn.Module, tensors: dict) -> None:
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    dropped = set(model.state_dict()) - set(weights(model))
    if unexpected or set(missing) - dropped:
        raise TTDSError(f"checkpoint does not match the model: missing {sorted(set(missing) - dropped)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")


def save_checkpoint(out: Path, model, opt, state: dict) -> None:
    """One atomic file: weights + optimizer + torch RNG, trainer state in its metadata."""
    import json

    if not dist.is_main():  # under torchrun rank 0 writes (every rank holds the same weights)
        return
    otensors, ometa = _optim_tensors(opt)
    tensors = {f"model.{k}": v for k, v in weights(model).items()}
    tensors.update(otensors)
    tensors["rng.torch"] = torch.get_rng_state()
    save_safetensors(out / "last.safetensors", tensors, {"state": json.dumps(state), "optim": json.dumps(ometa)})
    write_json(out / "state.json", state)


def load_checkpoint(out: Path, model, opt) -> dict:
    import json

    from safetensors import safe_open

    with safe_open(str(out / "last.safetensors"), framework="pt") as f:
        meta = f.metadata()
    tensors = load_safetensors(out / "last.safetensors")
    load_weights(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    _load_optim(opt, tensors, json.loads(meta["optim"]))
    torch.set_rng_state(tensors["rng.torch"])
    return json.loads(meta["state"])


# ---------------------------------------------------------------- training


def train(cfg: dict, ds: RecDataset, out_dir: Path) -> dict:
    out = Path(out_dir)
    device = dist.setup(cfg, start_run(cfg, out))  # under torchrun: join the group, this rank's device
    tc = section(cfg, "train", GenTrainConfig)
    ec = section(cfg, "eval", GenEvalConfig)
    ic = section(cfg, "index", RecIndexConfig)
    task_cfg = section(cfg, "tasks", TaskConfig)
    seed = int(cfg.get("seed", 0))
    ks = tuple(ec.ks)
    if (out / "metrics.json").is_file() and (out / "state.json").is_file() and read_json(out / "state.json").get("done"):
        log.info("%s: already trained (metrics.json); delete the folder to retrain", out)
        return read_json(out / "metrics.json")

    max_hist = int(cfg["data"]["max_history"])
    split = leave_one_out(ds, max_hist)
    backbone = _backbone(cfg, device)
    with dist.main_first():  # under torchrun rank 0 builds and saves the index, the others load it
        if (out / "index.item.json").is_file():  # resuming: the index of the run, not a rebuilt one
            items = SemanticIndex.load(out / "index.item.json", "item")
            users = SemanticIndex.load(out / "index.user.json", "user") if (out / "index.user.json").is_file() else None
        else:
            items, users = build_indices(cfg, ic, ds, backbone, out)
            items.save(out / "index.item.json")
            if users is not None:
                users.save(out / "index.user.json")
        if dist.is_main():
            backbone.tokenizer.save_pretrained(str(out / "tokenizer"))
    model = build_model(cfg, backbone, items, users).to(device)
    if tc.freeze_word_embeddings:
        model.word_embeddings().requires_grad_(False)
    opt = _optimizer(model, tc)
    net = dist.wrap(model, cfg, find_unused=True)  # net(...) = model.loss(...), through DDP under torchrun
    data = TaskData(ds, split.train, model.codec, max_hist)
    valid = _sample(split.valid, tc.valid_users, seed)

    state = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best": -1.0, "best_step": 0, "bad": 0, "train_seconds": 0.0,
             "valid_seconds": 0.0, "tokens": 0, "history": [], "done": False, "stopped": ""}
    if (out / "last.safetensors").is_file():
        state = load_checkpoint(out, model, opt)
        log.info("resuming %s at epoch %d step %d (best valid NDCG@10 %.4f)", out, state["epoch"], state["step"], state["best"])
        if state["stopped"] in ("max_steps", "budget", "epochs"):  # a larger budget continues the run
            state["done"], state["stopped"] = False, ""

    # schedule length from the first epoch's batch count (the task mix is re-sampled each epoch)
    n_batches = len(bucket_batches(build_epoch(data, task_cfg, np.random.default_rng([seed, 0])), tc.batch_size,
                                   np.random.default_rng(0), tc.max_tokens))
    total_steps = max(1, tc.epochs * math.ceil(n_batches / tc.grad_accum))
    peak = dense_peak_flops()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("generative on %s: %d items (%d-level IDs), users %s, %.1fM trainable params, %d steps planned, "
             "dense matmul peak %.1f GFLOP/s", ds.name, items.n, items.n_levels,
             f"{users.n_levels}-level IDs" if users is not None else "off", n_trainable / 1e6, total_steps, peak / 1e9)
    budget = tc.max_minutes * 60 if tc.max_minutes else math.inf
    if tc.precision not in ("fp32", "bf16"):
        raise TTDSError(f"config train.precision={tc.precision!r}: expected fp32 or bf16")
    if tc.precision == "bf16" and device.type == "cpu":
        log.warning("train.precision=bf16 on a CPU: only useful with bf16 hardware (see NOTES: <1 GFLOP/s here)")

    def validate() -> None:
        t = time.perf_counter()
        val = evaluate(model, valid, ec.batch_size, ks, ec.mask_seen, device, desc="valid")
        state["valid_seconds"] += time.perf_counter() - t
        score = val["NDCG@10"] if "NDCG@10" in val else val[f"NDCG@{max(ks)}"]
        improved = score > state["best"]
        if improved:
            state["best"], state["best_step"], state["bad"] = score, state["step"], 0
            if dist.is_main():
                save_safetensors(out / "model.safetensors", weights(model))
            dist.barrier()  # every rank sees the file before it checks for it
        else:
            state["bad"] += 1
        state["history"].append({"step": state["step"], "epoch": state["epoch"], "train_seconds": round(state["train_seconds"], 1),
                                 "valid": {k: round(v, 5) for k, v in val.items() if k.startswith(("HR", "NDCG"))}})
        log.info("step %d: valid NDCG@10 %.4f HR@10 %.4f (best %.4f @ step %d), %.1fs", state["step"], score, val.get("HR@10", 0),
                 state["best"], state["best_step"], time.perf_counter() - t)
        if state["bad"] >= tc.patience:
            state["done"], state["stopped"] = True, "patience"
        model.train()

    flops_tok = None
    while not state["done"]:
        epoch = state["epoch"]
        if epoch >= tc.epochs:
            state["done"], state["stopped"] = True, state["stopped"] or "epochs"
            break
        rng = np.random.default_rng([seed, epoch])
        examples = build_epoch(data, task_cfg, rng)
        batches = bucket_batches(examples, tc.batch_size, rng, tc.max_tokens)
        if flops_tok is None:
            mean_len = float(np.mean([len(e.tokens) for e in examples]))
            flops_tok = train_flops_per_token(model, int(mean_len))
            log.info("%d examples (%d batches), mean length %.0f tokens, %.2f MFLOP/token (training)", len(examples),
                     len(batches), mean_len, flops_tok / 1e6)
        steps_in_epoch = math.ceil(len(batches) / tc.grad_accum)
        model.train()
        bar = tqdm(total=steps_in_epoch, initial=state["step_in_epoch"], desc=f"epoch {epoch + 1}", unit="step", leave=False,
                   disable=not dist.is_main())
        t_win, tok_win, loss_win, n_win = time.perf_counter(), 0, 0.0, 0
        while state["step_in_epoch"] < steps_in_epoch and not state["done"]:
            t0 = time.perf_counter()
            first = state["step_in_epoch"] * tc.grad_accum
            group = batches[first:first + tc.grad_accum]
            n_tgt = {i: int((torch.as_tensor(examples[i].target[1:])).sum()) for b in group for i in b}
            total_tgt = max(1, sum(n_tgt.values()))
            loss_sum, tokens = 0.0, 0
            for j, b in enumerate(group):
                part, factor = dist.shard(b, n_tgt)  # this rank's part of the global micro-batch
                ids, attn, labels = (x.to(device) for x in collate([examples[i] for i in part]))
                w = factor * sum(n_tgt[i] for i in b) / total_tgt  # token-weighted mean over the accumulated batches
                with dist.no_sync(net, j == len(group) - 1), \
                        torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16"):
                    loss = net(ids, attn, labels) * w
                    loss.backward()
                loss_sum += loss.item()
                tokens += int(attn.sum())
            loss_sum, tokens = dist.mean(loss_sum), int(dist.all_reduce(tokens))  # the global step's loss and tokens
            lr_mult = warmup_cosine(state["step"], total_steps, tc.warmup_steps, tc.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mult
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            state["step_in_epoch"] += 1
            state["tokens"] += tokens
            state.setdefault("losses", []).append(loss_sum)
            dt = time.perf_counter() - t0
            state["train_seconds"] += dt
            tok_win, loss_win, n_win = tok_win + tokens, loss_win + loss_sum, n_win + 1
            bar.update(1)
            if n_win >= tc.log_steps or state["step_in_epoch"] == steps_in_epoch:
                el = time.perf_counter() - t_win
                mfu = flops_tok * tok_win / el / peak
                bar.set_postfix(loss=f"{loss_win / n_win:.4f}", tok_s=f"{tok_win / el:.0f}", mfu=f"{mfu:.0%}")
                log.info("epoch %d step %d: loss %.4f, %.0f tokens/s, MFU %.1f%%, lr x%.3f", epoch + 1, state["step"],
                         loss_win / n_win, tok_win / el, 100 * mfu, lr_mult)
                state.setdefault("mfu", []).append(round(mfu, 4))
                t_win, tok_win, loss_win, n_win = time.perf_counter(), 0, 0.0, 0
            if tc.max_steps and state["step"] >= tc.max_steps:
                state["done"], state["stopped"] = True, "max_steps"
            if budget < math.inf and dist.any_rank(state["train_seconds"] >= budget):
                state["done"], state["stopped"] = True, "budget"
            if tc.eval_steps and state["step"] % tc.eval_steps == 0:
                validate()
                save_checkpoint(out, model, opt, state)
            elif tc.checkpoint_steps and state["step"] % tc.checkpoint_steps == 0:
                save_checkpoint(out, model, opt, state)
        bar.close()
        if state["step_in_epoch"] >= steps_in_epoch:
            state["epoch"], state["step_in_epoch"] = epoch + 1, 0
            if not tc.eval_steps and (state["epoch"] % tc.eval_every == 0 or state["epoch"] >= tc.epochs):
                validate()
        save_checkpoint(out, model, opt, state)
    if state["best_step"] != state["step"] and not (out / "model.safetensors").is_file():
        validate()
    save_checkpoint(out, model, opt, state)
    dist.barrier()  # model.safetensors is written

    best = load(out, device)
    t = time.perf_counter()
    test = evaluate(best, split.test, ec.batch_size, ks, ec.mask_seen, device, desc="test")
    test_seconds = time.perf_counter() - t
    valid_full = evaluate(best, split.valid, ec.batch_size, ks, ec.mask_seen, device, desc="valid") if ec.final_valid else \
        next(({**h["valid"], "n": len(valid)} for h in state["history"] if h["step"] == state["best_step"]), {})
    metrics = {
        "model": cfg.get("name") or "generative",
        "dataset": ds.name,
        "test": {k: v for k, v in test.items() if k != "eval_seconds"},
        "valid": {k: v for k, v in valid_full.items() if k != "eval_seconds"},
        "eval_template": ec.template,
        "steps": state["step"],
        "best_step": state["best_step"],
        "epochs": state["epoch"],
        "stopped": state["stopped"],
        "train_seconds": round(state["train_seconds"], 1),
        "valid_seconds": round(state["valid_seconds"], 1),
        "test_eval_seconds": round(test_seconds, 1),
        "train_tokens_per_second": round(state["tokens"] / max(state["train_seconds"], 1e-9), 1),
        "train_flops_per_token": flops_tok,
        "dense_peak_flops": peak,
        "mfu": round(float(np.median(state["mfu"])), 4) if state.get("mfu") else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "machine": machine_info(),
        "protocol": "leave-one-out, full ranking over all items (trie-constrained beam search), seen items not masked",
    }
    if ec.template_mean_users >= 0:
        metrics["test_template_mean"] = template_mean(best, split.test, ec, ks, device, seed)
    state["done"] = True
    if dist.is_main():
        write_json(out / "metrics.json", metrics)
        write_json(out / "state.json", state)
    dist.barrier()
    return metrics


def template_mean(model: GenerativeRecommender, ev: EvalSet, ec: GenEvalConfig, ks, device, seed: int) -> dict:
    """Metrics averaged over every sequential-recommendation template (on a fixed user sample)."""
    sample = _sample(ev, ec.template_mean_users, seed + 7)
    per = []
    keep = model.eval_template
    for t in range(len(templates.SEQREC)):
        model.eval_template = t
        per.append(evaluate(model, sample, ec.batch_size, ks, ec.mask_seen, device, progress=False, desc=f"template {t}"))
    model.eval_template = keep
    keys = [k for k in per[0] if k.startswith(("HR", "NDCG", "MRR"))]
    return {"n": len(sample), "templates": len(per), **{k: float(np.mean([p[k] for p in per])) for k in keys},
            "per_template": [{k: round(p[k], 5) for k in keys} for p in per]}


def load(out_dir: Path, device="cpu") -> GenerativeRecommender:
    """The best model of a run folder, ready for `recommend()`."""
    from ttds.recipes import run_config

    out = Path(out_dir)
    cfg = run_config(out)
    backbone = _backbone(cfg, device)
    items = SemanticIndex.load(out / "index.item.json", "item")
    users = SemanticIndex.load(out / "index.user.json", "user") if (out / "index.user.json").is_file() else None
    model = build_model(cfg, backbone, items, users)
    path = out / "model.safetensors"
    if not path.is_file():
        raise TTDSError(f"{out}: no model.safetensors (training has not reached a validation yet)")
    load_weights(model, load_safetensors(path))
    return model.to(device).eval()
