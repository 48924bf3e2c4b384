"""Readers into `RecDataset`, and the LC-Rec layout writer.

Formats:
  (a) LC-Rec layout: a folder with NAME.inter.json [NAME.item.json NAME.index.json NAME.item2id
      NAME.user2id NAME.user.json]
  (b) raw Amazon Review 2018 files -> LC-Rec layout: see `ttds.data.amazon`
  (c) generic table: a folder with interactions.csv|.parquet (user, item, timestamp[, text])
      and optionally items.csv|.parquet (item, title, description, brand, categories)
  "builtin" (or "builtin:users=3000,items=2000,seed=0"): the generated dataset
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ttds.data.dataset import TEXT_FIELDS, RecDataset, UserText
from ttds.errors import TTDSError
from ttds.io import read_json, read_text, write_json, write_text

log = logging.getLogger(__name__)


def _no_duplicate_keys(path: Path):
    def hook(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise TTDSError(f"{path}: key {k!r}: duplicate id")
            seen.add(k)
        return dict(pairs)

    return hook


def _read_json_object(path: Path, what: str) -> dict:
    text = read_text(path, what)
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys(path))
    except json.JSONDecodeError as e:
        raise TTDSError(f"{path}: line {e.lineno} column {e.colno}: malformed JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise TTDSError(f"{path}: expected a JSON object {{id: ...}}, got {type(obj).__name__}")
    return obj


def _int_key(path: Path, key: str) -> int:
    try:
        v = int(key)
    except ValueError:
        raise TTDSError(f"{path}: key {key!r}: expected an integer id") from None
    if v < 0 or str(v) != key.strip():
        raise TTDSError(f"{path}: key {key!r}: expected a non-negative integer id")
    return v


def _check_contiguous(path: Path, ids: list[int], what: str) -> None:
    missing = sorted(set(range(len(ids))) - set(ids))
    if missing:
        raise TTDSError(
            f"{path}: {what} ids are not contiguous: expected 0..{len(ids) - 1}, id {missing[0]} is missing"
        )


def _read_id_map(path: Path, n: int, what: str) -> list[str] | None:
    if not path.is_file():
        return None
    out: list[str | None] = [None] * n
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise TTDSError(f"{path}: line {lineno}: expected '<original id>\\t<integer id>'")
        try:
            i = int(parts[1])
        except ValueError:
            raise TTDSError(f"{path}: line {lineno}: {parts[1]!r} is not an integer id") from None
        if not 0 <= i < n:
            raise TTDSError(f"{path}: line {lineno}: {what} id {i} out of range 0..{n - 1}")
        if out[i] is not None:
            raise TTDSError(f"{path}: line {lineno}: duplicate {what} id {i}")
        out[i] = parts[0]
    if any(o is None for o in out):
        raise TTDSError(f"{path}: {what} id {out.index(None)} has no line")
    return out  # type: ignore[return-value]


def _finish_users(
    name: str, path: Path, seqs: list[list[int]], user_ids: list[str], drop_short: bool, notes: list[str]
):
    """Apply the >= 3 interactions rule (error, or drop with a warning)."""
    short = [u for u, s in enumerate(seqs) if len(s) < 3]
    if short and not drop_short:
        u = short[0]
        raise TTDSError(
            f"{path}: user {user_ids[u]!r} has {len(seqs[u])} interactions; leave-one-out needs >= 3 "
            f"({len(short)} such users; pass --drop-short to drop them with a warning)"
        )
    keep = [u for u in range(len(seqs)) if len(seqs[u]) >= 3]
    if short:
        msg = f"{name}: dropped {len(short)} users with fewer than 3 interactions"
        log.warning(msg)
        notes.append(msg)
    return keep


def read_lcrec(folder: str | Path, drop_short: bool = False) -> RecDataset:
    folder = Path(folder)
    if not folder.is_dir():
        raise TTDSError(f"{folder}: dataset folder not found")
    inters = sorted(folder.glob("*.inter.json"))
    if not inters:
        raise TTDSError(f"{folder}: no NAME.inter.json (expected the LC-Rec layout)")
    if len(inters) > 1:
        raise TTDSError(f"{folder}: several *.inter.json files ({', '.join(p.name for p in inters)}); expected one")
    inter_path = inters[0]
    name = inter_path.name[: -len(".inter.json")]
    notes: list[str] = []

    raw = _read_json_object(inter_path, "interaction file")
    user_keys = list(raw)
    uids = [_int_key(inter_path, k) for k in user_keys]
    _check_contiguous(inter_path, uids, "user")
    seqs_by_uid: list[list[int]] = [[] for _ in uids]
    for key, uid in zip(user_keys, uids):
        seq = raw[key]
        if not isinstance(seq, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in seq):
            raise TTDSError(f"{inter_path}: user {key!r}: expected a list of integer item ids")
        seqs_by_uid[uid] = seq

    # item table
    item_path = folder / f"{name}.item.json"
    if item_path.is_file():
        items_raw = _read_json_object(item_path, "item file")
        item_keys = [_int_key(item_path, k) for k in items_raw]
        _check_contiguous(item_path, item_keys, "item")
        n_items = len(item_keys)
        item_text = {f: [""] * n_items for f in TEXT_FIELDS}
        for k, v in items_raw.items():
            if not isinstance(v, dict):
                raise TTDSError(f"{item_path}: item {k!r}: expected an object with title/description/brand/categories")
            for f in TEXT_FIELDS:
                val = v.get(f, "")
                if isinstance(val, list):
                    val = ", ".join(str(x) for x in val)
                if not isinstance(val, str):
                    raise TTDSError(f"{item_path}: item {k!r} field {f!r}: expected a string")
                item_text[f][int(k)] = val
        table = item_path.name
    else:
        present = sorted({i for s in seqs_by_uid for i in s})
        n_items = (present[-1] + 1) if present else 0
        _check_contiguous(inter_path, present, "item")
        item_text = {f: [""] * n_items for f in TEXT_FIELDS}
        notes.append(f"{name}: no {name}.item.json: items have no text")
        table = "items 0..max in the interactions"

    for key, seq in zip(user_keys, (seqs_by_uid[u] for u in uids)):
        for i in seq:
            if not 0 <= i < n_items:
                raise TTDSError(
                    f"{inter_path}: user {key!r}: item id {i} is not in the item table ({table}: ids 0..{n_items - 1})"
                )

    user_ids = _read_id_map(folder / f"{name}.user2id", len(uids), "user") or [str(u) for u in range(len(uids))]
    item_ids = _read_id_map(folder / f"{name}.item2id", n_items, "item") or [str(i) for i in range(n_items)]

    index = None
    index_path = folder / f"{name}.index.json"
    if index_path.is_file():
        idx_raw = _read_json_object(index_path, "index file")
        index = {}
        for k, v in idx_raw.items():
            i = _int_key(index_path, k)
            if not (isinstance(v, list) and v and all(isinstance(t, str) for t in v)):
                raise TTDSError(f"{index_path}: item {k!r}: expected a list of token strings")
            if i >= n_items:
                raise TTDSError(f"{index_path}: item {k!r} is not in the item table (ids 0..{n_items - 1})")
            index[i] = v
        if len(index) != n_items:
            missing = next(i for i in range(n_items) if i not in index)
            raise TTDSError(f"{index_path}: item {missing} has no semantic ID")

    user_text = _read_user_text(folder / f"{name}.user.json", len(uids), n_items)

    keep = _finish_users(name, inter_path, seqs_by_uid, user_ids, drop_short, notes)
    return RecDataset(
        name=name,
        sequences=[np.asarray(seqs_by_uid[u], dtype=np.int64) for u in keep],
        item_text=item_text,
        user_ids=[user_ids[u] for u in keep],
        item_ids=item_ids,
        user_text=[user_text[u] for u in keep] if user_text is not None else None,
        index=index,
        notes=notes,
    )


def _read_user_text(path: Path, n_users: int, n_items: int) -> list[list[UserText]] | None:
    """ttds format: {"<uid>": [{"text": str, "item": int|null} | str, ...]}.
    LC-Rec format: {"user_explicit_preference": {"<uid>": [str, ...]}, ...} is also read."""
    if not path.is_file():
        return None
    raw = _read_json_object(path, "user text file")
    if "user_explicit_preference" in raw:
        raw = raw["user_explicit_preference"]
        if not isinstance(raw, dict):
            raise TTDSError(f"{path}: key 'user_explicit_preference': expected an object {{uid: [text, ...]}}")
    out: list[list[UserText]] = [[] for _ in range(n_users)]
    for k, entries in raw.items():
        u = _int_key(path, k)
        if u >= n_users:
            raise TTDSError(f"{path}: user {k!r} is not in the interactions (ids 0..{n_users - 1})")
        if not isinstance(entries, list):
            raise TTDSError(f"{path}: user {k!r}: expected a list of texts")
        for e in entries:
            if isinstance(e, str):
                out[u].append(UserText(e))
            elif isinstance(e, dict) and isinstance(e.get("text"), str):
                item = e.get("item")
                if item is not None and not (isinstance(item, int) and 0 <= item < n_items):
                    raise TTDSError(f"{path}: user {k!r}: item {item!r} is not an item id 0..{n_items - 1}")
                out[u].append(UserText(e["text"], item))
            else:
                raise TTDSError(f"{path}: user {k!r}: expected a string or {{\"text\": str, \"item\": id}}")
    return out


def write_lcrec(ds: RecDataset, folder: str | Path) -> Path:
    """Write `ds` in the LC-Rec layout (each file atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = ds.name
    write_json(folder / f"{n}.inter.json", {str(u): [int(i) for i in s] for u, s in enumerate(ds.sequences)}, None)
    write_json(
        folder / f"{n}.item.json",
        {str(i): {f: ds.item_text[f][i] for f in TEXT_FIELDS} for i in range(ds.n_items)},
    )
    write_text(folder / f"{n}.item2id", "".join(f"{o}\t{i}\n" for i, o in enumerate(ds.item_ids)))
    write_text(folder / f"{n}.user2id", "".join(f"{o}\t{u}\n" for u, o in enumerate(ds.user_ids)))
    if ds.user_text is not None:
        write_json(
            folder / f"{n}.user.json",
            {str(u): [{"text": t.text, "item": t.item} for t in ts] for u, ts in enumerate(ds.user_text)},
            None,
        )
    if ds.index is not None:
        write_json(folder / f"{n}.index.json", {str(i): ds.index[i] for i in sorted(ds.index)}, None)
    return folder


# ---------------------------------------------------------------- generic tables


def _read_table(path: Path):
    import pandas as pd

    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError:
        raise TTDSError(f"{path}: not valid UTF-8") from None
    except ImportError as e:
        raise TTDSError(f"{path}: reading {path.suffix} needs an extra package ({e.name}); pip install 'ttds[parquet]'") from None
    except Exception as e:  # pandas parser errors
        raise TTDSError(f"{path}: cannot parse table ({str(e).splitlines()[0]})") from None


def _find_table(folder: Path, stem: str) -> Path | None:
    for ext in (".csv", ".parquet"):
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


def read_table_dataset(folder: str | Path, drop_short: bool = False) -> RecDataset:
    """Generic interactions table (user, item, timestamp[, text]) + optional item table."""
    folder = Path(folder)
    inter_path = _find_table(folder, "interactions")
    if inter_path is None:
        raise TTDSError(f"{folder}: no interactions.csv or interactions.parquet")
    df = _read_table(inter_path)
    for col in ("user", "item", "timestamp"):
        if col not in df.columns:
            raise TTDSError(f"{inter_path}: missing column {col!r} (expected user, item, timestamp[, text])")
    df = df.astype({"user": str, "item": str})
    try:
        ts = df["timestamp"].astype(float)
    except ValueError:
        raise TTDSError(f"{inter_path}: column 'timestamp': expected numbers") from None
    df = df.assign(timestamp=ts, _row=np.arange(len(df)))

    items_path = _find_table(folder, "items")
    notes: list[str] = []
    if items_path is not None:
        it = _read_table(items_path)
        if "item" not in it.columns:
            raise TTDSError(f"{items_path}: missing column 'item'")
        it = it.astype({"item": str})
        dup = it["item"][it["item"].duplicated()]
        if len(dup):
            raise TTDSError(f"{items_path}: item {dup.iloc[0]!r}: duplicate id")
        item_ids = list(it["item"])
        unknown = set(df["item"]) - set(item_ids)
        if unknown:
            bad = sorted(unknown)[0]
            row = int(df.index[df["item"] == bad][0]) + 2
            raise TTDSError(f"{inter_path}: line {row}: item {bad!r} is not in the item table {items_path.name}")
        item_text = {f: ([str(x) for x in it[f]] if f in it.columns else [""] * len(it)) for f in TEXT_FIELDS}
    else:
        item_ids = sorted(set(df["item"]))
        item_text = {f: [""] * len(item_ids) for f in TEXT_FIELDS}
        notes.append(f"{folder.name}: no items table: items have no text")
    item_of = {o: i for i, o in enumerate(item_ids)}

    df = df.sort_values(["user", "timestamp", "_row"], kind="stable")
    user_ids: list[str] = []
    seqs: list[list[int]] = []
    texts: list[list[UserText]] = []
    has_text = "text" in df.columns
    for user, g in df.groupby("user", sort=True):
        user_ids.append(str(user))
        seq = [item_of[i] for i in g["item"]]
        seqs.append(seq)
        if has_text:
            texts.append([UserText(str(t), item_of[i]) for t, i in zip(g["text"], g["item"]) if str(t).strip()])
    keep = _finish_users(folder.name, inter_path, seqs, user_ids, drop_short, notes)
    return RecDataset(
        name=folder.name,
        sequences=[np.asarray(seqs[u], dtype=np.int64) for u in keep],
        item_text=item_text,
        user_ids=[user_ids[u] for u in keep],
        item_ids=item_ids,
        user_text=[texts[u] for u in keep] if has_text else None,
        notes=notes,
    )


# ---------------------------------------------------------------- one entry point


def load_dataset(spec: str | Path, drop_short: bool = False) -> RecDataset:
    """`builtin[:k=v,...]`, an LC-Rec folder, or a generic-table folder."""
    s = str(spec)
    if s == "builtin" or s.startswith("builtin:"):
        from ttds.data.builtin import BuiltinConfig, generate

        kwargs = {}
        if ":" in s:
            for part in s.split(":", 1)[1].split(","):
                if not part:
                    continue
                if "=" not in part:
                    raise TTDSError(f"dataset {s!r}: expected builtin:key=value,... got {part!r}")
                k, v = part.split("=", 1)
                kwargs[k.strip()] = v.strip()
        return generate(BuiltinConfig.from_strings(kwargs))
    path = Path(s)
    if not path.exists():
        raise TTDSError(f"{path}: dataset not found (expected a folder, or 'builtin')")
    if path.is_dir() and any(path.glob("*.inter.json")):
        return read_lcrec(path, drop_short)
    if path.is_dir() and _find_table(path, "interactions") is not None:
        return read_table_dataset(path, drop_short)
    raise TTDSError(
        f"{path}: unknown dataset layout: expected NAME.inter.json (LC-Rec) or interactions.csv|.parquet"
    )
