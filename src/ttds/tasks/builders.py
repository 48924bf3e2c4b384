"""Tuning tasks -> token sequences for the generative recommender.

Every example is one token sequence in the model's *unified* token space (word ids 0..V-1, then the
ID tokens, see `GenerativeRecommender.token_space`) plus a flag per token saying "this token is a
training target" (predicted from the position before it). ID targets are scored by the ID-only head
of their level, word targets by the word head.

Tasks (weights in `tasks:` of the config; a weight is examples per sequential-recommendation window):
  seqrec      template + user + item_1 ... item_n: every item is a target (whole-sequence training)
  item2index  title/description -> item ID                        (LC-Rec)
  index2item  item ID -> title                                    (LC-Rec)
  userpred    item + users who bought it so far -> every next user (TTDS high-order task)
  review      user + history -> the user's review of the last item (TTDS, where user text exists)
Only training interactions (seq[:-2]) are used; reviews of the valid/test items are never used.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ttds.data.dataset import RecDataset, training_user_text
from ttds.errors import TTDSError
from ttds.tasks import templates as T

_FIELD = re.compile(r"\{(\w+)\}")
TASKS = ("seqrec", "item2index", "index2item", "userpred", "review")
USER_PROFILES = ("all", "earlier", "auto")


@dataclass
class Example:
    tokens: np.ndarray  # [T] int64 unified token ids
    target: np.ndarray  # [T] bool: token is predicted from the previous position
    slots: int = 0  # T if every ID had its full length (short IDs count their missing token): the bucketing length,
    # the same before and after a code re-assignment (0 = T)


@dataclass
class TaskConfig:
    seqrec: float = 1.0
    item2index: float = 0.0
    index2item: float = 0.0
    userpred: float = 0.0
    review: float = 0.0
    max_text_tokens: int = 32  # truncation of titles/descriptions/reviews
    eval_template: int = 0  # the fixed sequential-recommendation template reported by evaluation
    # the user ID in a seqrec example: all (the user's one ID, coded from all training items, the targets too: the
    # paper's way) | earlier (coded from the items before the example's first target: `seqrec_earlier_examples`) |
    # auto (earlier when the user tower codes item profiles, else all: `ttds.train.loop.resolve_user_profile`)
    user_profile: str = "all"
    prompt: str = "instruction"  # instruction (LC-Rec / TTDS templates) | ids (TIGER: IDs only, no words)

    def __post_init__(self):
        if self.prompt not in T.PROMPTS:
            raise TTDSError(f"config tasks.prompt={self.prompt!r}: expected one of {', '.join(T.PROMPTS)}")
        if self.user_profile not in USER_PROFILES:
            raise TTDSError(f"config tasks.user_profile={self.user_profile!r}: expected one of {', '.join(USER_PROFILES)}")


class PromptCodec:
    """Text pieces and IDs -> unified token ids. Template pieces are tokenized once and cached."""

    def __init__(self, tokenizer, item_tokens: np.ndarray, user_tokens: np.ndarray | None, max_text_tokens: int = 32,
                 prompt: str = "instruction"):
        self.tok = tokenizer
        self.words = prompt == "instruction"  # ids: a user is their ID tokens only (or nothing), no words
        self.seqrec = T.PROMPTS[prompt]  # the sequential-recommendation templates
        self.item_tokens = item_tokens  # [n_items, L] unified ids (-1: no token, the end of a short ID)
        self.user_tokens = user_tokens  # [n_users, Lu] unified ids or None
        self.max_text_tokens = max_text_tokens
        self.bos = [i for i in (tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id,) if i is not None]
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.eos = [eos] if eos is not None else []
        self._cache: dict[str, np.ndarray] = {}

    def text(self, s: str, limit: int | None = None) -> np.ndarray:
        if limit is None and s in self._cache:
            return self._cache[s]
        ids = np.asarray(self.tok(s.rstrip(), add_special_tokens=False)["input_ids"], dtype=np.int64)
        if limit is not None:
            return ids[:limit]
        self._cache[s] = ids
        return ids

    def user(self, u, gaps: bool = False) -> list[np.ndarray]:
        """`u`: a user id; or the unified ID tokens (np.ndarray) of a user outside the index (an anonymous
        user whose ID the user tower assigned from their text); or None / a negative id (PAD): an unknown
        user without an ID, rendered "the user" as by a model without a user tower. `gaps`: keep a short ID's -1
        (the training builders do; `_example` drops them)."""
        if isinstance(u, np.ndarray):
            t = u
        elif self.user_tokens is None or u is None or u < 0:
            return [self.text("the user")] if self.words else []
        else:
            t = self.user_tokens[u]
        return [self.text("user"), t if gaps else t[t >= 0]] if self.words else [t if gaps else t[t >= 0]]

    def items(self, items, gaps: bool = False) -> np.ndarray:
        """The ID tokens of these items, one after the other (`gaps`: with the -1 of short IDs, see `user`)."""
        t = self.item_tokens[np.asarray(items, dtype=np.int64)].reshape(-1)
        return t if gaps else t[t >= 0]

    def render(self, template: str, gaps: bool = False, **values) -> np.ndarray:
        """Template with {user} {item} {title} {description} {history} filled in (no targets; `gaps`: see `user`)."""
        parts: list[np.ndarray] = [np.asarray(self.bos, dtype=np.int64)]
        pos = 0
        for m in _FIELD.finditer(template):
            if m.start() > pos:
                parts.append(self.text(template[pos:m.start()]))
            name, v = m.group(1), values[m.group(1)]
            if name == "user":
                parts.extend(self.user(v, gaps))
            elif name == "item":
                parts.append(self.items([v], gaps))
            elif name == "history":
                parts.append(self.items(v, gaps))
            else:
                parts.append(self.text(str(v), self.max_text_tokens))
            pos = m.end()
        if template[pos:].strip():
            parts.append(self.text(template[pos:]))
        return np.concatenate(parts)

    def seqrec_prompt(self, user, history, template: int = 0) -> np.ndarray:
        """The evaluation prompt: template + user (see `user`) + history; the next tokens are the answer."""
        return np.concatenate([self.render(self.seqrec[template], user=user), self.items(history)])


def _example(prompt: np.ndarray, answer: np.ndarray) -> Example:
    """Prompt and answer rendered with gaps (-1: a short ID's missing token): the gaps are dropped and counted in
    `slots`, so a re-assignment that lengthens or shortens an ID does not move the example to another bucket."""
    tokens = np.concatenate([prompt, answer])
    target = np.concatenate([np.zeros(len(prompt), bool), np.ones(len(answer), bool)])
    keep = tokens >= 0
    return Example(tokens[keep], target[keep], len(tokens))


def window_bounds(n: int, length: int) -> list[tuple[int, int]]:
    """(start, end) of chunks of at most `length` items covering a sequence of n, newest first, overlapping
    by one item (so every item except the very first is predicted with some history)."""
    out, end = [], n
    while end > 0:
        start = max(0, end - length)
        out.append((start, end))
        if start == 0:
            break
        end = start + 1
    return out


def windows(seq: np.ndarray, length: int) -> list[np.ndarray]:
    """The chunks of `window_bounds`."""
    return [seq[a:b] for a, b in window_bounds(len(seq), length)]


@dataclass
class TaskData:
    """What the task builders read: the dataset, the training sequences and the codec."""

    ds: RecDataset
    train: list[np.ndarray]
    codec: PromptCodec
    max_history: int
    buyers: list[np.ndarray] = field(default_factory=list)  # item -> users who bought it in training
    # (profiles, owners) -> unified user-ID tokens [n, L] (`ttds.index.profiles.ProfileIDs`); tasks.user_profile=earlier
    profile_tokens: Callable[[list, list], np.ndarray] | None = None

    def __post_init__(self):
        if not self.buyers:
            lists: list[list[int]] = [[] for _ in range(self.ds.n_items)]
            for u, s in enumerate(self.train):
                for i in s:
                    lists[int(i)].append(u)
            # no timestamps in RecDataset: buyers are ordered by user id (a stable, leak-free order)
            self.buyers = [np.asarray(sorted(set(b)), dtype=np.int64) for b in lists]


def seqrec_earlier_examples(d: TaskData, rng: np.random.Generator) -> list[Example]:
    """`seqrec` without the future in the user ID: in each window s[a:b] a cut c is drawn uniformly from a..b-1;
    the prompt's user ID is coded from the user's items before c (`TaskData.profile_tokens`; no ID when c = 0),
    s[a:c] follow as history and only s[c:b] are targets. Evaluation prompts match: the stored ID is coded
    from training items, all before the target."""
    if d.profile_tokens is None:
        raise TTDSError("config tasks.user_profile=earlier: this model has no user tower that codes item profiles "
                        "(needs index.user: true with an rqvae or lsh user_source on item-mean user vectors)")
    plan = []
    for u, s in enumerate(d.train):
        for a, b in window_bounds(len(s), d.max_history + 1):
            plan.append((u, a, b, int(rng.integers(a, b)), int(rng.integers(len(d.codec.seqrec)))))
    need = [i for i, p in enumerate(plan) if p[3] > 0]  # examples with a profile (c = 0: none, no user ID)
    tokens = d.profile_tokens([d.train[plan[i][0]][:plan[i][3]] for i in need], [plan[i][0] for i in need]) if need else []
    ids = dict(zip(need, tokens))
    out = []
    for i, (u, a, b, c, t) in enumerate(plan):
        s = d.train[u]
        prompt = d.codec.render(d.codec.seqrec[t], gaps=True, user=ids.get(i))
        out.append(_example(np.concatenate([prompt, d.codec.items(s[a:c], True)]), d.codec.items(s[c:b], True)))
    return out


def seqrec_examples(d: TaskData, rng: np.random.Generator) -> list[Example]:
    out = []
    for u, s in enumerate(d.train):
        for w in windows(s, d.max_history + 1):
            prompt = d.codec.render(d.codec.seqrec[rng.integers(len(d.codec.seqrec))], gaps=True, user=u)
            out.append(_example(prompt, d.codec.items(w, True)))
    return out


def item2index_examples(d: TaskData, n: int, rng: np.random.Generator) -> list[Example]:
    titles, descs = d.ds.item_text["title"], d.ds.item_text["description"]
    out = []
    for i in rng.integers(0, d.ds.n_items, n):
        tpl = T.ITEM2INDEX[rng.integers(len(T.ITEM2INDEX))]
        if "{description}" in tpl and not descs[i].strip():
            tpl = T.ITEM2INDEX[0]
        if not titles[i].strip() and "{title}" in tpl:
            continue
        out.append(_example(d.codec.render(tpl, gaps=True, title=titles[i], description=descs[i]), d.codec.items([i], True)))
    return out


def index2item_examples(d: TaskData, n: int, rng: np.random.Generator) -> list[Example]:
    titles = d.ds.item_text["title"]
    out = []
    for i in rng.integers(0, d.ds.n_items, n):
        if titles[i].strip():
            answer = np.concatenate([d.codec.text(titles[i], d.codec.max_text_tokens), np.asarray(d.codec.eos, np.int64)])
            out.append(_example(d.codec.render(T.INDEX2ITEM[rng.integers(len(T.INDEX2ITEM))], gaps=True, item=int(i)), answer))
    return out


def userpred_examples(d: TaskData, n: int, rng: np.random.Generator) -> list[Example]:
    if d.codec.user_tokens is None:
        return []
    candidates = np.asarray([i for i, b in enumerate(d.buyers) if len(b) >= 2])
    out = []
    for i in rng.choice(candidates, n) if len(candidates) else []:
        users = d.buyers[i][-(d.max_history + 1):]
        prompt = d.codec.render(T.USERPRED[rng.integers(len(T.USERPRED))], gaps=True, item=int(i))
        out.append(_example(prompt, d.codec.user_tokens[users].reshape(-1)))
    return out


def review_examples(d: TaskData, n: int, rng: np.random.Generator) -> list[Example]:
    if not d.ds.has_user_text():
        return []
    out = []
    for u in rng.integers(0, d.ds.n_users, n):
        pos = {int(i): p for p, i in enumerate(d.train[u])}
        texts = [t for t in training_user_text(d.ds, int(u)) if t.item is not None and t.item in pos and t.text.strip()]
        if not texts:
            continue
        t = texts[rng.integers(len(texts))]
        hist = d.train[u][max(0, pos[t.item] + 1 - d.max_history): pos[t.item] + 1]
        prompt = d.codec.render(T.REVIEW[rng.integers(len(T.REVIEW))], gaps=True, user=int(u), history=hist)
        answer = np.concatenate([d.codec.text(t.text, d.codec.max_text_tokens), np.asarray(d.codec.eos, np.int64)])
        out.append(_example(prompt, answer))
    return out


def build_epoch(d: TaskData, cfg: TaskConfig, rng: np.random.Generator) -> list[Example]:
    """All examples of one epoch: the sequential windows plus the weighted auxiliary tasks."""
    if cfg.user_profile == "auto":
        raise TTDSError("config tasks.user_profile=auto: the recipe must resolve it first (ttds.train.loop.resolve_user_profile)")
    seqrec = seqrec_earlier_examples if cfg.user_profile == "earlier" and d.codec.user_tokens is not None else seqrec_examples
    seq = seqrec(d, rng) if cfg.seqrec > 0 else []
    base = max(len(seq), 1)
    out = list(seq)
    if 0 < cfg.seqrec < 1:
        out = [seq[i] for i in sorted(rng.choice(len(seq), int(round(cfg.seqrec * len(seq))), replace=False))]
    for name, fn in (("item2index", item2index_examples), ("index2item", index2item_examples),
                     ("userpred", userpred_examples), ("review", review_examples)):
        w = getattr(cfg, name)
        if w > 0:
            out.extend(fn(d, int(round(w * base)), rng))
    return out
