"""Model name -> training recipe. The one place that dispatches.

Every `configs/models/<name>.yaml` names its recipe at the top level (`recipe: classic`,
`recipe: generative`, ...); `ttds.train.<recipe>` must expose
    train(cfg: dict, ds: RecDataset, out_dir: Path) -> dict   (metrics, incl. "test")
    load(out_dir: Path, device) -> Recommender
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from ttds.config import load_config
from ttds.errors import TTDSError


def recipe(cfg: dict) -> ModuleType:
    name = cfg.get("recipe")
    if not isinstance(name, str) or not name.isidentifier():
        raise TTDSError(f"config key 'recipe': expected a recipe name such as 'classic', got {name!r}")
    try:
        return importlib.import_module(f"ttds.train.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"ttds.train.{name}":
            raise TTDSError(f"config recipe={name!r}: no module ttds.train.{name}") from None
        raise


def run_config(out_dir: str | Path) -> dict:
    """The resolved config a run was trained with (out_dir/config.yaml)."""
    path = Path(out_dir) / "config.yaml"
    if not path.is_file():
        raise TTDSError(f"{out_dir}: not a trained model folder (no config.yaml)")
    return load_config(file=path)


def load_model(out_dir: str | Path, device="cpu"):
    """Load a trained model of any recipe from its run folder."""
    out = Path(out_dir)
    cfg = run_config(out)
    return cfg, recipe(cfg).load(out, device)
