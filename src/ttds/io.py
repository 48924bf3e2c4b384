"""Safe, atomic file I/O shared by every module (JSON, safetensors, text).

Every write goes to a temporary file in the same folder and is renamed into place,
so a crash never leaves a half-written output. Loading uses only safe formats.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ttds.errors import TTDSError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    path = Path(path)
    if not path.is_file():
        raise TTDSError(f"{path}: {what} not found")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise TTDSError(f"{path}: line {line}: not valid UTF-8 (byte offset {e.start})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TTDSError(f"{path}: line {e.lineno} column {e.colno}: malformed JSON ({e.msg})") from None


def iter_json_lines(path: str | os.PathLike) -> Iterator[dict]:
    """Iterate a JSON-lines file (optionally .gz); errors name the line."""
    import gzip

    path = Path(path)
    if not path.is_file():
        raise TTDSError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TTDSError(f"{path}: line {lineno}: not valid UTF-8") from None
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TTDSError(f"{path}: line {lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise TTDSError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
            yield obj


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_safetensors(path: str | os.PathLike) -> dict:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise TTDSError(f"{path}: weights file not found")
    return load_file(str(path))
