"""Build, save and load a semantic index for one tower (items or users).

    texts (backbone.texts) -> embeddings (backbone.encode, cached) -> tokenizer (RQ-VAE | LSH | random)
      -> raw codes [n, M] -> collision handling -> SemanticIndex (+ the tokenizer module)

A user's vector is the embedding of the user's own text (reviews/queries) when the dataset has user text;
otherwise (`user_vectors: auto`) the mean of the vectors of the user's training items. That profile holds
much of what encoding those items' titles as one text holds (on Scientific the two user indices are within 3 %
of each other: benchmarks/results/user_vectors-Scientific.md), costs no encoding at all (the 50,546 Games
profiles take about 26 minutes on one core with MiniLM), and follows the items' vectors for free when the
dynamic recipe re-encodes them.

`kind: given` uses the LC-Rec `NAME.index.json` shipped with a dataset (`RecDataset.index`).
The two towers are two independent builds: separate parameters, separate token namespaces
(`<a_..>` for items, `<ua_..>` for users).

Saved folder: index.json + index.meta.json (SemanticIndex.save), tokenizer.safetensors,
config.json (how to rebuild the tokenizer module) and stats.json, each written atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ttds.backbone.texts import DEFAULT_ITEM_TEMPLATE, item_texts, user_texts
from ttds.data.dataset import RecDataset, profile_items
from ttds.errors import TTDSError
from ttds.index import collisions
from ttds.index.base import SemanticIndex, level_prefixes
from ttds.index.lsh import LSHIndexer
from ttds.index.random_index import RandomIndexer
from ttds.index.rqvae import RQVAE, RQVAEConfig
from ttds.io import load_safetensors, read_json, save_safetensors, write_json

log = logging.getLogger(__name__)

KINDS = ("rqvae", "lsh", "random", "given")
TOWERS = ("item", "user")
USER_VECTORS = ("auto", "text", "items")


@dataclass
class IndexConfig:
    kind: str = "rqvae"  # rqvae | lsh | random | given (the dataset's NAME.index.json)
    levels: int = 4
    codebook_size: int = 256
    collisions: str = "ttds"  # ttds | lcrec | none
    disambiguate: str = "colliding"  # which IDs get the disambiguation token: colliding (paper) | all
    item_template: str = DEFAULT_ITEM_TEMPLATE
    max_text_tokens: int = 128
    cache_embeddings: bool = True
    seed: int = 0
    encoder: str = ""  # backbone that embeds the texts ("" = the run's backbone), e.g. minilm
    user_vectors: str = "auto"  # text (encode the user's text or title profile) | items (mean of the user's training
    #                             items' vectors) | auto (text when the dataset has user text, else items)
    rqvae: dict = field(default_factory=dict)  # RQVAEConfig fields (levels/codebook_size/seed come from above)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise TTDSError(f"config index.kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.collisions not in collisions.STRATEGIES:
            raise TTDSError(f"config index.collisions={self.collisions!r}: expected one of {', '.join(collisions.STRATEGIES)}")
        if self.disambiguate not in collisions.DISAMBIGUATE:
            raise TTDSError(f"config index.options.disambiguate={self.disambiguate!r}: expected one of "
                            f"{', '.join(collisions.DISAMBIGUATE)}")
        if self.user_vectors not in USER_VECTORS:
            raise TTDSError(f"config index.user_vectors={self.user_vectors!r}: expected one of {', '.join(USER_VECTORS)}")

    def rqvae_config(self) -> RQVAEConfig:
        data = dict(self.rqvae or {})
        unknown = sorted(set(data) - set(RQVAEConfig.__dataclass_fields__))
        if unknown:
            raise TTDSError(f"config index.rqvae.{unknown[0]}: unknown key; expected one of {', '.join(RQVAEConfig.__dataclass_fields__)}")
        for k in ("lr", "beta", "dropout", "weight_decay", "max_minutes"):
            if isinstance(data.get(k), str):
                data[k] = float(data[k])
        data.update(levels=self.levels, codebook_size=self.codebook_size, seed=self.seed)
        return RQVAEConfig(**data)


@dataclass
class IndexBuild:
    index: SemanticIndex
    tokenizer: nn.Module | None  # None for a given index
    raw_codes: np.ndarray  # [n, M] before collision handling
    config: dict  # what `load_index` needs to rebuild the tokenizer module
    stats: dict  # figures: collisions, usage, perplexity, times


def make_tokenizer(kind: str, in_dim: int, cfg: IndexConfig) -> nn.Module:
    if kind == "rqvae":
        return RQVAE(in_dim, cfg.rqvae_config())
    if kind == "lsh":
        return LSHIndexer(in_dim, cfg.levels, cfg.codebook_size, cfg.seed)
    if kind == "random":
        return RandomIndexer(in_dim, cfg.levels, cfg.codebook_size, cfg.seed)
    raise TTDSError(f"index kind {kind!r} has no tokenizer module")


# ---------------------------------------------------------------- texts and embeddings


def tower_texts(ds: RecDataset, tower: str, cfg: IndexConfig, tokenizer=None) -> list[str]:
    if tower not in TOWERS:
        raise TTDSError(f"--tower {tower!r}: expected item or user")
    if tower == "item":
        return item_texts(ds, cfg.item_template, tokenizer, cfg.max_text_tokens)
    return user_texts(ds, tokenizer, cfg.max_text_tokens)


def user_vector_source(ds: RecDataset, cfg: IndexConfig) -> str:
    """"text" or "items": what the user tower's vectors are made from (`user_vectors`)."""
    if cfg.user_vectors == "auto":
        return "text" if ds.has_user_text() else "items"
    return cfg.user_vectors


def items_to_users(ds: RecDataset) -> torch.Tensor:
    """Sparse [n_users, n_items] matrix whose row u averages the user's profile items (`profile_items`)."""
    rows, cols = [], []
    for u in range(ds.n_users):
        items = profile_items(ds, u)
        rows += [u] * len(items)
        cols += items
    counts = np.bincount(np.asarray(rows, dtype=np.int64), minlength=ds.n_users).astype(np.float32)
    vals = 1.0 / counts[rows] if rows else np.zeros(0, np.float32)
    m = torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1),
                                torch.as_tensor(vals, dtype=torch.float32), (ds.n_users, ds.n_items), check_invariants=True)
    return m.coalesce()


def tower_inputs(ds: RecDataset, tower: str, cfg: IndexConfig, tokenizer=None) -> list[str] | torch.Tensor:
    """What a tower's vectors X are made from: its texts, or for users made from items the averaging matrix."""
    if tower == "user" and user_vector_source(ds, cfg) == "items":
        return items_to_users(ds)
    return tower_texts(ds, tower, cfg, tokenizer)


def vectors(inputs: list[str] | torch.Tensor, encode, item_x=None) -> torch.Tensor:
    """X from `tower_inputs`: texts through `encode`, an averaging matrix applied to the items' vectors."""
    if isinstance(inputs, torch.Tensor):
        return torch.sparse.mm(inputs.to(item_x.device), item_x)
    return encode(inputs)


def check_user_fit(folder: Path, ds: RecDataset, cfg: IndexConfig) -> None:
    """A saved user tokenizer must be used on the kind of vectors it was fitted on (folders written before
    `user_vectors` existed were fitted on text)."""
    conf = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    fitted, now = conf.get("user_vectors", "text"), user_vector_source(ds, cfg)
    if fitted != now:
        raise TTDSError(f"{folder}: this user tokenizer was fitted on user vectors from {fitted}, config "
                        f"index.options.user_vectors gives {now} on {ds.name}; set index.options.user_vectors={fitted} "
                        "to use it, or remove the folder to fit a new one")


def tower_vectors(ds: RecDataset, tower: str, cfg: IndexConfig, backbone) -> tuple[torch.Tensor, float, bool]:
    """A tower's X [n, d] with `embed`'s (x, seconds, from_cache)."""
    if backbone.cfg.init == "scratch":
        raise TTDSError("config backbone.init=scratch: an untrained backbone cannot embed the texts of the index; set "
                        "index.options.encoder to a pretrained one (e.g. minilm), as configs/models/tiger.yaml and "
                        "tiger_ttds.yaml do")
    inputs = tower_inputs(ds, tower, cfg, backbone.tokenizer)
    if isinstance(inputs, torch.Tensor):
        item_x, seconds, cached = tower_vectors(ds, "item", cfg, backbone)
        return vectors(inputs, None, item_x), seconds, cached
    return embed(backbone, inputs, cfg.cache_embeddings)


def embedding_key(backbone, texts: list[str]) -> str:
    """Cache key: the backbone's identity and settings + every text (so template and data are in it) + the device and
    thread count, which change the float sums: a run reads only vectors it would have computed itself."""
    h = hashlib.sha256()
    ident = [backbone.cfg.name_or_path, str(backbone.path), backbone.cfg.pooling, backbone.cfg.max_text_tokens,
             backbone.cfg.dtype, backbone.cfg.causal, len(backbone.added_tokens), backbone.lora_applied,
             str(backbone.device), torch.get_num_threads()]
    if backbone.cfg.num_layers is not None:  # appended only when set, so the keys of full backbones stay valid
        ident.append(backbone.cfg.num_layers)
    h.update(json.dumps(ident).encode())
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()[:32]


def embed(backbone, texts: list[str], cache: bool = True) -> tuple[torch.Tensor, float, bool]:
    """Backbone embeddings of `texts` [n, d], with a safetensors cache; returns (x, seconds, from_cache)."""
    from ttds.backbone.registry import cache_dir

    path = cache_dir() / "embeddings" / f"{embedding_key(backbone, texts)}.safetensors"
    if cache and path.is_file():
        x = load_safetensors(path)["x"]
        if len(x) == len(texts):
            log.info("embeddings from cache %s", path)
            return x, 0.0, True
    start = time.perf_counter()
    x = backbone.encode(texts)
    seconds = time.perf_counter() - start
    if cache:
        save_safetensors(path, {"x": x}, {"backbone": backbone.cfg.name_or_path, "n": str(len(texts))})
    return x, seconds, False


# ---------------------------------------------------------------- build


def index_from_codes(raw: np.ndarray, level_sizes: list[int], tower: str, strategy: str,
                     last_distances: torch.Tensor | None = None, report: dict | None = None,
                     disambiguate: str = "colliding") -> SemanticIndex:
    final = collisions.resolve(raw, strategy, last_distances, report, disambiguate == "colliding")
    sizes = list(level_sizes)
    if final.shape[1] > len(sizes):  # the disambiguation level
        sizes.append(max(1, int(final[:, -1].max()) + 1) if len(final) else 1)
    return SemanticIndex(final, sizes, level_prefixes(tower, len(level_sizes), final.shape[1] > len(level_sizes)), tower)


def given_index(ds: RecDataset, tower: str) -> SemanticIndex:
    if tower != "item":
        raise TTDSError("index kind 'given': a dataset ships an item index only; use --tower item")
    if not ds.index:
        raise TTDSError(f"dataset {ds.name}: no NAME.index.json shipped with it; use --kind rqvae, lsh or random")
    idx = SemanticIndex.from_tokens({str(k): v for k, v in ds.index.items()}, "item", f"{ds.name}.index.json")
    if idx.n != ds.n_items:
        raise TTDSError(f"{ds.name}.index.json: {idx.n} items, the dataset has {ds.n_items}")
    return idx


def build(ds: RecDataset, tower: str, backbone, cfg: IndexConfig, progress: bool = True) -> IndexBuild:
    """The full pipeline for one tower; `backbone` may be None for kind random/given."""
    start = time.perf_counter()
    if cfg.kind == "given":
        idx = given_index(ds, tower)
        stats = collisions.code_report(idx.codes, idx.codes, idx.level_sizes)
        stats.update(kind="given", tower=tower, total_seconds=time.perf_counter() - start)
        return IndexBuild(idx, None, idx.codes, {"kind": "given", "tower": tower}, stats)
    n = ds.n_items if tower == "item" else ds.n_users
    encode_s, cached = 0.0, False
    if cfg.kind == "random" and backbone is None:
        x = torch.zeros(n, 1)
    else:
        if backbone is None:
            raise TTDSError(f"index kind {cfg.kind!r} needs a backbone to embed the {tower} texts")
        x, encode_s, cached = tower_vectors(ds, tower, cfg, backbone)
    tok = make_tokenizer(cfg.kind, x.shape[1], cfg)
    fit_start = time.perf_counter()
    if isinstance(tok, RQVAE):
        tok.fit(x, progress)
    else:
        tok.fit(x)
    fit_s = time.perf_counter() - fit_start
    raw = tok.encode(x).numpy()
    dist = tok.last_level_distances(x) if (cfg.collisions == "lcrec" and isinstance(tok, RQVAE)) else None
    extra: dict = {}
    idx = index_from_codes(raw, tok.level_sizes, tower, cfg.collisions, dist, extra, cfg.disambiguate)
    stats = collisions.code_report(raw, idx.codes, tok.level_sizes) | extra
    fitted_on = {"user_vectors": user_vector_source(ds, cfg)} if tower == "user" and backbone is not None else {}
    stats.update(fitted_on)
    stats.update(kind=cfg.kind, tower=tower, collisions=cfg.collisions, encode_seconds=encode_s, embeddings_cached=cached,
                 fit_seconds=fit_s, total_seconds=time.perf_counter() - start, dim=int(x.shape[1]))
    if isinstance(tok, RQVAE):
        h = tok.history
        stats.update(epochs=h["epochs"], loss_first=h["loss"][0], loss_last=h["loss"][-1], recon_last=h["recon"][-1],
                     reseeded_codes=h["reseeded"])
    config = {"kind": cfg.kind, "tower": tower, "in_dim": int(x.shape[1]), "index": asdict(cfg),
              "backbone": getattr(getattr(backbone, "cfg", None), "name_or_path", None), "dataset": ds.name, "n": n}
    config.update(fitted_on)  # what `check_user_fit` compares
    return IndexBuild(idx, tok, raw, config, stats)


def index_config(cfg: dict) -> IndexConfig:
    """The builder's settings live in `index.options` of the run config (the `index:` section itself
    belongs to the recipe: source, user tower ...)."""
    from ttds.config import get_path

    opts = get_path(cfg, "index.options") or {}
    if not isinstance(opts, dict):
        raise TTDSError(f"config index.options: expected a mapping, got {opts!r}")
    unknown = sorted(set(opts) - set(IndexConfig.__dataclass_fields__))
    if unknown:
        raise TTDSError(f"config index.options.{unknown[0]}: unknown key; expected one of {', '.join(IndexConfig.__dataclass_fields__)}")
    return IndexConfig(**opts)


def encoder_for(backbone, icfg: IndexConfig):
    """The model that embeds the texts: `index.options.encoder` when set, else the given backbone."""
    if icfg.encoder:
        from ttds.backbone import Backbone, BackboneConfig

        device = str(backbone.device) if backbone is not None else "cpu"
        return Backbone.load(BackboneConfig(name_or_path=icfg.encoder, device=device, max_text_tokens=icfg.max_text_tokens))
    return backbone


def build_index(cfg: dict, ds: RecDataset, backbone, tower: str, out: str | Path | None = None) -> SemanticIndex:
    """Recipe entry point: settings from `index.options`; with `out`, the build (index, tokenizer
    weights, stats) is saved in out/tokenizer.<tower>/ so a dynamic model can reload the tokenizer."""
    icfg = index_config(cfg)
    b = build(ds, tower, encoder_for(backbone, icfg), icfg)
    if out is not None:
        save_build(b, Path(out) / f"tokenizer.{tower}")
    return b.index


# ---------------------------------------------------------------- files


def save_build(b: IndexBuild, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    b.index.save(out / "index.json")
    if b.tokenizer is not None:
        save_safetensors(out / "tokenizer.safetensors", dict(b.tokenizer.state_dict()) | {"raw_codes": torch.from_numpy(b.raw_codes)})
    write_json(out / "config.json", b.config)
    write_json(out / "stats.json", b.stats)
    return out


def load_index(path: str | Path) -> tuple[SemanticIndex, nn.Module | None]:
    """A saved folder -> (index, tokenizer module); an LC-Rec index JSON file -> (index, None)."""
    path = Path(path)
    if path.is_file():
        return SemanticIndex.load(path), None
    if not (path / "index.json").is_file():
        raise TTDSError(f"{path}: not an index folder (no index.json) nor an index JSON file")
    conf = read_json(path / "config.json") if (path / "config.json").is_file() else {"kind": "given"}
    idx = SemanticIndex.load(path / "index.json", conf.get("tower", "item"))
    if conf["kind"] == "given":
        return idx, None
    tok = make_tokenizer(conf["kind"], conf["in_dim"], IndexConfig(**conf["index"]))
    state = load_safetensors(path / "tokenizer.safetensors")
    state.pop("raw_codes", None)
    try:
        tok.load_state_dict(state)
    except RuntimeError as e:
        raise TTDSError(f"{path / 'tokenizer.safetensors'}: does not match config.json ({str(e).splitlines()[0]})") from None
    tok.eval()
    return idx, tok


def load_raw_codes(path: str | Path) -> np.ndarray | None:
    f = Path(path) / "tokenizer.safetensors"
    return load_safetensors(f)["raw_codes"].numpy() if f.is_file() else None
