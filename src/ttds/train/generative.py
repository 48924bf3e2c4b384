"""Recipe `generative`: the LM recommender on a static semantic index (TTSS, LC-Rec, TIGER-style).

    ttds train --model ttss --data builtin        # then: ttds eval --model-dir runs/ttss-builtin --data builtin

Steps: leave-one-out split -> backbone (`backbone:` section) -> item (and user) semantic index
(`index:`) -> `GenerativeRecommender` -> epochs of the task mix (`tasks:`), whole user sequences per
example, length-bucketed batches, gradient accumulation, AdamW with warm-up + cosine -> validation
NDCG@10 (beam search on a fixed sample of validation users) with early stopping -> test.

The loop (steps, validation, checkpoints, torchrun) is `ttds.train.loop.LMTrainer`; this recipe adds the
static index and its optimizer groups.

Files in out_dir: config.yaml (resolved), run.log, index.item.json (+ .meta.json; index.user.json),
tokenizer/, model.safetensors (best weights), last.safetensors (weights + optimizer + RNG + trainer
state: running the same command again resumes exactly), state.json, metrics.json, ranks-test.safetensors
(every test user's rank of the target, for `ttds compare`; ranks-valid too with eval.final_valid).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ttds import dist
from ttds.config import section
from ttds.data.dataset import RecDataset
from ttds.errors import TTDSError
from ttds.index.base import SemanticIndex
from ttds.io import load_safetensors, read_json
from ttds.models.generative import GenerativeRecommender
from ttds.runtime import resolve_precision
from ttds.tasks.builders import TaskConfig
from ttds.train.loop import GenEvalConfig, GenTrainConfig, LMTrainer, load_weights, resolve_seen_items, resolve_user_profile, start

log = logging.getLogger(__name__)


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
            from ttds.index.build import index_config, index_from_codes

            log.warning("%s.index.json: %.2f%% of items share an ID; appending a disambiguation level",
                        ds.name, 100 * idx.collision_rate())
            idx = index_from_codes(idx.codes, idx.level_sizes, tower, "ttds", disambiguate=index_config(cfg).disambiguate)
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
    return configure_inference(GenerativeRecommender(backbone, items, users, max_text_tokens=tc.max_text_tokens,
                                                     prompt=tc.prompt), ec)


def configure_inference(model: GenerativeRecommender, ec: GenEvalConfig) -> GenerativeRecommender:
    """The `eval` settings a generative model recommends with: beam, beam batch, template, seen-item rule and
    precision (`auto` is resolved here, on the machine that loads the model)."""
    if not 0 <= ec.template < len(model.codec.seqrec):
        raise TTDSError(f"config eval.template={ec.template}: expected 0..{len(model.codec.seqrec) - 1} "
                        f"(tasks.prompt={model.prompt})")
    if ec.seen_items not in ("keep", "exclude"):
        raise TTDSError(f"config eval.seen_items={ec.seen_items!r}: expected keep or exclude (auto is resolved when training starts)")
    model.beam, model.beam_batch, model.eval_template = ec.beam, ec.beam_batch, ec.template
    model.exclude_seen = ec.seen_items == "exclude"
    model.precision = resolve_precision(ec.precision, model.id_bias.device, "eval.precision")
    return model


class GenerativeTrainer(LMTrainer):
    """The shared loop; the static index needs only its optimizer groups (and, for `tasks.user_profile: earlier`,
    the user tower's `ProfileIDs`, made by `train` before the backbone changes)."""

    def __init__(self, *args, profiles=None):
        super().__init__(*args)
        self.profiles = profiles

    def profile_ids(self):
        return self.profiles

    def param_groups(self) -> list[dict]:
        model, tc = self.model, self.tc
        new = [model.id_emb, model.id_bias] + list(model.head.parameters())
        new_ids = {id(p) for p in new}
        body = [p for p in model.parameters() if p.requires_grad and id(p) not in new_ids]
        return [{"params": body, "lr": tc.lr, "base_lr": tc.lr, "name": "body"},
                {"params": [p for p in new if p.requires_grad], "lr": tc.id_lr, "base_lr": tc.id_lr, "name": "new"}]


def begin(cfg: dict, ds: RecDataset, out_dir: Path, sections: tuple = ()):
    """The LM recipes' first lines: every section they read checked (plus the recipe's own `sections`, (name, dataclass)
    pairs), the config's `auto` rules resolved from the data (seen items, user profile), then `start` (run folder,
    torchrun group and device, split; split None = already finished). Returns (index config, out, device, split)."""
    from ttds.backbone import BackboneConfig
    from ttds.index.build import index_config

    ic = section(cfg, "index", RecIndexConfig)
    for name, cls in (("backbone", BackboneConfig), ("tasks", TaskConfig), ("train", GenTrainConfig), ("eval", GenEvalConfig),
                      *sections):
        section(cfg, name, cls)  # a typo in any section stops here, before minutes of index fitting
    index_config(cfg)
    resolve_seen_items(cfg, ds)
    resolve_user_profile(cfg, ds, ic.user_source if ic.user else None)
    return (ic, *start(cfg, ds, out_dir))


def train(cfg: dict, ds: RecDataset, out_dir: Path) -> dict:
    ic, out, device, split = begin(cfg, ds, out_dir)  # under torchrun: joins the group, this rank's device
    if split is None:
        return read_json(out / "metrics.json")
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
    profiles = None
    if users is not None and section(cfg, "tasks", TaskConfig).user_profile == "earlier":
        from ttds.index.profiles import static_profile_ids

        profiles = static_profile_ids(cfg, ds, out, users, backbone)  # the item vectors of the pretrained backbone
    return GenerativeTrainer(cfg, ds, out, split, model, device, load, profiles=profiles).fit()


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
