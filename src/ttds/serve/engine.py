"""The serving engine: the one small interface the store, pre-compute and the API talk to.

`ServingEngine` is what serving needs from a model; `RecommenderEngine` adapts any `Recommender`
(`recommend(users, history, k) -> LongTensor[B, k]` or `scores(users, history) -> [B, n_items]`,
history left-padded with PAD=-1) plus the dataset it was trained on (item text, user histories).

New items (POST /v1/items): a model that can take new items without retraining implements

    add_item(fields: dict[str, str]) -> int        # new item id (== the old n_items)
    index or item_index: SemanticIndex             # item semantic IDs, including the new item
    supports_new_items: bool                       # optional (default: has add_item)

i.e. it encodes the item text, quantises it with its item tower, resolves a collision with
`ttds.index.collisions.assign_new_id` (TTDS rule: the first free disambiguation code), extends its prefix trie so
constrained beam search can produce the new ID, and from then on recommends from n_items + 1 items.
The generative models do (`GenerativeRecommender.add_item`, with the coders of `ttds.serve.new_items`);
a TTDSError from add_item (e.g. a full disambiguation level) answers 409, and so does a model with a
fixed item vocabulary (SASRec and the other item-ID models).
`recommend(..., return_scores=True)` (when the model accepts it) gives each item's score with it.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from ttds.data.dataset import PAD, TEXT_FIELDS, RecDataset, pad_left
from ttds.errors import TTDSError

log = logging.getLogger(__name__)

Rec = tuple[int, "float | None"]  # (item id, score; None when the model only ranks)


class NewItemsUnsupported(TTDSError):
    """The served model has a fixed item vocabulary (HTTP 409)."""


class NewItemConflict(TTDSError):
    """The new item cannot be given an ID, e.g. its disambiguation level is full (HTTP 409)."""


class ServingEngine(Protocol):
    model_version: str
    n_items: int
    n_users: int
    supports_new_items: bool

    def user_history(self, user: int) -> list[int]: ...

    def recommend_histories(
        self, histories: list[list[int]], k: int, user_texts: list[str | None] | None = None, users: list[int] | None = None
    ) -> list[list[Rec]]: ...

    def add_item(self, fields: dict[str, str]) -> tuple[int, list[str]]: ...

    def item_tokens(self, item: int) -> list[str]: ...

    def item_fields(self, item: int) -> dict[str, str]: ...

    def item_titles(self, items: list[int]) -> list[str]: ...


def model_version(model_dir: str | Path) -> str:
    """`<folder name>-<12 hex>`: a content hash of every file in the model folder (names and bytes)."""
    root = Path(model_dir)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and not q.name.startswith(".")):
        if p.name in ("run.log",):
            continue
        h.update(str(p.relative_to(root)).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return f"{root.resolve().name}-{h.hexdigest()[:12]}"


class RecommenderEngine:
    """Adapts a `Recommender` + its dataset to `ServingEngine`. Not thread-safe: callers serialise
    calls (the API runs every model call on one worker thread; see `ttds.serve.worker`)."""

    def __init__(self, model, ds: RecDataset, version: str, max_history: int = 20, exclude_history: bool = True, device="cpu"):
        if not (hasattr(model, "scores") or hasattr(model, "recommend")):
            raise TTDSError(f"model {type(model).__name__}: expected a Recommender with scores() or recommend()")
        self.model, self.ds, self.model_version = model, ds, version
        self.max_history, self.exclude_history, self.device = max_history, exclude_history, device
        self.n_users = ds.n_users
        self._return_scores = "return_scores" in inspect.signature(model.recommend).parameters if hasattr(model, "recommend") else False
        self._fields = {f: list(ds.item_text[f]) for f in TEXT_FIELDS}
        self._lock = threading.Lock()  # guards the item tables while an item is being added

    @property
    def supports_new_items(self) -> bool:
        return bool(getattr(self.model, "supports_new_items", hasattr(self.model, "add_item")))

    @property
    def n_items(self) -> int:
        return len(self._fields["title"])

    def user_history(self, user: int) -> list[int]:
        return [int(i) for i in self.ds.sequences[user]]

    def user_text(self, user: int) -> str | None:
        from ttds.data.dataset import user_texts

        texts = user_texts(self.ds, user)
        return " ".join(texts) if texts else None

    def item_fields(self, item: int) -> dict[str, str]:
        with self._lock:
            return {f: v[item] for f, v in self._fields.items()}

    def item_titles(self, items: list[int]) -> list[str]:
        titles = self._fields["title"]  # append-only: reading without the lock is safe
        return [titles[i] for i in items]

    def item_tokens(self, item: int) -> list[str]:
        index = getattr(self.model, "index", None) or getattr(self.model, "item_index", None)
        if index is not None and hasattr(index, "tokens") and item < index.n:
            return index.tokens(item)
        if self.ds.index is not None and item in self.ds.index:
            return list(self.ds.index[item])
        return []

    def add_item(self, fields: dict[str, str]) -> tuple[int, list[str]]:
        if not self.supports_new_items:
            raise NewItemsUnsupported(
                f"model {type(self.model).__name__} has a fixed item vocabulary: new items need retraining"
            )
        fields = {f: str(fields.get(f) or "") for f in TEXT_FIELDS}
        try:
            item = int(self.model.add_item(fields))  # ADAPTER POINT: item tower -> semantic ID -> trie (module docstring)
        except TTDSError as e:
            raise NewItemConflict(str(e)) from None
        if item != self.n_items:
            raise RuntimeError(f"model.add_item returned item {item}, expected the next id {self.n_items}")
        with self._lock:
            for f in TEXT_FIELDS:
                self._fields[f].append(fields[f])
        return item, self.item_tokens(item)

    def recommend_histories(self, histories, k, user_texts=None, users=None):
        import torch

        B, n = len(histories), self.n_items
        hist = pad_left([np.asarray(list(h), dtype=np.int64) for h in histories], self.max_history)
        users_t = torch.tensor([PAD if u is None else int(u) for u in (users or [None] * B)], dtype=torch.long)
        hist_t = torch.from_numpy(hist)
        seen = [set(int(i) for i in h) if self.exclude_history else set() for h in histories]
        kwargs = {"user_texts": user_texts} if user_texts is not None and getattr(self.model, "accepts_user_text", False) else {}
        with torch.inference_mode():
            if hasattr(self.model, "scores"):
                s = self.model.scores(users_t.to(self.device), hist_t.to(self.device), **kwargs).float().cpu()
                if s.shape != (B, n):
                    raise RuntimeError(f"model.scores returned shape {tuple(s.shape)}, expected {(B, n)}")
                rows = [b for b, items in enumerate(seen) for _ in items]
                if rows:  # one indexed write for the whole batch
                    s[rows, [i for items in seen for i in items]] = float("-inf")
                top = torch.topk(s, min(k, n), dim=1)
                idx, val = top.indices.tolist(), top.values.tolist()  # plain lists: per-element tensor access is slow
                return [[(i, v) for i, v in zip(ri, rv) if v != float("-inf")] for ri, rv in zip(idx, val)]
            if getattr(self.model, "accepts_exclude", False):
                # the generative models search around the seen items (the trie masks every prefix that leads
                # only to them): one pass gives k unseen items, at the cost of an ordinary top-k search
                kwargs = kwargs | {"exclude": seen}
                return self._generate(users_t, hist_t, list(range(B)), min(n, k), k, seen, kwargs)
            # A model that can only rank: a beam search returns `beam` items for the price of k, so the first pass
            # asks for them all. Rows that the seen-item filter leaves short of k run again with a doubled beam, up
            # to k + |seen| (which always leaves k unseen items). Doubling, not k + |seen| at once: one user with
            # 680 seen items made the other short rows of a Games batch search 700 beams, and cost as much CPU
            # as the 256 users' first pass.
            want = min(n, max(k, int(getattr(self.model, "beam", 0) or 0)))
            out = self._generate(users_t, hist_t, list(range(B)), want, k, seen, kwargs)
            while short := [b for b in range(B) if len(out[b]) < k and min(n, k + len(seen[b])) > want]:
                want = min(n, 2 * want, k + max(len(seen[b]) for b in short))
                for b, row in zip(short, self._generate(users_t, hist_t, short, want, k, seen, kwargs)):
                    out[b] = row
        return out

    def _generate(self, users_t, hist_t, rows: list[int], want: int, k: int, seen: list[set], kwargs: dict) -> list[list[Rec]]:
        """`model.recommend` for some rows of the batch: `want` ranked items each, then the first k that are
        valid, unseen and distinct (with their scores when the model gives them)."""
        import torch

        if self._return_scores:
            kwargs = kwargs | {"return_scores": True}
        for key in ("user_texts", "exclude"):
            if key in kwargs:
                kwargs = kwargs | {key: [kwargs[key][b] for b in rows]}
        idx = torch.as_tensor(rows, dtype=torch.long)
        res = self.model.recommend(users_t[idx].to(self.device), hist_t[idx].to(self.device), want, **kwargs)
        items, scores = res if isinstance(res, tuple) else (res, None)
        items = items.cpu().tolist()
        scores = scores.float().cpu().tolist() if scores is not None else None
        n, out = self.n_items, []
        for j, b in enumerate(rows):
            row, taken = [], set()
            for r, i in enumerate(items[j]):
                if 0 <= i < n and i not in seen[b] and i not in taken:
                    taken.add(i)
                    row.append((int(i), None if scores is None else float(scores[j][r])))
                if len(row) == k:
                    break
            out.append(row)
        return out


QUANTIZE = ("none", "int8")


def check_quantize(quantize: str, device) -> None:
    """`--quantize` of `ttds serve`, `ttds precompute` and `ttds eval`: none | int8 (int8 on the CPU only)."""
    if quantize not in QUANTIZE or (quantize != "none" and str(device) != "cpu"):
        raise TTDSError(f"--quantize {quantize}: expected one of {', '.join(QUANTIZE)} (int8 on --device cpu only)")


def quantize_int8(model) -> None:
    """Dynamic int8 quantisation (CPU) of the Linear layers of a generative model's transformer body:
    int8 weights, activations quantised per call. At batch 1 a beam-search step is bound by streaming the
    fp32 weights (MiniLM: 44 MB per forward, 5 forwards per request), which int8 cuts 4x. The ID head
    stays fp32. Weights are quantised per output channel: on a trained Scientific TTSS the top-10 lists kept
    0.83 of their items (0.69 with one scale per tensor) at the same speed. It still changes the rankings
    (measured in the README): opt-in. Uses torch.ao's eager-mode `quantize_dynamic` (deprecated upstream in
    favour of torchao, still in torch 2.13)."""
    import warnings

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise TTDSError(f"--quantize int8: model {type(model).__name__} has no LM backbone (only generative models)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(backbone.body, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    model.precision = "fp32"  # the int8 layers take fp32 activations: no bf16 autocast around them


def load_engine(model_dir: str | Path, data: str, device: str = "cpu", exclude_history: bool = True, threads: int = 0,
                new_items: bool = True, quantize: str = "none") -> RecommenderEngine:
    """A trained model folder (any recipe, via `ttds.recipes.load_model`) + its dataset -> a RecommenderEngine.

    `new_items`: give a generative model its item / user coders (`ttds.serve.new_items`), so that it
    takes new items and anonymous users' text (pre-compute does not need them).

    `quantize`: none | int8 (`quantize_int8`, CPU; the model version gets a "+int8" suffix).

    `threads` > 0 sets torch's intra-op threads (serving on a busy CPU: 1 thread avoids oversubscription,
    which costs a small model 100x at batch 1 when the cores are shared)."""
    import torch

    from ttds.data.readers import load_dataset
    from ttds.recipes import load_model

    root = Path(model_dir)
    if not root.is_dir():
        raise TTDSError(f"--model {model_dir}: folder not found")
    check_quantize(quantize, device)
    cfg, model = load_model(root, torch.device(device))
    if threads > 0:  # after loading: a recipe may set threads from its config
        torch.set_num_threads(threads)
    ds = load_dataset(str(data))
    n = getattr(model, "n_items", ds.n_items)
    if n != ds.n_items:
        raise TTDSError(f"--data {data}: {ds.n_items} items, but the model in {root} was trained on {n}")
    if hasattr(model, "eval"):
        model.eval()
    if new_items and hasattr(model, "item_coder"):
        from ttds.serve.new_items import attach

        attach(model, cfg, root, ds, device)
    if quantize == "int8":  # after attach: a static index's coder has its own fp32 encoder (TTDS's is the served backbone)
        quantize_int8(model)
    version = model_version(root) + ("+int8" if quantize == "int8" else "")
    max_history = int((cfg.get("data") or {}).get("max_history") or 20)
    engine = RecommenderEngine(model, ds, version, max_history, exclude_history, device)
    log.info("serving %s: %d users, %d items", engine.model_version, ds.n_users, ds.n_items)
    return engine
