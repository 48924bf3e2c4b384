"""The trainer shared by the classical sequential baselines (SASRec, GRU4Rec, BERT4Rec, Caser, HGN, FMLP-Rec).

Recipe interface (see `ttds.recipes`): `train(cfg, ds, out_dir) -> metrics` and `load(out_dir, device)`.

- Data: leave-one-out; training sequences are seq[:-2]. Causal models learn every position of
  left-padded windows of length max_history + 1 (teacher forcing); "last" models get every prefix.
- Batches are shuffled, then sorted by length within pools of `length_pool` batches (a batch drops
  its all-padding columns). Such batches hold very different numbers of targets (a batch of short
  windows has few), so with `target_weighted` each batch's mean loss is scaled by its share of the
  epoch's targets: every target weighs the same, as with uniformly random batches (measured: same
  validation NDCG@10 as random batches at the sorted batches' speed; unweighted was worse).
- AdamW, gradient clipping, validation NDCG@10 after every `eval_every` epochs, early stopping
  after `patience` validations without improvement, `max_minutes` wall-clock budget.
- Files in out_dir: model.safetensors (best weights) + model.json, last.safetensors (weights,
  optimizer state and the trainer state in its metadata, one atomic file), state.json (readable
  copy), metrics.json (valid + test of the best model, timings, peak RSS, machine), ranks-test.safetensors
  (every test user's rank of the target, for `ttds compare`).
- Stop early: create out_dir/STOP; the run validates, checkpoints and tests as if out of time
  (delete STOP before resuming).
- Resume: running the same command again continues from last.safetensors. Every epoch reseeds
  torch/numpy with seed + epoch, so an interrupted-and-resumed run follows the same path.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ttds import dist
from ttds.config import load_config, section
from ttds.data.dataset import RecDataset, leave_one_out, pad_left
from ttds.errors import TTDSError
from ttds.eval.evaluator import evaluate
from ttds.io import load_safetensors, read_json, save_safetensors, write_json
from ttds.models.base import SeqModel
from ttds.runtime import machine_info, peak_rss_mb, start_run
from ttds.train.engine import can_continue, finished

log = logging.getLogger(__name__)

# model.arch -> (module, config dataclass, model class)
ARCHS = {
    "sasrec": ("ttds.models.sasrec", "SASRecConfig", "SASRec"),
    "gru4rec": ("ttds.models.gru4rec", "GRU4RecConfig", "GRU4Rec"),
    "bert4rec": ("ttds.models.bert4rec", "BERT4RecConfig", "BERT4Rec"),
    "caser": ("ttds.models.caser", "CaserConfig", "Caser"),
    "hgn": ("ttds.models.hgn", "HGNConfig", "HGN"),
    "fmlp": ("ttds.models.fmlp", "FMLPConfig", "FMLPRec"),
}


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5
    eval_every: int = 1
    grad_clip: float = 5.0
    max_minutes: float = 0.0
    length_pool: int = 50  # batches sorted by length within pools of this many (less padding); 1 = random batches
    target_weighted: bool = True  # scale a batch's mean loss by its share of targets: every target weighs the same


@dataclass
class EvalConfig:
    ks: tuple = (1, 5, 10)
    batch_size: int = 1024
    mask_seen: bool = False


def build_model(cfg: dict, n_items: int, n_users: int) -> SeqModel:
    arch = (cfg.get("model") or {}).get("arch")
    if arch not in ARCHS:
        raise TTDSError(f"config model.arch={arch!r}: expected one of {', '.join(ARCHS)}")
    mod, cfg_name, cls_name = ARCHS[arch]
    module = importlib.import_module(mod)
    mcfg = section(cfg, "model", getattr(module, cfg_name))
    if getattr(mcfg, "loss", "ce") not in ("ce", "bce"):
        raise TTDSError(f"config model.loss={mcfg.loss!r}: expected ce or bce")
    max_len = int(cfg["data"]["max_history"])
    return getattr(module, cls_name)(mcfg, n_items, n_users, max_len)


# ---------------------------------------------------------------- training examples


def windows(seqs: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut each sequence into left-padded windows of `length` items, from the end, overlapping by
    one item, so that every item after the first is a target exactly once."""
    users, rows = [], []
    for u, s in enumerate(seqs):
        end = len(s)
        while end >= 2:
            start = max(0, end - length)
            rows.append(s[start:end])
            users.append(u)
            if start == 0:
                break
            end = start + 1
    return np.asarray(users, dtype=np.int64), pad_left(rows, length)


def prefixes(seqs: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Every prefix s[:t+1] (t >= 1), left-padded to `length`: its last item is the target."""
    users, rows = [], []
    for u, s in enumerate(seqs):
        for t in range(1, len(s)):
            rows.append(s[max(0, t + 1 - length): t + 1])
            users.append(u)
    return np.asarray(users, dtype=np.int64), pad_left(rows, length)


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, pool: int = 50) -> list[np.ndarray]:
    """Shuffled batches of similar lengths: shuffle, sort each pool of `pool` batches by length,
    cut into batches, shuffle the batches. Lets a batch drop its all-padding columns."""
    perm = rng.permutation(len(lengths))
    out = []
    for start in range(0, len(perm), batch_size * pool):
        chunk = perm[start: start + batch_size * pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


def target_weights(n_terms: np.ndarray, batches: list[np.ndarray]) -> np.ndarray:
    """Per-batch factors for a loss that is the mean over the batch's targets: a batch's share of the
    epoch's targets, relative to the average batch, so that every target weighs the same."""
    per_batch = np.array([n_terms[idx].sum() for idx in batches], dtype=np.float64)
    return per_batch / max(per_batch.mean(), 1e-12)


# ---------------------------------------------------------------- checkpoints


def _optim_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Flatten an optimizer state_dict into safetensors tensors + a JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optim(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    otensors, ometa = _optim_tensors(opt)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(otensors)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"state": json.dumps(state), "optim": json.dumps(ometa)}
    save_safetensors(out / "last.safetensors", tensors, meta)  # one atomic file: weights + optimizer + state
    write_json(out / "state.json", state)


def load_checkpoint(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    from safetensors import safe_open

    path = out / "last.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_safetensors(path)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    _load_optim(opt, tensors, json.loads(meta["optim"]))
    torch.set_rng_state(tensors["rng.torch"])
    return json.loads(meta["state"])


# ---------------------------------------------------------------- recipe


def train(cfg: dict, ds: RecDataset, out_dir: Path) -> dict:
    out = Path(out_dir)
    device = dist.setup(cfg, start_run(cfg, out))  # under torchrun: join the group, this rank's device
    tc = section(cfg, "train", TrainConfig)
    ec = section(cfg, "eval", EvalConfig)
    ks = tuple(ec.ks)
    budget = tc.max_minutes * 60 if tc.max_minutes else math.inf
    if finished(out, tc):
        log.info("%s: already trained (metrics.json); delete the folder to retrain, or raise a limit (train.epochs, "
                 "max_minutes, patience) to continue it", out)
        return read_json(out / "metrics.json")

    max_len = int(cfg["data"]["max_history"])
    split = leave_one_out(ds, max_len)
    model = build_model(cfg, ds.n_items, ds.n_users).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    net = dist.wrap(model, cfg)  # net(...) = model.loss(...), through DDP under torchrun
    if dist.is_main():
        write_json(out / "model.json", {"arch": cfg["model"]["arch"], "n_items": ds.n_items, "n_users": ds.n_users,
                                        "max_history": max_len, "dataset": ds.name})
    state = {"epoch": 0, "step": 0, "best": -1.0, "best_epoch": 0, "bad": 0, "train_seconds": 0.0,
             "valid_seconds": 0.0, "epoch_seconds": [], "history": [], "done": False, "stopped": ""}
    if (out / "last.safetensors").is_file():
        state = load_checkpoint(out, model, opt)
        if state["done"] and can_continue(state, tc):  # more epochs, minutes or patience were granted
            state["done"], state["stopped"] = False, ""
        log.info("resuming %s from epoch %d (best valid NDCG@10 %.4f at epoch %d)", out, state["epoch"],
                 state["best"], state["best_epoch"])

    make = prefixes if model.train_mode == "last" else windows
    users_np, seqs_np = make(split.train, max_len + 1)
    users_all, seqs_all = torch.as_tensor(users_np), torch.as_tensor(seqs_np)
    n = len(users_all)
    lengths = (seqs_np >= 0).sum(1)
    n_terms = np.maximum(lengths - 1, 0) if make is windows else np.ones_like(lengths)  # loss terms per row
    log.info("%s (%s) on %s: %d parameters, %d training %s, device %s", cfg.get("name"), cfg["model"]["arch"], ds.name, n_params, n,
             "prefixes" if make is prefixes else "windows", device)

    while not state["done"]:
        epoch = state["epoch"]
        if epoch >= tc.epochs:
            state["done"], state["stopped"] = True, state["stopped"] or "epochs"
            break
        if state["train_seconds"] >= budget or (epoch > 0 and (out / "STOP").exists()):
            state["done"], state["stopped"] = True, "budget"
            break
        seed = int(cfg.get("seed", 0)) + epoch
        torch.manual_seed(dist.rank_seed(seed))
        batches = length_batches(lengths, tc.batch_size, np.random.default_rng(seed), max(1, tc.length_pool))
        scale = target_weights(n_terms, batches) if tc.target_weighted else np.ones(len(batches))
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        total, count, over_budget = 0.0, 0, False
        bar = tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, unit="batch", disable=not dist.is_main())
        for b, idx in enumerate(bar):
            width = int(lengths[idx].max())  # windows are left-padded: keep the last `width` columns
            part, factor = dist.shard(idx, n_terms)  # this rank's part of the global batch
            loss = net(users_all[part].to(device), seqs_all[part, -width:].to(device)) * (factor * scale[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            state["step"] += 1
            total, count = total + loss.item(), count + 1
            if count % 20 == 0:
                bar.set_postfix(loss=f"{total / count:.4f}")
            # out of time, or asked to stop (out_dir/STOP, looked at every 20 batches): validate, checkpoint, test
            stop = (budget < math.inf and state["train_seconds"] + time.perf_counter() - t0 >= budget) or (
                count % 20 == 0 and (out / "STOP").exists())
            if (budget < math.inf or count % 20 == 0) and dist.any_rank(stop):
                over_budget = True
                break
        bar.close()
        total = dist.mean(total)  # the global batches' mean loss
        epoch_time = time.perf_counter() - t0
        state["epoch_seconds"].append(round(epoch_time, 2))
        # CPU time of this process: on a shared machine, wall time mostly measures the neighbours
        state.setdefault("epoch_cpu_seconds", []).append(round(time.process_time() - c0, 2))
        state["epoch"] = epoch + 1
        entry = {"epoch": epoch + 1, "loss": round(total / max(count, 1), 5), "seconds": round(epoch_time, 2)}
        if (epoch + 1) % tc.eval_every == 0 or over_budget or epoch + 1 >= tc.epochs:
            val = evaluate(model, split.valid, ec.batch_size, ks, ec.mask_seen, device, desc="valid")
            state["valid_seconds"] += val["eval_seconds"]
            entry["valid"] = {k: v for k, v in val.items() if k not in ("eval_seconds", "eval_cpu_seconds")}
            score = val["NDCG@10"]
            if score > state["best"]:
                state["best"], state["best_epoch"], state["bad"] = score, epoch + 1, 0
                if dist.is_main():
                    save_safetensors(out / "model.safetensors", model.state_dict())
            else:
                state["bad"] += 1
            log.info("epoch %d: loss %.4f, %.1fs; valid NDCG@10 %.4f HR@10 %.4f (best %.4f @ %d)", epoch + 1,
                     entry["loss"], epoch_time, score, val["HR@10"], state["best"], state["best_epoch"])
            if state["bad"] >= tc.patience:
                state["done"], state["stopped"] = True, "patience"
        state["train_seconds"] += time.perf_counter() - t0
        state["history"].append(entry)
        if over_budget:
            state["done"], state["stopped"] = True, "budget"
        if dist.is_main():
            save_checkpoint(out, model, opt, state)

    if dist.is_main():
        save_checkpoint(out, model, opt, state)
    dist.barrier()  # model.safetensors is written
    best = load(out, device)
    test = evaluate(best, split.test, ec.batch_size, ks, ec.mask_seen, device, desc="test", ranks_to=out / "ranks-test.safetensors")
    # validation metrics of the best model, as measured when it was chosen (evaluation is deterministic)
    valid = next(h["valid"] for h in state["history"] if h["epoch"] == state["best_epoch"] and "valid" in h)
    secs = state["epoch_seconds"]
    metrics = {
        "model": cfg.get("name") or cfg["model"]["arch"],
        "dataset": ds.name,
        "test": {k: v for k, v in test.items() if k not in ("eval_seconds", "eval_cpu_seconds")},
        "valid": valid,
        "best_epoch": state["best_epoch"],
        "epochs": state["epoch"],
        "stopped": state["stopped"],
        "train_seconds": round(state["train_seconds"], 1),
        "seconds_per_epoch": round(float(np.mean(secs)), 2) if secs else None,
        "cpu_seconds_per_epoch": round(float(np.mean(state["epoch_cpu_seconds"])), 2)
        if state.get("epoch_cpu_seconds") else None,
        "eval_seconds": test["eval_seconds"],
        "eval_cpu_seconds": test["eval_cpu_seconds"],
        "n_params": n_params,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "machine": machine_info(),
        "protocol": "leave-one-out, full ranking over all items, seen items not masked, pessimistic ties",
    }
    if dist.is_main():
        write_json(out / "metrics.json", metrics)
    dist.barrier()
    return metrics


def load(out_dir: Path, device="cpu") -> SeqModel:
    out = Path(out_dir)
    info = read_json(out / "model.json", "model description")
    cfg = load_config(file=out / "config.yaml")
    cfg["data"]["max_history"] = info["max_history"]
    model = build_model(cfg, info["n_items"], info["n_users"])
    model.load_state_dict(load_safetensors(out / "model.safetensors"))
    return model.to(device).eval()
