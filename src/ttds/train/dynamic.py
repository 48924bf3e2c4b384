"""Recipe `dynamic`: TTDS, the twin-tower tokenizers trained jointly with the recommender.

    ttds train --model ttds --data builtin          # ablations: stds, ttds_dm, stds_dm, ttds_ho, ttds_3, ...

Steps (see `ttds.models.ttds` for how the losses reach the tokenizers):
  1. leave-one-out split, backbone (causal), item (and user) texts -> X = f(C) with that backbone;
  2. each tower's tokenizer is first fitted as a static RQ-VAE (or LSH) by the index builder
     (`index.options`), then moved INTO the model (`TowerTokenizer`), ID embeddings = P(codebooks);
  3. warm-up (`dynamic.warmup_steps`): backbone frozen, tokenizers + ID head trained on L_all
     (paper: lr 1e-3, `dynamic.warmup_lr`);
  4. joint training: everything trained on L_all = L_LLM + alpha * (L_ID + beta * L_Token) (AdamW;
     backbone `train.lr`, ID head `train.id_lr`, tokenizers `dynamic.tokenizer_lr`, paper 5e-4),
     warm-up + cosine schedule;
  5. every `dynamic.reassign_every` epochs (or `dynamic.reassign_steps` steps): X re-encoded with the
     current backbone (`dynamic.refresh_text`), codes of all items and users re-assigned, collisions
     re-resolved, tries and prompts rebuilt; the share of changed IDs is logged and kept in metrics;
  6. optional late freeze (`dynamic.freeze_last_epochs`, ETEGRec-style): no re-assignment and frozen
     tokenizers in the final epochs;
  7. validation NDCG@10 with early stopping; the best weights (with the index they were trained
     with: the codes are model buffers) -> test, and the mean over all templates.

Flags: `dynamic.enabled: false` keeps the tokenizers frozen and the codes fixed (a static index in
this recipe), `loss.alpha: 0` drops L_DM-VAE, `index.user: false` drops the user tower (STDS),
`tasks.userpred/review: 0` drop the high-order tasks, `index.source: lsh` (and `user_source: lsh`) makes TT-DLSH.

Files in out_dir: as the generative recipe (config.yaml, run.log, model.safetensors, last.safetensors,
state.json, metrics.json, tokenizer/) plus tokenizer.<tower>/ (the static fit the run started from)
and index.<tower>.json (the index of the best model, LC-Rec format).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ttds.config import section
from ttds.data.dataset import RecDataset, leave_one_out
from ttds.errors import TTDSError
from ttds.eval.evaluator import evaluate
from ttds.io import load_safetensors, read_json, save_safetensors, write_json
from ttds.models.ttds import TowerTokenizer, TTDSRecommender
from ttds.runtime import machine_info, peak_rss_mb, start_run
from ttds.tasks import templates
from ttds.tasks.builders import TaskConfig, TaskData, build_epoch
from ttds.train.engine import bucket_batches, collate, dense_peak_flops, train_flops_per_token, warmup_cosine
from ttds.train.generative import (GenEvalConfig, GenTrainConfig, RecIndexConfig, _backbone, _sample, load_checkpoint,
                                   load_weights, save_checkpoint, template_mean, weights)

log = logging.getLogger(__name__)


@dataclass
class DynamicConfig:
    enabled: bool = True  # false: tokenizers frozen, codes never re-assigned (static index)
    warmup_steps: int = 50  # tokenizer warm-up steps with the backbone frozen
    warmup_lr: float = 1e-3  # paper: 1e-3
    tokenizer_lr: float = 5e-4  # joint phase (paper: AdamW 5e-4)
    reassign_every: int = 1  # epochs between code re-assignments (0 = never by epochs)
    reassign_steps: int = 0  # optimizer steps between re-assignments (0 = by epochs)
    refresh_text: bool = True  # re-encode X = f(C) with the current backbone at each re-assignment
    freeze_last_epochs: int = 0  # ETEGRec-style: no re-assignment, frozen tokenizers in the final epochs
    disambig_capacity: int = 64  # size of the disambiguation level (fixed token space)


@dataclass
class LossConfig:
    alpha: float = 0.5  # L_all = L_LLM + alpha * L_DM-VAE   (0 = no DM-VAE: the TTDS-DM ablation)
    beta: float = 0.5  # L_DM-VAE = L_ID + beta * L_Token
    dm_batch: int = 64  # entities per tower sampled per optimizer step for L_DM-VAE


# ---------------------------------------------------------------- model assembly


def _tower(cfg: dict, ds: RecDataset, backbone, tower: str, kind: str, out: Path, dyn: DynamicConfig) -> TowerTokenizer:
    """A tower's tokenizer: the static fit saved in out/tokenizer.<tower>/ (fitted now if absent) and
    X = f(C) from the run's backbone (the builder's embedding cache makes the second encode free)."""
    from dataclasses import replace

    from ttds.index.build import build, embed, index_config, load_index, save_build, tower_texts

    if kind not in ("rqvae", "lsh"):
        raise TTDSError(f"config index.source/user_source={kind!r}: the dynamic recipe needs rqvae or lsh "
                        "(random/given indices are static: use the generative recipe, e.g. --model ttss)")
    icfg = replace(index_config(cfg), kind=kind)
    if icfg.encoder:
        raise TTDSError("config index.options.encoder: must be empty for the dynamic recipe (X = f(C) comes from the "
                        "backbone being fine-tuned)")
    folder = out / f"tokenizer.{tower}"
    if (folder / "index.json").is_file():
        _, tok = load_index(folder)
    else:
        b = build(ds, tower, backbone, icfg)
        save_build(b, folder)
        tok = b.tokenizer
    x, _, _ = embed(backbone, tower_texts(ds, tower, icfg, backbone.tokenizer), icfg.cache_embeddings)
    word_std = float(backbone.hf_model.get_input_embeddings().weight.detach().std())
    t = TowerTokenizer(tower, tok, x, backbone.hidden_size, icfg.collisions, dyn.disambig_capacity, word_std)
    if icfg.collisions != "none":  # room for collisions to grow while codes move
        need = int(t.resolved_codes()[:, -1].max()) + 1
        t.disambig_size.fill_(max(t.capacity, 2 * need))
    return t


def _finish_model(cfg: dict, backbone, towers: dict[str, TowerTokenizer], indices: dict) -> TTDSRecommender:
    tc = section(cfg, "tasks", TaskConfig)
    ec = section(cfg, "eval", GenEvalConfig)
    if not 0 <= ec.template < len(templates.SEQREC):
        raise TTDSError(f"config eval.template={ec.template}: expected 0..{len(templates.SEQREC) - 1}")
    model = TTDSRecommender(backbone, indices["item"], indices.get("user"), towers, tc.max_text_tokens)
    model.beam, model.beam_batch, model.eval_template = ec.beam, ec.beam_batch, ec.template
    return model


def build_model(cfg: dict, ds: RecDataset, backbone, out: Path) -> TTDSRecommender:
    """A fresh TTDS model: towers fitted (or loaded from out/tokenizer.<tower>/), initial codes assigned."""
    ic = section(cfg, "index", RecIndexConfig)
    dyn = section(cfg, "dynamic", DynamicConfig)
    towers = {"item": _tower(cfg, ds, backbone, "item", ic.source, out, dyn)}
    if ic.user:
        towers["user"] = _tower(cfg, ds, backbone, "user", ic.user_source, out, dyn)
    return _finish_model(cfg, backbone, towers, {name: t.assign() for name, t in towers.items()})


def model_from_weights(cfg: dict, backbone, out: Path, tensors: dict) -> TTDSRecommender:
    """A TTDS model with the shapes of saved weights (no data needed): tokenizer modules from the
    run's tokenizer.<tower>/ folders, X, capacities and codes from the tensors. Load the weights next."""
    from ttds.index.base import SemanticIndex, level_prefixes
    from ttds.index.build import index_config, load_index

    icfg = index_config(cfg)
    towers, indices = {}, {}
    for tower in ("item", "user"):
        if f"towers.{tower}.x" not in tensors:
            continue
        _, tok = load_index(out / f"tokenizer.{tower}")
        t = TowerTokenizer(tower, tok, torch.zeros_like(tensors[f"towers.{tower}.x"]), backbone.hidden_size,
                           icfg.collisions, int(tensors[f"towers.{tower}.disambig_size"]))
        towers[tower] = t
        indices[tower] = SemanticIndex(tensors[f"{tower}_codes"].numpy(), t.level_sizes,
                                       level_prefixes(tower, t.n_code_levels, t.collision != "none"), tower)
    return _finish_model(cfg, backbone, towers, indices)


def _optimizer(model: TTDSRecommender, tc: GenTrainConfig, dyn: DynamicConfig) -> torch.optim.Optimizer:
    tok = [p for p in model.towers.parameters()]
    new = [model.id_emb, model.id_bias] + list(model.head.parameters())
    skip = {id(p) for p in tok + new}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    groups = [{"params": body, "lr": tc.lr, "base_lr": tc.lr, "name": "body"},
              {"params": new, "lr": tc.id_lr, "base_lr": tc.id_lr, "name": "new"},
              {"params": tok, "lr": dyn.tokenizer_lr, "base_lr": dyn.tokenizer_lr, "name": "tokenizer"}]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=tc.weight_decay)


def _set_phase(model: TTDSRecommender, opt, body_trainable: bool, tokenizers_trainable: bool) -> None:
    """requires_grad per group: the backbone is frozen in the warm-up, the tokenizers when static/frozen."""
    for g in opt.param_groups:
        on = {"body": body_trainable, "tokenizer": tokenizers_trainable}.get(g["name"], True)
        for p in g["params"]:
            p.requires_grad_(on)


@torch.no_grad()
def refresh_text(model: TTDSRecommender, texts: dict[str, list[str]]) -> None:
    """X = f(C) with the current backbone (eval mode: no dropout), for every tower."""
    was = model.training
    model.eval()
    for tower, t in model.towers.items():
        t.set_text(model.backbone.encode(texts[tower], progress=False))
    model.train(was)


def dm_vae_backward(model: TTDSRecommender, lc: LossConfig, device) -> dict:
    """alpha * L_DM-VAE on a random sample of `loss.dm_batch` entities per tower, backpropagated;
    returns its parts (both 0.0, and nothing computed, when alpha = 0)."""
    if lc.alpha <= 0:
        return {"l_id": 0.0, "l_token": 0.0}
    ents = {t: torch.randint(tw.n, (min(lc.dm_batch, tw.n),), device=device) for t, tw in model.towers.items()}
    dm, parts = model.dm_vae_loss(ents, lc.beta)
    (lc.alpha * dm).backward()
    return parts


def reassign(model: TTDSRecommender, texts: dict[str, list[str]] | None) -> dict:
    t0 = time.perf_counter()
    if texts is not None:
        refresh_text(model, texts)
    changed = model.reassign()
    changed["seconds"] = round(time.perf_counter() - t0, 2)
    return changed


# ---------------------------------------------------------------- training


def train(cfg: dict, ds: RecDataset, out_dir: Path) -> dict:
    from ttds.index.build import index_config, tower_texts

    out = Path(out_dir)
    device = start_run(cfg, out)
    tc = section(cfg, "train", GenTrainConfig)
    ec = section(cfg, "eval", GenEvalConfig)
    dyn = section(cfg, "dynamic", DynamicConfig)
    lc = section(cfg, "loss", LossConfig)
    task_cfg = section(cfg, "tasks", TaskConfig)
    seed = int(cfg.get("seed", 0))
    ks = tuple(ec.ks)
    if (out / "metrics.json").is_file() and (out / "state.json").is_file() and read_json(out / "state.json").get("done"):
        log.info("%s: already trained (metrics.json); delete the folder to retrain", out)
        return read_json(out / "metrics.json")

    max_hist = int(cfg["data"]["max_history"])
    split = leave_one_out(ds, max_hist)
    backbone = _backbone(cfg, device)
    resuming = (out / "last.safetensors").is_file()
    if resuming:
        saved = {k[6:]: v for k, v in load_safetensors(out / "last.safetensors").items() if k.startswith("model.")}
        model = model_from_weights(cfg, backbone, out, saved).to(device)
        del saved
    else:
        model = build_model(cfg, ds, backbone, out).to(device)
    backbone.tokenizer.save_pretrained(str(out / "tokenizer"))
    if tc.freeze_word_embeddings:
        model.word_embeddings().requires_grad_(False)
    model.zero_grad(set_to_none=True)  # the static fit leaves its last gradients on the tokenizers
    opt = _optimizer(model, tc, dyn)
    icfg = index_config(cfg)
    texts = {t: tower_texts(ds, t, icfg, backbone.tokenizer) for t in model.towers} if dyn.refresh_text else None
    valid = _sample(split.valid, tc.valid_users, seed)

    state = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best": -1.0, "best_step": 0, "bad": 0, "train_seconds": 0.0,
             "valid_seconds": 0.0, "reassign_seconds": 0.0, "tokens": 0, "history": [], "reassign": [], "done": False,
             "stopped": ""}
    if resuming:
        state = load_checkpoint(out, model, opt)
        model.index_from_buffers()
        log.info("resuming %s at epoch %d step %d (best valid NDCG@10 %.4f)", out, state["epoch"], state["step"], state["best"])
        if state["stopped"] in ("max_steps", "budget", "epochs"):
            state["done"], state["stopped"] = False, ""
    data = TaskData(ds, split.train, model.codec, max_hist)

    n_batches = len(bucket_batches(build_epoch(data, task_cfg, np.random.default_rng([seed, 0])), tc.batch_size,
                                   np.random.default_rng(0), tc.max_tokens))
    total_steps = max(1, tc.epochs * math.ceil(n_batches / tc.grad_accum))
    warm = dyn.warmup_steps if dyn.enabled else 0
    peak = dense_peak_flops()
    log.info("dynamic (%s) on %s: %d items (%s), users %s, %d steps planned (%d warm-up), alpha %.3g beta %.3g, "
             "dense matmul peak %.1f GFLOP/s", "joint" if dyn.enabled else "static", ds.name, ds.n_items,
             model.item_index.level_sizes, model.user_index.level_sizes if model.user_index is not None else "off",
             total_steps, warm, lc.alpha, lc.beta, peak / 1e9)
    budget = tc.max_minutes * 60 if tc.max_minutes else math.inf

    def frozen_index(epoch: int) -> bool:
        return not dyn.enabled or (dyn.freeze_last_epochs and epoch >= tc.epochs - dyn.freeze_last_epochs)

    def validate() -> None:
        t = time.perf_counter()
        val = evaluate(model, valid, ec.batch_size, ks, ec.mask_seen, device, desc="valid")
        state["valid_seconds"] += time.perf_counter() - t
        score = val.get("NDCG@10", val[f"NDCG@{max(ks)}"])
        if score > state["best"]:
            state["best"], state["best_step"], state["bad"] = score, state["step"], 0
            save_safetensors(out / "model.safetensors", weights(model))
            model.item_index.save(out / "index.item.json")
            if model.user_index is not None:
                model.user_index.save(out / "index.user.json")
        else:
            state["bad"] += 1
        state["history"].append({"step": state["step"], "epoch": state["epoch"], "train_seconds": round(state["train_seconds"], 1),
                                 "valid": {k: round(v, 5) for k, v in val.items() if k.startswith(("HR", "NDCG"))}})
        log.info("step %d: valid NDCG@10 %.4f HR@10 %.4f (best %.4f @ step %d), %.1fs", state["step"], score, val.get("HR@10", 0),
                 state["best"], state["best_step"], time.perf_counter() - t)
        if state["bad"] >= tc.patience:
            state["done"], state["stopped"] = True, "patience"
        model.train()

    def do_reassign() -> None:
        r = reassign(model, texts)
        nonlocal data
        data = TaskData(ds, split.train, model.codec, max_hist, data.buyers)
        state["reassign_seconds"] += r["seconds"]
        state["reassign"].append({"step": state["step"], **r})
        log.info("step %d: codes re-assigned, changed IDs: %s (%.1fs)", state["step"],
                 ", ".join(f"{k} {v:.1%}" for k, v in r.items() if k != "seconds"), r["seconds"])

    flops_tok = None
    while not state["done"]:
        epoch = state["epoch"]
        if epoch >= tc.epochs:
            state["done"], state["stopped"] = True, state["stopped"] or "epochs"
            break
        examples, batches = _same_batches(data, task_cfg, tc, seed, epoch)
        if flops_tok is None:
            mean_len = float(np.mean([len(e.tokens) for e in examples]))
            flops_tok = train_flops_per_token(model, int(mean_len))
        steps_in_epoch = math.ceil(len(batches) / tc.grad_accum)
        model.train()
        bar = tqdm(total=steps_in_epoch, initial=state["step_in_epoch"], desc=f"epoch {epoch + 1}", unit="step", leave=False)
        win = {"t": time.perf_counter(), "tok": 0, "llm": 0.0, "dm": 0.0, "n": 0}
        while state["step_in_epoch"] < steps_in_epoch and not state["done"]:
            t0 = time.perf_counter()
            warming = state["step"] < warm
            _set_phase(model, opt, not warming, dyn.enabled and not frozen_index(epoch))
            first = state["step_in_epoch"] * tc.grad_accum
            group = batches[first:first + tc.grad_accum]
            total_tgt = max(1, sum(int(examples[i].target[1:].sum()) for b in group for i in b))
            llm, tokens = 0.0, 0
            for b in group:
                ids, attn, labels = (x.to(device) for x in collate([examples[i] for i in b]))
                loss = model.loss(ids, attn, labels) * (int((labels >= 0).sum()) / total_tgt)
                loss.backward()
                llm += loss.item()
                tokens += int(attn.sum())
            dm_parts = dm_vae_backward(model, lc, device)
            if warming:
                for g in opt.param_groups:
                    g["lr"] = dyn.warmup_lr if g["name"] in ("tokenizer", "new") else 0.0
            else:
                mult = warmup_cosine(state["step"] - warm, max(1, total_steps - warm), tc.warmup_steps, tc.min_lr_ratio)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * mult
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            state["step_in_epoch"] += 1
            state["tokens"] += tokens
            state.setdefault("losses", []).append(llm)
            state.setdefault("dm_losses", []).append([round(dm_parts["l_id"], 6), round(dm_parts["l_token"], 6)])
            state["train_seconds"] += time.perf_counter() - t0
            win["tok"] += tokens
            win["llm"] += llm
            win["dm"] += dm_parts["l_id"] + lc.beta * dm_parts["l_token"]
            win["n"] += 1
            bar.update(1)
            if win["n"] >= tc.log_steps or state["step_in_epoch"] == steps_in_epoch:
                el = time.perf_counter() - win["t"]
                mfu = flops_tok * win["tok"] / el / peak
                bar.set_postfix(llm=f"{win['llm'] / win['n']:.3f}", dm=f"{win['dm'] / win['n']:.3f}", mfu=f"{mfu:.0%}")
                log.info("epoch %d step %d%s: L_LLM %.4f, L_DM-VAE %.4f, %.0f tokens/s, MFU %.1f%%", epoch + 1, state["step"],
                         " (warm-up)" if warming else "", win["llm"] / win["n"], win["dm"] / win["n"], win["tok"] / el, 100 * mfu)
                state.setdefault("mfu", []).append(round(mfu, 4))
                win = {"t": time.perf_counter(), "tok": 0, "llm": 0.0, "dm": 0.0, "n": 0}
            if tc.max_steps and state["step"] >= tc.max_steps:
                state["done"], state["stopped"] = True, "max_steps"
            if state["train_seconds"] >= budget:
                state["done"], state["stopped"] = True, "budget"
            if dyn.reassign_steps and state["step"] > warm and state["step"] % dyn.reassign_steps == 0 \
                    and not frozen_index(epoch) and not state["done"]:
                do_reassign()  # mid-epoch: the remaining batches are rebuilt with the new codes (same order)
                examples, batches = _same_batches(data, task_cfg, tc, seed, epoch)
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
            if dyn.reassign_every and not dyn.reassign_steps and state["epoch"] % dyn.reassign_every == 0 \
                    and state["step"] > warm and not frozen_index(state["epoch"]) and not state["done"]:
                do_reassign()
        save_checkpoint(out, model, opt, state)
    if not (out / "model.safetensors").is_file():
        validate()
    save_checkpoint(out, model, opt, state)
    return _finish(cfg, ds, out, split, state, ec, ks, device, seed, flops_tok, peak)


def _same_batches(data: TaskData, task_cfg: TaskConfig, tc: GenTrainConfig, seed: int, epoch: int):
    """The epoch's examples and batches exactly as at the start of the epoch (same RNG stream),
    now with the current codes: an ID has the same length whatever its codes, so the batches match."""
    rng = np.random.default_rng([seed, epoch])
    examples = build_epoch(data, task_cfg, rng)
    return examples, bucket_batches(examples, tc.batch_size, rng, tc.max_tokens)


def _finish(cfg, ds, out, split, state, ec, ks, device, seed, flops_tok, peak) -> dict:
    best = load(out, device)
    t = time.perf_counter()
    test = evaluate(best, split.test, ec.batch_size, ks, ec.mask_seen, device, desc="test")
    test_seconds = time.perf_counter() - t
    valid_full = evaluate(best, split.valid, ec.batch_size, ks, ec.mask_seen, device, desc="valid") if ec.final_valid else \
        next((h["valid"] for h in state["history"] if h["step"] == state["best_step"]), {})
    metrics = {
        "model": cfg.get("name") or "dynamic",
        "dataset": ds.name,
        "test": {k: v for k, v in test.items() if k != "eval_seconds"},
        "valid": {k: v for k, v in valid_full.items() if k != "eval_seconds"},
        "eval_template": ec.template,
        "steps": state["step"],
        "best_step": state["best_step"],
        "best_epoch": next((h["epoch"] for h in state["history"] if h["step"] == state["best_step"]), state["epoch"]),
        "epochs": state["epoch"],
        "stopped": state["stopped"],
        "train_seconds": round(state["train_seconds"], 1),
        "valid_seconds": round(state["valid_seconds"], 1),
        "reassign_seconds": round(state["reassign_seconds"], 1),
        "reassignments": state["reassign"],
        "test_eval_seconds": round(test_seconds, 1),
        "eval_seconds": round(test_seconds, 1),
        "seconds_per_epoch": round(state["train_seconds"] / max(1, state["epoch"]), 1),
        "train_tokens_per_second": round(state["tokens"] / max(state["train_seconds"], 1e-9), 1),
        "train_flops_per_token": flops_tok,
        "dense_peak_flops": peak,
        "mfu": round(float(np.median(state["mfu"])), 4) if state.get("mfu") else None,
        "valid_history": state["history"],
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "machine": machine_info(),
        "protocol": "leave-one-out, full ranking over all items (trie-constrained beam search), seen items not masked",
    }
    if ec.template_mean_users >= 0:
        metrics["test_template_mean"] = template_mean(best, split.test, ec, ks, device, seed)
    write_json(out / "metrics.json", metrics)
    state["done"] = True
    write_json(out / "state.json", state)
    return metrics


def load(out_dir: Path, device="cpu") -> TTDSRecommender:
    """The best model of a run folder (with the index it was trained with), ready for `recommend()`."""
    from ttds.recipes import run_config

    out = Path(out_dir)
    cfg = run_config(out)
    path = out / "model.safetensors"
    if not path.is_file():
        raise TTDSError(f"{out}: no model.safetensors (training has not reached a validation yet)")
    tensors = load_safetensors(path)
    model = model_from_weights(cfg, _backbone(cfg, device), out, tensors)
    load_weights(model, tensors)
    model.index_from_buffers()
    return model.to(device).eval()
