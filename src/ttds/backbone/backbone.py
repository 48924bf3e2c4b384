"""`Backbone`: one wrapper around any Hugging Face text model (encoder or causal LM).

It gives what the rest of ttds needs from an LM:
  encode(texts)        -> FloatTensor [n, d], pooled last hidden states (the RQ-VAE input)
  tokenizer / model    the HF objects (the generative engine drives `model` directly)
  add_tokens(tokens)   semantic-ID tokens added to the vocabulary, embeddings resized
  hidden_states(...)   last hidden states (+ KV cache for causal models)
  apply_lora(new_ids)  peft LoRA with the *new* token rows trainable
  save_pretrained / from_pretrained of what was changed (added tokens, LoRA adapter or full weights)

BERT as a decoder: `causal: true` loads a BERT (e.g. minilm) with `is_decoder=True` through
AutoModelForCausalLM (BertLMHeadModel). HF then applies a causal attention mask, so the model can
generate left to right; its LM-head transform is freshly initialised (the weights were trained
bidirectionally), so it needs fine-tuning before its predictions mean anything.
"""
from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ttds.backbone.registry import offline, resolve
from ttds.errors import TTDSError
from ttds.io import read_json, write_json

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
POOLINGS = ("mean", "last", "cls")
INITS = ("pretrained", "scratch")


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: peft's default for the architecture


@dataclass
class BackboneConfig:
    name_or_path: str = "minilm"  # minilm | smollm2-135m | a local HF folder
    device: str = "cpu"
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (bf16 is very slow on CPUs without bf16 units)
    lora: Any = field(default_factory=LoraSettings)  # LoraSettings or a dict of its fields
    use_lora: bool = False  # apply LoRA when fine-tuning (apply_lora); else full fine-tuning
    max_text_tokens: int = 128  # truncation for encode() and item/user texts
    causal: bool = False  # load an encoder (BERT) as a decoder with a causal mask and LM head
    pooling: str = "mean"  # mean | last | cls
    batch_size: int = 64  # encode() batch size
    num_layers: int | None = None  # keep only the first N transformer layers (None: all): a cheaper backbone
    init: str = "pretrained"  # pretrained (the folder's weights) | scratch (random weights: a recommender trained from
    #                           zero, as TIGER; the folder gives the architecture and the tokenizer)
    arch: dict = field(default_factory=dict)  # config.json fields changed before a scratch init, e.g. {hidden_size: 128}

    def __post_init__(self):
        if isinstance(self.lora, dict):
            unknown = sorted(set(self.lora) - set(LoraSettings.__dataclass_fields__))
            if unknown:
                raise TTDSError(f"config backbone.lora.{unknown[0]}: unknown key; expected one of r, alpha, dropout, target_modules")
            self.lora = LoraSettings(**self.lora)
        if self.dtype not in DTYPES:
            raise TTDSError(f"config backbone.dtype={self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.pooling not in POOLINGS:
            raise TTDSError(f"config backbone.pooling={self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if self.num_layers is not None and (isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int)
                                            or self.num_layers < 1):
            raise TTDSError(f"config backbone.num_layers={self.num_layers!r}: expected a positive integer or null (all layers)")
        if self.init not in INITS:
            raise TTDSError(f"config backbone.init={self.init!r}: expected one of {', '.join(INITS)}")
        if not isinstance(self.arch, dict):
            raise TTDSError(f"config backbone.arch: expected a mapping of config.json fields, got {self.arch!r}")
        if self.arch and self.init != "scratch":
            raise TTDSError("config backbone.arch: changes the architecture, so the pretrained weights would not fit; "
                            "it needs backbone.init=scratch")


def _is_decoder_only(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return not getattr(config, "is_encoder_decoder", False) and any(a.endswith("ForCausalLM") for a in archs)


class Backbone:
    """Use `Backbone.load(cfg)`; the constructor takes already-built HF objects."""

    def __init__(self, cfg: BackboneConfig, model, tokenizer, path: Path):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.path = path  # the HF folder the base weights came from
        self.added_tokens: list[str] = []
        self.lora_applied = False

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, cfg: BackboneConfig | str | None = None) -> "Backbone":
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        if cfg is None or isinstance(cfg, str):
            cfg = BackboneConfig(name_or_path=cfg or "minilm")
        offline()
        path = resolve(cfg.name_or_path)
        try:
            hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise TTDSError(f"backbone {path}: cannot read the model folder ({str(e).splitlines()[0]})") from None
        causal = cfg.causal or _is_decoder_only(hf_config)
        if cfg.causal and not _is_decoder_only(hf_config):
            hf_config.is_decoder = True  # e.g. BERT -> BertLMHeadModel with a causal mask
        if cfg.num_layers is not None:
            keep_layers(hf_config, cfg.num_layers, path)
        auto = AutoModelForCausalLM if causal else AutoModel
        if cfg.init == "scratch":
            set_arch(hf_config, cfg.arch, path)
            model = auto.from_config(hf_config, dtype=DTYPES[cfg.dtype])  # torch's global RNG: the run's seed
            log.info("backbone %s: random weights (backbone.init=scratch)%s", cfg.name_or_path,
                     f", config changed: {cfg.arch}" if cfg.arch else "")
        else:
            model = _from_pretrained(auto, path, hf_config, DTYPES[cfg.dtype], cfg.name_or_path)
        model.to(cfg.device).eval()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        bb = cls(cfg, model, tokenizer, path)
        log.info("backbone %s: %s, %d layers, d=%d, %.1fM params", cfg.name_or_path, type(model).__name__,
                 getattr(hf_config, "num_hidden_layers", -1), bb.hidden_size, sum(p.numel() for p in model.parameters()) / 1e6)
        return bb

    # ------------------------------------------------------------------ properties

    @property
    def hf_model(self):
        """The transformers model underneath a peft wrapper (or the model itself)."""
        return self.model.get_base_model() if self.lora_applied else self.model

    @property
    def body(self):
        """The transformer without its LM head (BertModel, LlamaModel ...): cheaper for encoding."""
        return self.hf_model.base_model

    @property
    def hidden_size(self) -> int:
        return int(self.hf_model.config.hidden_size)

    @property
    def is_causal_lm(self) -> bool:
        return self.hf_model.get_output_embeddings() is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ encoding

    def hidden_states(self, input_ids, attention_mask=None, cache=None, use_cache: bool = False):
        """Last hidden states [b, t, d] of the transformer body; with use_cache also the KV cache."""
        return run_body(self.body, cache=cache, use_cache=use_cache, input_ids=input_ids, attention_mask=attention_mask)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.cfg.pooling == "cls":
            return hidden[:, 0]
        if self.cfg.pooling == "last":  # last non-padding position (right padding)
            last = mask.sum(1).clamp(min=1) - 1
            return hidden[torch.arange(len(hidden), device=hidden.device), last]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    def encode(self, texts: list[str], batch_size: int | None = None, grad: bool = False, progress: bool | None = None) -> torch.Tensor:
        """Pooled last hidden states, [n, d] float32 on the CPU (on the model device when grad=True).

        Texts are sorted by length so batches carry little padding; the output keeps input order.
        """
        from tqdm.auto import tqdm

        bs = batch_size or self.cfg.batch_size
        texts = [t if t.strip() else "[empty]" for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        self.tokenizer.padding_side = "right"
        chunks = []
        show = progress if progress is not None else len(texts) > 4 * bs
        with torch.set_grad_enabled(grad):
            for start in tqdm(range(0, len(texts), bs), desc="encode", disable=not show, unit="batch"):
                idx = order[start:start + bs]
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=self.cfg.max_text_tokens, return_tensors="pt").to(self.device)
                hidden = self.hidden_states(batch["input_ids"], batch["attention_mask"])
                pooled = self.pool(hidden.float(), batch["attention_mask"])  # fp32 sums, also under bf16 autocast
                chunks.append(pooled if grad else pooled.cpu())
        if not chunks:
            return torch.zeros(0, self.hidden_size)
        out = torch.cat(chunks)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return out[inverse.to(out.device)]

    # ------------------------------------------------------------------ vocabulary

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Add ID tokens (e.g. `<a_12>`) as whole tokens, resize the embeddings, return their ids.

        Tokens are added as special tokens with `lstrip=True`, so a space written before one
        (`"bought <a_3>"`) is absorbed instead of becoming a stray space token (SmolLM2's BPE).
        New embedding rows start at the mean of the old ones.
        """
        from transformers import AddedToken

        if self.lora_applied:
            raise TTDSError("backbone: add tokens before apply_lora(), not after")
        vocab = self.tokenizer.get_vocab()
        new = [t for t in dict.fromkeys(tokens) if t not in vocab]
        if new:
            self.tokenizer.add_tokens([AddedToken(t, lstrip=True, rstrip=False, normalized=False, special=True) for t in new],
                                      special_tokens=True)
            self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=True)
            self.added_tokens.extend(new)
        return [int(i) for i in self.tokenizer.convert_tokens_to_ids(list(tokens))]

    # ------------------------------------------------------------------ LoRA

    def _embedding_module_name(self) -> str:
        emb = self.model.get_input_embeddings()
        for name, module in self.model.named_modules():
            if module is emb:
                return name.split(".")[-1]  # "embed_tokens" (LLaMA), "word_embeddings" (BERT)
        raise TTDSError("backbone: cannot find the input embedding module")

    def apply_lora(self, new_token_ids: list[int] | None = None) -> None:
        """Wrap the model with peft LoRA; the given (new) token embedding rows stay trainable.

        Everything else in the base model is frozen. Without `trainable_token_indices` the added
        ID tokens would keep their initial embeddings (a known failure of LC-Rec-style training).
        """
        from peft import LoraConfig, get_peft_model

        if self.lora_applied:
            return
        s = self.cfg.lora
        kwargs = {}
        if new_token_ids:
            kwargs["trainable_token_indices"] = {self._embedding_module_name(): sorted(set(int(i) for i in new_token_ids))}
        target = s.target_modules
        if target is None and self.hf_model.config.model_type == "bert":
            target = ["query", "key", "value"]
        lcfg = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=target, **kwargs)
        self.model = get_peft_model(self.model, lcfg)
        self.lora_applied = True
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("LoRA r=%d on %s: %.2fM trainable parameters", s.r, lcfg.target_modules, trainable / 1e6)

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, out: str | Path) -> None:
        """Save what changed: tokenizer (with added tokens), LoRA adapter or full weights, backbone.json.

        Each file is written by HF into `out`; callers wanting atomicity save into a temp folder
        and rename it (as the training checkpoints do).
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(out))
        self.model.save_pretrained(str(out))  # adapter only when peft-wrapped; full model otherwise
        cfg = asdict(self.cfg)
        write_json(out / "backbone.json", {"config": cfg, "added_tokens": self.added_tokens, "lora": self.lora_applied,
                                           "base": str(self.path)})

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | None = None) -> "Backbone":
        """Inverse of `save_pretrained`."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        meta = read_json(folder / "backbone.json", "backbone.json")
        cfg = BackboneConfig(**meta["config"])
        if device:
            cfg.device = device
        if meta["lora"]:
            bb = cls.load(cfg)
            bb.add_tokens(meta["added_tokens"])
            from peft import PeftModel

            bb.model = PeftModel.from_pretrained(bb.model, str(folder), is_trainable=False)
            bb.lora_applied = True
        else:  # full weights were saved: load the folder itself as the base (its config.json has the architecture)
            cfg_local = BackboneConfig(**{**asdict(cfg), "name_or_path": str(folder), "lora": asdict(cfg.lora),
                                          "init": "pretrained", "arch": {}})
            bb = cls.load(cfg_local)
            bb.cfg = cfg
            bb.added_tokens = list(meta["added_tokens"])
        bb.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if bb.tokenizer.pad_token is None:
            bb.tokenizer.pad_token = bb.tokenizer.eos_token or bb.tokenizer.unk_token
        bb.model.eval()
        return bb


def keep_layers(hf_config, n: int, path: Path) -> None:
    """Cut a Hugging Face config to its first `n` transformer layers (`backbone.num_layers`): `from_pretrained` then
    builds and loads only those, and leaves the checkpoint's later layers unused: a pretrained LM at a fraction of
    the cost (SmolLM2 cut to 10 of 30 layers: 217 against 648 training MFLOP per token)."""
    have = getattr(hf_config, "num_hidden_layers", None)
    if not isinstance(have, int):
        raise TTDSError(f"backbone {path}: config.json has no num_hidden_layers, so backbone.num_layers cannot cut it")
    if n > have:
        raise TTDSError(f"config backbone.num_layers={n}: the model at {path} has only {have} layers")
    hf_config.num_hidden_layers = n
    if isinstance(getattr(hf_config, "layer_types", None), list):  # per-layer attention kinds (Qwen, Gemma ...)
        hf_config.layer_types = hf_config.layer_types[:n]


def set_arch(hf_config, arch: dict, path: Path) -> None:
    """`backbone.arch`: config.json fields changed before a scratch init (only fields the config already has, so a
    typo is an error, not a silently ignored key)."""
    for key, value in arch.items():
        if not hasattr(hf_config, key):
            raise TTDSError(f"config backbone.arch.{key}: the {hf_config.model_type} config of {path} has no such field")
        setattr(hf_config, key, value)
    heads = getattr(hf_config, "num_attention_heads", None)
    if isinstance(heads, int) and heads > 0 and hf_config.hidden_size % heads:
        raise TTDSError(f"config backbone.arch: hidden_size {hf_config.hidden_size} is not a multiple of "
                        f"num_attention_heads {heads}")


def _from_pretrained(auto, path: Path, hf_config, dtype, label: str):
    """`auto.from_pretrained` with transformers' load report (a table of keys, logged as a warning) replaced by one
    line. Expected gaps are logged at INFO: a fresh LM head (a BERT loaded as a decoder), unused checkpoint weights
    (BERT's pooler, layers cut by `num_layers`). Fresh weights inside the transformer body are a WARNING."""
    from transformers.utils import logging as hf_logging

    def load():
        return auto.from_pretrained(str(path), config=hf_config, dtype=dtype, local_files_only=True, output_loading_info=True)

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = load()
    except RuntimeError:  # weights that do not fit the config: load again with the report shown, it names the keys
        hf_logging.set_verbosity(level)
        try:
            model, info = load()
        except RuntimeError as e:
            raise TTDSError(f"backbone {path}: its weights do not fit its config.json ({str(e).splitlines()[0]}; "
                            "transformers' report above names the keys)") from None
    finally:
        hf_logging.set_verbosity(level)
    missing, unused = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    head = () if model.base_model is model else tuple(f"{n}." for n, m in model.named_children() if m is not model.base_model)
    in_body = [k for k in missing if not k.startswith(head)] if head else missing
    parts = [f"{len(missing)} weights newly initialised {'inside the transformer body' if in_body else 'in the output head'}"
             f" ({_key_summary(in_body or missing)})"] if missing else []
    parts += [f"{len(unused)} checkpoint weights unused ({_key_summary(unused)})"] if unused else []
    if parts:
        log.log(logging.WARNING if in_body else logging.INFO, "backbone %s: %s", label, "; ".join(parts))
    return model


def _key_summary(keys: list[str], shown: int = 3) -> str:
    """`a.b, a.c, ... (+N)` for a log line."""
    return ", ".join(keys[:shown]) + (f", ... (+{len(keys) - shown})" if len(keys) > shown else "")


# ---------------------------------------------------------------------- KV cache across transformers versions


@functools.lru_cache(maxsize=None)
def cache_kwarg(forward_owner: type) -> str:
    """Name of the KV-cache argument of a transformers model's forward: `cache` (transformers >= 5.24, where
    `past_key_values` is deprecated) or `past_key_values` (earlier versions)."""
    return "cache" if "cache" in inspect.signature(forward_owner.forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache of a transformers model output under either name (see `cache_kwarg`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def run_body(body, cache=None, use_cache: bool = False, **inputs):
    """One forward of a transformer body (BertModel, LlamaModel ...): its last hidden states, and with
    use_cache also its KV cache. Passes the cache under the installed transformers' argument name."""
    out = body(**inputs, **{cache_kwarg(type(body)): cache}, use_cache=use_cache, return_dict=True)
    return (out.last_hidden_state, output_cache(out)) if use_cache else out.last_hidden_state
