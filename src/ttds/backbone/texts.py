"""Texts the backbone encodes: items from a template over their fields, users from their own text.

Item template: one line per field, e.g. "Title: {title}"; a line whose fields are all empty is
dropped, the rest are joined with a space. User text: the user's reviews/queries when the dataset
has them (without text about the valid/test items), else the profile of training-item titles
(`ttds.data.dataset.user_texts`). Both are cut to a token budget with the backbone's tokenizer.
"""
from __future__ import annotations

import string

from ttds.data.dataset import TEXT_FIELDS, RecDataset
from ttds.data.dataset import user_texts as _user_text_parts
from ttds.errors import TTDSError

DEFAULT_ITEM_TEMPLATE = "Title: {title}\nBrand: {brand}\nCategories: {categories}\nDescription: {description}"


def _fields(template: str) -> list[str]:
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    bad = [f for f in names if f not in TEXT_FIELDS]
    if bad:
        raise TTDSError(f"item text template: field {{{bad[0]}}}: expected one of {', '.join(TEXT_FIELDS)}")
    return names


def render_item(template: str, values: dict[str, str]) -> str:
    lines = []
    for line in template.split("\n"):
        names = _fields(line)
        if names and not any(values.get(f, "").strip() for f in names):
            continue
        lines.append(line.format(**{f: values.get(f, "").strip() for f in names}).strip())
    return " ".join(l for l in lines if l)


def truncate(texts: list[str], tokenizer, max_tokens: int) -> list[str]:
    """Cut each text after its first `max_tokens` tokens (at a token boundary, no re-decoding)."""
    if tokenizer is None or not max_tokens:
        return texts
    texts = [t[: max_tokens * 12] for t in texts]  # cheap pre-cut: no token is longer than this
    enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_tokens, return_offsets_mapping=True)
    out = []
    for t, offsets in zip(texts, enc["offset_mapping"]):
        out.append(t[: offsets[-1][1]] if offsets else t)
    return out


def item_texts(ds: RecDataset, template: str = DEFAULT_ITEM_TEMPLATE, tokenizer=None, max_tokens: int = 128) -> list[str]:
    """One text per item, in item-id order."""
    _fields(template)
    cols = {f: ds.item_text.get(f) or [""] * ds.n_items for f in TEXT_FIELDS}
    texts = [render_item(template, {f: cols[f][i] or "" for f in TEXT_FIELDS}) for i in range(ds.n_items)]
    return truncate(texts, tokenizer, max_tokens)


def user_texts(ds: RecDataset, tokenizer=None, max_tokens: int = 128, max_items: int = 20) -> list[str]:
    """One text per user, in user-id order; never mentions the user's valid/test items."""
    texts = [" ".join(_user_text_parts(ds, u, max_items)) for u in range(ds.n_users)]
    return truncate(texts, tokenizer, max_tokens)
