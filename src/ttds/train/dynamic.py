"""Recipe `dynamic`: TTDS, the twin-tower tokenizers trained jointly with the recommender.

    ttds train --model ttds --data builtin          # ablations: stds, ttds_dm, stds_dm, ttds_ho, ttds_3, ...

Steps (see `ttds.models.ttds` for how the losses reach the tokenizers):
  1. leave-one-out split, backbone (causal), item (and user) texts -> X = f(C) with that backbone (or with a
     fixed `index.options.encoder`, e.g. for a backbone trained from scratch: `--model tiger_ttds`);
  2. each tower's tokenizer is first fitted as a static RQ-VAE (or LSH) by the index builder
     (`index.options`), then moved INTO the model (`TowerTokenizer`), ID embeddings = P(codebooks);
  3. warm-up (`dynamic.warmup_steps`): backbone frozen, tokenizers + ID head trained on L_all
     (paper: lr 1e-3, `dynamic.warmup_lr`);
  4. joint training: everything trained on L_all = L_LLM + alpha * (L_ID + beta * L_Token) (AdamW;
     backbone `train.lr`, ID head `train.id_lr`, tokenizers `dynamic.tokenizer_lr`, paper 5e-4),
     warm-up + cosine schedule;
  5. every `dynamic.reassign_every` epochs (or `dynamic.reassign_steps` steps): codes of all items and
     users re-assigned (sticky: `dynamic.reassign_margin`), X first re-encoded with the current backbone
     if `dynamic.refresh_text` (off by default: measured worse, README "TTDS"), collisions re-resolved,
     tries and prompts rebuilt; the share of changed IDs (in all and per level) is logged and kept in metrics;
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
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ttds import dist
from ttds.config import section
from ttds.data.dataset import RecDataset
from ttds.errors import TTDSError
from ttds.io import load_safetensors, read_json
from ttds.models.ttds import ID_INITS, TowerTokenizer, TTDSRecommender
from ttds.tasks.builders import TaskConfig
from ttds.train.engine import warmup_cosine
from ttds.train.generative import RecIndexConfig, _backbone, begin, configure_inference
from ttds.train.loop import GenEvalConfig, GenTrainConfig, LMTrainer, load_weights

log = logging.getLogger(__name__)


@dataclass
class DynamicConfig:
    enabled: bool = True  # false: tokenizers frozen, codes never re-assigned (static index)
    warmup_steps: int = 50  # tokenizer warm-up steps with the backbone frozen
    warmup_lr: float = 1e-3  # paper: 1e-3
    tokenizer_lr: float = 5e-4  # joint phase (paper: AdamW 5e-4)
    reassign_every: int = 1  # epochs between code re-assignments (0 = never by epochs)
    reassign_steps: int = 0  # optimizer steps between re-assignments (0 = by epochs)
    refresh_text: bool = False  # re-encode X = f(C) with the current backbone at each re-assignment
    reassign_margin: float = 2.0  # sticky re-assignment: a code changes only if another is closer by > this share
    id_rows: bool = True  # ID embedding = P(codebook) + a free row; false: P(codebook) only
    id_init: str = "random"  # random: TTSS-like random rows, P zero | projected: E = P(codebook) at start (free rows zero)
    proj_lr_scale: float | str = "auto"  # lr of the codebook projections P / the ID rows' lr; auto: 1 / max codebook row L1
    level_norm: bool = False  # P sees each level's codebook over its RMS, so every level's ID embeddings start at one scale
    freeze_last_epochs: int = 0  # ETEGRec-style: no re-assignment, frozen tokenizers in the final epochs
    disambig_capacity: int = 64  # size of the disambiguation level (fixed token space)
    behaviour_weight: float = 0.0  # >0: item tokenizer input at re-assignment = text X + w x mean LM state predicting the item

    def __post_init__(self):
        if self.id_init not in ID_INITS:
            raise TTDSError(f"config dynamic.id_init={self.id_init!r}: expected one of {', '.join(ID_INITS)}")
        if self.id_init == "random" and not self.id_rows:
            raise TTDSError("config dynamic.id_init=random: needs dynamic.id_rows=true (the random start lives in the free "
                            "rows; without them every ID embedding would start at zero); with id_rows=false set "
                            "dynamic.id_init=projected")
        if self.proj_lr_scale != "auto" and not (isinstance(self.proj_lr_scale, (int, float)) and self.proj_lr_scale >= 0):
            raise TTDSError(f"config dynamic.proj_lr_scale={self.proj_lr_scale!r}: expected 'auto' or a number >= 0")


@dataclass
class LossConfig:
    alpha: float = 0.5  # L_all = L_LLM + alpha * L_DM-VAE   (0 = no DM-VAE: the TTDS-DM ablation)
    beta: float = 0.5  # L_DM-VAE = L_ID + beta * L_Token
    dm_batch: int = 64  # entities per tower sampled per optimizer step for L_DM-VAE


# ---------------------------------------------------------------- model assembly


def _tower(cfg: dict, ds: RecDataset, backbone, encoder, tower: str, kind: str, out: Path,
           dyn: DynamicConfig) -> TowerTokenizer:
    """A tower's tokenizer: the static fit saved in out/tokenizer.<tower>/ (fitted now if absent) and
    X = f(C) from `encoder` (the run's backbone, or `index.options.encoder`; the builder's embedding cache makes
    the second encode free)."""
    from dataclasses import replace

    from ttds.index.build import build, check_user_fit, index_config, load_index, save_build, tower_vectors

    if kind not in ("rqvae", "lsh"):
        raise TTDSError(f"config index.source/user_source={kind!r}: the dynamic recipe needs rqvae or lsh "
                        "(random/given indices are static: use the generative recipe, e.g. --model ttss)")
    icfg = replace(index_config(cfg), kind=kind)
    folder = out / f"tokenizer.{tower}"
    if (folder / "index.json").is_file():
        if tower == "user":
            check_user_fit(folder, ds, icfg)
        _, tok = load_index(folder)
    else:
        b = build(ds, tower, encoder, icfg)
        save_build(b, folder)
        tok = b.tokenizer
    x, _, _ = tower_vectors(ds, tower, icfg, encoder)
    word_std = float(backbone.hf_model.get_input_embeddings().weight.detach().std())
    t = TowerTokenizer(tower, tok, x, backbone.hidden_size, icfg.collisions, dyn.disambig_capacity, word_std,
                       behaviour=tower == "item" and dyn.behaviour_weight > 0, only_colliding=icfg.disambiguate == "colliding",
                       level_norm=dyn.level_norm)
    if icfg.collisions != "none":  # room for collisions to grow while codes move
        need = int(t.resolved_codes()[:, -1].max()) + 1
        t.disambig_size.fill_(max(t.capacity, 2 * need))
    return t


def _finish_model(cfg: dict, backbone, towers: dict[str, TowerTokenizer], indices: dict,
                  free_rows: bool, id_init: str = "projected") -> TTDSRecommender:
    tc = section(cfg, "tasks", TaskConfig)
    model = TTDSRecommender(backbone, indices["item"], indices.get("user"), towers, tc.max_text_tokens, free_rows, id_init,
                            tc.prompt)
    return configure_inference(model, section(cfg, "eval", GenEvalConfig))


def build_model(cfg: dict, ds: RecDataset, backbone, out: Path) -> TTDSRecommender:
    """A fresh TTDS model: towers fitted (or loaded from out/tokenizer.<tower>/), initial codes assigned."""
    from ttds.index.build import encoder_for, index_config

    ic = section(cfg, "index", RecIndexConfig)
    dyn = section(cfg, "dynamic", DynamicConfig)
    encoder = encoder_for(backbone, index_config(cfg))
    towers = {"item": _tower(cfg, ds, backbone, encoder, "item", ic.source, out, dyn)}
    if ic.user:
        towers["user"] = _tower(cfg, ds, backbone, encoder, "user", ic.user_source, out, dyn)
    return _finish_model(cfg, backbone, towers, {name: t.assign() for name, t in towers.items()}, dyn.id_rows,
                         dyn.id_init)


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
                           icfg.collisions, int(tensors[f"towers.{tower}.disambig_size"]),
                           text_head=f"towers.{tower}.text_head.weight" in tensors,
                           behaviour=f"towers.{tower}.behaviour_sum" in tensors,
                           only_colliding=icfg.disambiguate == "colliding" and bool((tensors[f"{tower}_codes"][:, -1] < 0).any()),
                           level_norm=f"towers.{tower}.level_norm" in tensors)
        towers[tower] = t
        indices[tower] = SemanticIndex(tensors[f"{tower}_codes"].numpy(), t.level_sizes,
                                       level_prefixes(tower, t.n_code_levels, t.collision != "none"), tower)
    return _finish_model(cfg, backbone, towers, indices, "id_rows" in tensors)


def proj_lr_scale(model: TTDSRecommender, dyn: DynamicConfig) -> float:
    """The codebook projections' learning rate as a multiple of the ID rows' (`dynamic.proj_lr_scale`).

    An AdamW step moves every weight of P by about its lr, so it moves a projected ID embedding P(c) by up to
    lr x ||c||_1: with SmolLM2-L10 on Scientific the level-0 codebook rows have ||c||_1 ~ 92, so at the tokenizers'
    lr (5e-4) P moved level-0 embeddings by up to 0.05 a step, the whole word-embedding scale (0.034), where a free
    row moves by its lr (1e-3). `auto` = 1 / the largest mean row L1 norm over the towers' codebook levels: the
    projected table then moves no faster than a free row at any level."""
    if dyn.proj_lr_scale != "auto":
        return float(dyn.proj_lr_scale)
    l1 = [float(t.proj_input(lv).detach().abs().sum(1).mean()) for t in model.towers.values() if t.has_codebooks
          for lv in range(t.n_code_levels)]
    return 1.0 / max(max(l1, default=1.0), 1.0)


def param_groups(model: TTDSRecommender, tc: GenTrainConfig, dyn: DynamicConfig) -> list[dict]:
    """AdamW groups: backbone (`train.lr`), new ID parameters (`train.id_lr`), tokenizers (`dynamic.tokenizer_lr`),
    the towers' codebook projections (`train.id_lr` x `dynamic.proj_lr_scale`) and L_ID text heads
    (`dynamic.tokenizer_lr`). The last two are the recommender's side of the towers: they keep training when the
    tokenizers are frozen (static index, late freeze)."""
    tok = [p for t in model.towers.values() for p in t.tokenizer.parameters()]
    proj = [p for t in model.towers.values() if t.has_codebooks for p in t.proj.parameters()]
    heads = [p for t in model.towers.values() for p in t.text_head.parameters()]
    new = [model.id_emb, model.id_bias] + list(model.head.parameters())
    skip = {id(p) for p in tok + proj + heads + new}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    scale = proj_lr_scale(model, dyn)
    groups = [{"params": body, "lr": tc.lr, "base_lr": tc.lr, "name": "body"},
              {"params": new, "lr": tc.id_lr, "base_lr": tc.id_lr, "name": "new"},
              {"params": tok, "lr": dyn.tokenizer_lr, "base_lr": dyn.tokenizer_lr, "name": "tokenizer"},
              {"params": proj, "lr": tc.id_lr * scale, "base_lr": tc.id_lr * scale, "warmup_scale": scale,
               "name": "projection"},
              {"params": heads, "lr": dyn.tokenizer_lr, "base_lr": dyn.tokenizer_lr, "name": "tower_heads"}]
    return [g for g in groups if g["params"]]


def _set_phase(model: TTDSRecommender, opt, body_trainable: bool, tokenizers_trainable: bool) -> None:
    """requires_grad per group: the backbone is frozen in the warm-up, the tokenizers when static/frozen."""
    for g in opt.param_groups:
        on = {"body": body_trainable, "tokenizer": tokenizers_trainable}.get(g["name"], True)
        for p in g["params"]:
            p.requires_grad_(on)


@torch.no_grad()
def refresh_text(model: TTDSRecommender, texts: dict[str, list[str] | torch.Tensor], behaviour_weight: float = 0.0,
                 precision: str = "fp32") -> None:
    """X = f(C) with the current backbone (eval mode: no dropout), for every tower (users made from items average
    the items' new X: `ttds.index.build.tower_inputs`); with behaviour sums, fused with the LM states that predicted
    each entity (`TowerTokenizer.fuse_behaviour`, summed over ranks first).

    `precision` is the training's (`train.precision`): with bf16 the backbone encodes under the same bf16 autocast
    it trains in (pooled in fp32). With a 10-layer SmolLM2 on one thread of the AMX machine that encodes Scientific
    item texts 2.9x faster, centred cosine to fp32 0.99995 (benchmarks/results/encode_precision-Scientific-L10-s25.md);
    in fp32 the re-encoding made a re-assignment take 358 s (session 25)."""
    from ttds.index.build import vectors

    was = model.training
    model.eval()
    text_x = {}
    dev = model.id_emb.device.type
    for tower in sorted(model.towers, key=("item", "user").index):  # items first: users may be made from them
        t = model.towers[tower]
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=precision == "bf16"):
            x = text_x[tower] = vectors(texts[tower], lambda s: model.backbone.encode(s, progress=False), text_x.get("item"))
        if t.has_behaviour:  # sums over ranks (dist.all_reduce returns the tensor itself on one process)
            t.behaviour_sum.copy_(dist.all_reduce(t.behaviour_sum))
            t.behaviour_count.copy_(dist.all_reduce(t.behaviour_count))
            x = t.fuse_behaviour(x, behaviour_weight)
        t.set_text(x)
    model.train(was)


def dm_vae_term(model: TTDSRecommender, lc: LossConfig, seed: int) -> tuple[torch.Tensor, dict] | None:
    """alpha * L_DM-VAE on `loss.dm_batch` random entities per tower (None when alpha = 0) and its parts.

    The sample comes from its own generator (`seed`: the run's seed and step), so it is the same on every rank and
    after a resume; under torchrun each rank takes its part of it (`dist.shard`) with the factor that turns the
    average over ranks into the mean over the whole sample, as for the LM batches."""
    if lc.alpha <= 0:
        return None
    g = torch.Generator().manual_seed(int(seed))
    dev = model.id_emb.device
    total, parts = model.id_emb.new_zeros(()), {"l_id": 0.0, "l_token": 0.0}
    for tower, tw in model.towers.items():
        ents = torch.randint(tw.n, (min(lc.dm_batch, tw.n),), generator=g)
        part, factor = dist.shard(ents.numpy())
        loss, p = model.dm_vae_loss({tower: torch.as_tensor(part, device=dev)}, lc.beta, {tower: ents.to(dev)})
        total = total + factor * loss
        parts = {k: parts[k] + factor * p[k] for k in parts}
    return lc.alpha * total, parts


def reassign(model: TTDSRecommender, texts: dict[str, list[str] | torch.Tensor] | None, margin: float = 0.0,
             behaviour_weight: float = 0.0, precision: str = "fp32") -> dict:
    """Re-encode X (optional), re-assign every code (sticky by `margin`), and make rank 0's indices every rank's.

    With re-encoded texts, `tokenizer_only` also says which share of IDs the trained tokenizers alone would have
    changed (the X they were trained on): the rest of the change is the drift of X = f(C) with the backbone.
    On Scientific (MiniLM, step 341, margin 0.5) that split was 41 % vs 92 % of item IDs."""
    t0 = time.perf_counter()
    before = None
    if texts is not None:
        before = model.reassign(margin, apply=False)
        refresh_text(model, texts, behaviour_weight, precision)
    changed = model.reassign(margin)
    if before is not None:
        changed["tokenizer_only"] = {k: v for k, v in before.items() if k in ("item", "user")}
    dist.sync_model_index(model)
    changed["seconds"] = round(time.perf_counter() - t0, 2)
    return changed


# ---------------------------------------------------------------- training


class DynamicTrainer(LMTrainer):
    """The shared loop plus the TTDS schedule: tokenizer warm-up with the backbone frozen, the DM-VAE loss,
    code re-assignment every `dynamic.reassign_every` epochs (or `reassign_steps` steps), a late index freeze."""

    def __init__(self, *args, texts: dict[str, list[str] | torch.Tensor] | None = None):
        super().__init__(*args)
        self.dyn = section(self.cfg, "dynamic", DynamicConfig)
        self.lc = section(self.cfg, "loss", LossConfig)
        self.texts = texts
        self.warm = self.dyn.warmup_steps if self.dyn.enabled else 0
        if self.dyn.behaviour_weight > 0:
            if texts is None:
                raise TTDSError("config dynamic.behaviour_weight > 0 needs dynamic.refresh_text: true (the fusion happens "
                                "when X = f(C) is re-encoded)")
            self.model.target_state_hook = self.model.record_target_states

    def frozen_index(self, epoch: int) -> bool:
        """True when the tokenizers are frozen and codes kept: a static index, or the final
        `dynamic.freeze_last_epochs` epochs (counted back from the last epoch `train.max_steps` lets the run reach)."""
        return not self.dyn.enabled or bool(self.dyn.freeze_last_epochs and epoch >= self.last_epoch - self.dyn.freeze_last_epochs)

    def param_groups(self) -> list[dict]:
        return param_groups(self.model, self.tc, self.dyn)

    def reassign_due(self, step: int, epoch: int, epoch_end: bool) -> bool:
        """The one rule for a code re-assignment, after `step` (inside 0-based `epoch`) or at the end of `epoch`
        (1-based count of finished epochs); the hooks and the logged plan both ask it. The step that ends the run
        never re-assigns (nothing would train on the new codes); the hooks check that with the run's `done` flag."""
        dyn = self.dyn
        if not dyn.enabled or step <= self.warm or self.frozen_index(epoch):
            return False
        if dyn.reassign_steps:
            return not epoch_end and step % dyn.reassign_steps == 0
        return epoch_end and bool(dyn.reassign_every) and epoch % dyn.reassign_every == 0 and epoch < self.tc.epochs

    def planned_reassignments(self) -> list[int]:
        """The steps at which codes will be re-assigned if the run goes to its planned end (the epoch length is the
        first epoch's, as the lr schedule's)."""
        end, per = self.total_steps, self.per_epoch
        return sorted({s for s in range(1, end) if self.reassign_due(s, (s - 1) // per, False)}
                      | {e * per for e in range(1, end // per + 1) if e * per < end and self.reassign_due(e * per, e, True)})

    def setup(self) -> None:
        super().setup()
        plan, dyn = self.planned_reassignments(), self.dyn
        if plan:
            log.info("dynamic: %d code re-assignment(s) planned, at step(s) %s", len(plan),
                     ", ".join(map(str, plan[:10])) + (", ..." if len(plan) > 10 else ""))
        elif dyn.enabled:  # e.g. a step budget shorter than an epoch on a large dataset: the IDs never change
            log.warning("dynamic: no code re-assignment falls inside this run's %d steps (an epoch is %d steps; "
                        "dynamic.reassign_every=%d, reassign_steps=%d, warmup_steps=%d): the IDs stay as first assigned. "
                        "Set dynamic.reassign_steps=N to re-assign every N steps", self.total_steps, self.per_epoch,
                        dyn.reassign_every, dyn.reassign_steps, self.warm)

    def extra_state(self) -> dict:
        return {"reassign_seconds": 0.0, "reassign": []}

    def on_resume(self) -> None:
        self.model.index_from_buffers()  # the codes the checkpoint carries

    def profile_ids(self):
        """The user tower as it is now (codes, quantiser, the items' current X; with `dynamic.behaviour_weight` the
        fused item vectors)."""
        from ttds.index.profiles import item_profile_ids

        if "user" not in self.model.towers:
            return None
        return item_profile_ids(self.cfg, self.ds, self.model.user_index, self.model.towers["user"].tokenizer,
                                self.model.towers["item"].x)

    def before_step(self) -> None:
        s = self.state
        _set_phase(self.model, self.opt, s["step"] >= self.warm, self.dyn.enabled and not self.frozen_index(s["epoch"]))

    def set_lr(self) -> float:
        step = self.state["step"]
        if step < self.warm:  # tokenizers and ID head only (paper: lr 1e-3; the projections at their share of it)
            for g in self.opt.param_groups:
                g["lr"] = 0.0 if g["name"] == "body" else self.dyn.warmup_lr * g.get("warmup_scale", 1.0)
            return 1.0
        mult = warmup_cosine(step - self.warm, max(1, self.total_steps - self.warm), self.tc.warmup_steps, self.tc.min_lr_ratio)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * mult
        return mult

    def grad_groups(self) -> dict[str, list]:
        """The recommender's gradient norm (backbone, ID rows, head) apart from the towers' (tokenizers, codebook
        projections, text heads): one clip covers both, so a large tower gradient shrinks the backbone's step too."""
        towers = {"tokenizer", "projection", "tower_heads"}
        return {name: [p for g in self.opt.param_groups if (g["name"] in towers) == side for p in g["params"]]
                for name, side in (("grad_norm", False), ("grad_norm_towers", True))}

    def extra_loss(self) -> tuple[torch.Tensor, dict] | None:
        return dm_vae_term(self.model, self.lc, self.seed * 1_000_003 + self.state["step"])

    def do_reassign(self) -> None:
        s = self.state
        with self.full_params():
            r = reassign(self.model, self.texts, self.dyn.reassign_margin, self.dyn.behaviour_weight, self.tc.precision)
        self.data = self.new_task_data(self.data.buyers)
        s["reassign_seconds"] += r["seconds"]
        s["reassign"].append({"step": s["step"], **r})
        only = r.get("tokenizer_only", {})
        log.info("step %d: codes re-assigned, changed IDs: %s (%.1fs)", s["step"],
                 ", ".join(f"{k} {v:.1%} (levels {r.get(k + '_levels')}"
                           + (f"; {only[k]:.1%} with the old texts" if k in only else "") + ")"
                           for k, v in r.items() if k in ("item", "user")), r["seconds"])

    def after_step(self, parts: dict) -> bool:
        s = self.state
        s.setdefault("dm_losses", []).append([round(parts.get("l_id", 0.0), 6), round(parts.get("l_token", 0.0), 6)])
        if not s["done"] and self.reassign_due(s["step"], s["epoch"], epoch_end=False):
            self.do_reassign()  # mid-epoch: the loop rebuilds the remaining batches with the new codes (same order)
            return True
        return False

    def on_epoch_end(self) -> None:
        s = self.state
        if not s["done"] and self.reassign_due(s["step"], s["epoch"], epoch_end=True):
            self.do_reassign()

    def on_best(self) -> None:  # the index of the best model, LC-Rec format (the codes are also model buffers)
        self.model.item_index.save(self.out / "index.item.json")
        if self.model.user_index is not None:
            self.model.user_index.save(self.out / "index.user.json")

    def extra_metrics(self) -> dict:
        return {"reassign_seconds": round(self.state["reassign_seconds"], 1), "reassignments": self.state["reassign"]}


def train(cfg: dict, ds: RecDataset, out_dir: Path) -> dict:
    from ttds.index.build import check_user_fit, index_config, tower_inputs

    ic, out, device, split = begin(cfg, ds, out_dir, (("dynamic", DynamicConfig), ("loss", LossConfig)))
    if split is None:  # (begin: under torchrun joins the group and picks this rank's device)
        return read_json(out / "metrics.json")
    dyn = section(cfg, "dynamic", DynamicConfig)
    lc = section(cfg, "loss", LossConfig)
    if dyn.refresh_text and index_config(cfg).encoder:
        raise TTDSError("config dynamic.refresh_text=true re-encodes X = f(C) with the backbone being trained: it needs "
                        "index.options.encoder empty (set, X comes from that fixed encoder and is never re-encoded)")
    backbone = _backbone(cfg, device)
    if (out / "last.safetensors").is_file():  # resuming: shapes and codes from the checkpoint (loaded by the loop)
        saved = {k[6:]: v for k, v in load_safetensors(out / "last.safetensors").items() if k.startswith("model.")}
        model = model_from_weights(cfg, backbone, out, saved).to(device)
        del saved
    else:
        with dist.main_first():  # rank 0 fits and saves the static tokenizers, the others load them
            model = build_model(cfg, ds, backbone, out).to(device)
        dist.sync_model_index(model)
    if dist.is_main():
        backbone.tokenizer.save_pretrained(str(out / "tokenizer"))
    icfg = index_config(cfg)
    if "user" in model.towers:  # a resumed run re-encodes its users as its tokenizer was fitted
        check_user_fit(out / "tokenizer.user", ds, icfg)
    texts = {t: tower_inputs(ds, t, icfg, backbone.tokenizer) for t in model.towers} if dyn.refresh_text else None
    log.info("dynamic (%s) on %s: item IDs %s, user IDs %s, %d warm-up steps, alpha %.3g beta %.3g",
             "joint" if dyn.enabled else "static", ds.name, model.item_index.level_sizes,
             model.user_index.level_sizes if model.user_index is not None else "off", dyn.warmup_steps if dyn.enabled else 0,
             lc.alpha, lc.beta)
    return DynamicTrainer(cfg, ds, out, split, model, device, load, texts=texts).fit()


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
