"""New entities at serving time: the text of a new item (or of an anonymous user) -> its tower's codes.

A `TextCoder` turns text into a text vector and the vector into *base codes* (the codes before the
disambiguation level); the generative model then gives the entity a free semantic ID with the TTDS
collision rule (`ttds.index.collisions.assign_new_id`: the first unused disambiguation code) and extends
its index, trie and prompt codec (`GenerativeRecommender.add_item`).

Rule per index kind (what the run folder keeps, see `ttds.index.build.save_build`):
  rqvae, lsh   quantiser: the tower's tokenizer encodes the vector, i.e. the codes the index builder
               would have given the entity (static runs: the saved `tokenizer.<tower>/`; TTDS: the
               model's own, jointly trained tower)
  random       quantiser: the saved RandomIndexer draws the codes of entity n (seeded by the entity id,
               so the codes carry no meaning, as for every other item of that index)
  given        nearest neighbour (also a static run whose tokenizer folder is missing): the new item
               takes every code but the last of its nearest existing item (cosine of the text vectors)
               and a free code of the last level (the disambiguation level, or the shipped 4th level)
Text vector: the index builder's item template (`index.options.item_template`, `max_text_tokens`),
mean-pooled by the encoder that built the index. For a static index that is the run's *pretrained*
backbone (or `index.options.encoder`), loaded once more, because the served backbone has been
fine-tuned and no longer gives the vectors the quantiser was fitted on; for TTDS the same (X = f(C) was
encoded once, before training), unless `dynamic.refresh_text` made X follow the fine-tuned backbone: then the
served backbone itself. The nearest-neighbour rule encodes the
whole catalogue once when the engine loads (cached on disk by `ttds.index.build.embed`).
Users: an anonymous user's text gets a user ID from a quantiser (rqvae / lsh user towers); otherwise
(no text, random user index) the prompt carries no user ID.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ttds.backbone.texts import render_item, truncate

log = logging.getLogger(__name__)

RULES = ("quantiser", "nearest")


@dataclass
class TextCoder:
    rule: str  # quantiser | nearest
    encoder: object | None  # ttds.backbone.Backbone (None: the random index needs no vector)
    template: str  # item template of the index builder
    max_tokens: int
    tokenizer: nn.Module | None = None  # quantiser rule: RQVAE | LSHIndexer | RandomIndexer
    reference: torch.Tensor | None = None  # nearest rule: text vectors of the entities [n, d], rows as the index

    def vector(self, text: str) -> torch.Tensor:
        """[1, d] text vector (zeros [1, 1] when no encoder is needed)."""
        if self.encoder is None:
            return torch.zeros(1, 1)
        return self.encoder.encode(truncate([text], self.encoder.tokenizer, self.max_tokens), progress=False)

    def item_vector(self, fields: dict[str, str]) -> torch.Tensor:
        return self.vector(render_item(self.template, fields))

    @torch.no_grad()
    def base_codes(self, x: torch.Tensor, index) -> np.ndarray:
        """Base codes [M] of the entity with vector x [1, d], to be completed by `assign_new_id` on `index`."""
        if self.rule == "nearest":
            ref = self.reference
            sim = torch.nn.functional.normalize(ref, dim=1) @ torch.nn.functional.normalize(x.float(), dim=1)[0]
            return index.codes[int(sim.argmax())][:-1]
        if hasattr(self.tokenizer, "seed"):  # RandomIndexer: entity n's codes
            return self.tokenizer.encode(x, start=index.n)[0].numpy()
        return self.tokenizer.encode(x.to(next(iter(self.tokenizer.buffers())).device))[0].cpu().numpy()

    def remember(self, x: torch.Tensor) -> None:
        """The entity was added: a later new item may have it as its nearest neighbour."""
        if self.rule == "nearest":
            self.reference = torch.cat([self.reference, x.to(self.reference.dtype)])


def _pretrained_encoder(cfg: dict, icfg, device: str):
    """The encoder that built a static index: index.options.encoder, else the run's backbone as it
    was before fine-tuning (loaded again from its name; causal as in training)."""
    from ttds.backbone import Backbone, BackboneConfig
    from ttds.config import section
    from ttds.index.build import encoder_for

    if icfg.encoder:
        return encoder_for(None, icfg)
    bcfg = section(cfg, "backbone", BackboneConfig)
    bcfg.causal, bcfg.device = True, str(device)
    return Backbone.load(bcfg)  # in eval mode


def static_coders(cfg: dict, run_dir: Path, ds, index, device: str = "cpu") -> tuple[TextCoder, TextCoder | None]:
    """(item coder, user coder or None) of a generative run on a static index."""
    from ttds.backbone.texts import item_texts
    from ttds.index.build import embed, index_config, load_index
    from ttds.io import read_json

    icfg = index_config(cfg)
    tokenizers, kinds = {}, {}
    for tower in ("item", "user"):
        folder = Path(run_dir) / f"tokenizer.{tower}"
        if (folder / "index.json").is_file() and (folder / "config.json").is_file():
            kinds[tower] = read_json(folder / "config.json").get("kind", "given")
            if kinds[tower] != "given":
                tokenizers[tower] = load_index(folder)[1].to(device)
    user_quantiser = kinds.get("user") in ("rqvae", "lsh")
    need_text = kinds.get("item") != "random" or user_quantiser
    encoder = _pretrained_encoder(cfg, icfg, device) if need_text else None
    if "item" in tokenizers:
        item = TextCoder("quantiser", None if kinds["item"] == "random" else encoder, icfg.item_template,
                         icfg.max_text_tokens, tokenizers["item"])
    else:
        log.info("new items: nearest-neighbour rule (no saved item tokenizer); encoding the %d catalogue items", ds.n_items)
        ref, _, _ = embed(encoder, item_texts(ds, icfg.item_template, encoder.tokenizer, icfg.max_text_tokens), icfg.cache_embeddings)
        if len(ref) != index.n:
            raise ValueError(f"new items: {len(ref)} item texts for an index of {index.n} items")
        item = TextCoder("nearest", encoder, icfg.item_template, icfg.max_text_tokens, reference=ref)
    user = None
    if user_quantiser:
        user = TextCoder("quantiser", encoder, icfg.item_template, icfg.max_text_tokens, tokenizers["user"])
    return item, user


def ttds_coders(cfg: dict, model, device: str = "cpu") -> tuple[TextCoder, TextCoder | None]:
    """(item coder, user coder or None) of a TTDS model: its own towers, fed by the encoder its X came from: the
    served backbone with `dynamic.refresh_text` (X followed the fine-tuning), else the pretrained one (X was
    encoded once, before training) or `index.options.encoder`."""
    from ttds.config import section
    from ttds.index.build import index_config
    from ttds.train.dynamic import DynamicConfig

    icfg = index_config(cfg)
    encoder = model.backbone if section(cfg, "dynamic", DynamicConfig).refresh_text else _pretrained_encoder(cfg, icfg, device)
    coders = {t: TextCoder("quantiser", encoder, icfg.item_template, icfg.max_text_tokens, model.towers[t].tokenizer)
              for t in ("item", "user") if t in model.towers}
    return coders["item"], coders.get("user")


def attach(model, cfg: dict, run_dir: str | Path, ds, device: str = "cpu") -> None:
    """Give a loaded generative model what new items and anonymous users need (`item_coder`, `user_coder`)."""
    from ttds.models.ttds import TTDSRecommender

    if isinstance(model, TTDSRecommender):
        model.item_coder, model.user_coder = ttds_coders(cfg, model, device)
    else:
        model.item_coder, model.user_coder = static_coders(cfg, Path(run_dir), ds, model.item_index, device)
    log.info("new items: %s rule; anonymous users: %s", model.item_coder.rule,
             "user tower" if model.user_coder is not None else "no user ID")
