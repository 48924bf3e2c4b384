"""Layered YAML configuration: defaults < model < dataset < user file < CLI overrides.
A model's YAML may start from another's (`base: ttds`): the ablations state only their change; a list
(`base: [ttds, tiger]`) merges several, later ones winning.

A config is a plain nested dict. Components turn their section into a dataclass with
`section(cfg, "train", TrainConfig)`, which rejects unknown keys (catches typos).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ttds.errors import TTDSError

CONFIG_DIR = Path(__file__).parent / "configs"
T = TypeVar("T")
log = logging.getLogger(__name__)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise TTDSError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise TTDSError(f"{path}: malformed YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise TTDSError(f"{path}: expected a mapping at the top level")
    return data


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge; `over` wins. Returns a new dict."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (["train", "lr"], 0.001). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise TTDSError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=1e-3")
    key, value = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise TTDSError(f"--set {text!r}: empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str):  # YAML reads 1e-3 as a string; accept it as a number
        try:
            parsed = float(parsed) if any(c in parsed for c in ".eE") else int(parsed)
        except ValueError:
            pass
    return keys, parsed


def set_path(cfg: dict, keys: list[str], value: Any) -> None:
    node = cfg
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def flatten(cfg: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}: settings as dotted keys, e.g. to compare two configs."""
    out = {}
    for k, v in cfg.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def get_path(cfg: dict, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node


def available(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))


def model_layer(model: str, seen: tuple[str, ...] = ()) -> dict:
    """A model's YAML; `base: OTHER` (or `[A, B]`, B over A) starts from those layers, so an ablation states only
    what it changes."""
    path = CONFIG_DIR / "models" / f"{model}.yaml"
    if not path.is_file():
        raise TTDSError(f"model {model!r}: no config {path.name}; known models: {', '.join(available('models'))}")
    if model in seen:
        raise TTDSError(f"{path}: base: cycle {' -> '.join(seen + (model,))}")
    layer = _read_yaml(path)
    base = layer.pop("base", None)
    if base is None:
        return layer
    bases = [base] if isinstance(base, str) else base
    if not (isinstance(bases, list) and bases and all(isinstance(b, str) for b in bases)):
        raise TTDSError(f"{path}: base: expected a model name or a list of them, got {base!r}")
    out: dict = {}
    for b in bases:  # later bases win, this file's own keys win over all
        out = merge(out, model_layer(b, seen + (model,)))
    return merge(out, layer)


def known_sections() -> set[str]:
    """Top-level keys that some shipped layer declares: defaults.yaml or a model's YAML."""
    keys = set(_read_yaml(CONFIG_DIR / "defaults.yaml"))
    for name in available("models"):
        keys |= set(_read_yaml(CONFIG_DIR / "models" / f"{name}.yaml")) - {"base"}
    return keys


def _check_top_level(layer: dict, source: str, known: set[str]) -> None:
    """A top-level key no shipped layer declares is a typo (`--set trian.lr=...`): one clear line, not a silent no-op."""
    for key in layer:
        if key not in known:
            raise TTDSError(f"{source}: unknown top-level config key {key!r}; expected one of {', '.join(sorted(known))}")


def load_config(
    model: str | None = None,
    dataset: str | None = None,
    file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """Resolve the layered config. `dataset` is a dataset name (its layer is optional).
    Every top-level key must be one a shipped layer declares; a section the model's own layers lack (e.g. `dynamic.*`
    for the static `ttss`) is kept but logged as ignored."""
    known = known_sections()
    cfg = _read_yaml(CONFIG_DIR / "defaults.yaml")
    if model:
        cfg = merge(cfg, model_layer(model))
    own = set(cfg)
    if dataset:
        path = CONFIG_DIR / "datasets" / f"{dataset.lower()}.yaml"
        if path.is_file():
            layer = _read_yaml(path)
            _check_top_level(layer, str(path), known)
            cfg = merge(cfg, layer)
    if file:
        layer = _read_yaml(Path(file))
        _check_top_level(layer, str(file), known)
        cfg = merge(cfg, layer)
    for text in overrides or []:
        keys, value = parse_override(text)
        _check_top_level({keys[0]: None}, f"--set {text}", known)
        set_path(cfg, keys, value)
    if model:
        for key in sorted(set(cfg) - own):
            log.warning("config section %r: not a setting of model %r; ignored", key, model)
    return cfg


def section(cfg: dict, name: str, cls: type[T]) -> T:
    """Build dataclass `cls` from cfg[name], naming any unknown key."""
    data = cfg.get(name) or {}
    if not isinstance(data, dict):
        raise TTDSError(f"config section {name!r}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise TTDSError(f"config {name}.{unknown[0]}: unknown key; expected one of {', '.join(sorted(fields))}")
    kwargs = {}
    for k, v in data.items():
        f = fields[k]
        # numbers written as "1e-3" in YAML arrive as strings
        if f.type in ("float", float) and isinstance(v, (str, int)) and not isinstance(v, bool):
            try:
                v = float(v)
            except ValueError:
                raise TTDSError(f"config {name}.{k}: expected a number, got {v!r}") from None
        kwargs[k] = v
    return cls(**kwargs)


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
