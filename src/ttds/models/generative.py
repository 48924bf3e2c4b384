"""The generative recommender on semantic IDs (TTSS / LC-Rec / TIGER family).

An LM backbone reads an instruction, the user's ID and the semantic IDs of their recent items, and
generates the next item's ID token by token under the trie constraint (`ttds.models.beam`).

Token space. Word tokens keep their ids 0..V-1; the ID tokens are V, V+1, ...: item levels first
(`<a_*>`, `<b_*>`, ...), then user levels (`<ua_*>`, ...). Their embeddings are NOT rows of the
backbone's word embedding: they come from `id_table()`, by default a trainable matrix, or from an
`id_embedding_provider` (a callable returning [n_id_tokens, d]); the dynamic TTDS model plugs a
projection of the RQ-VAE codebooks in there so the recommendation loss reaches the tokenizers.

Output head. A shared transform (dense + GELU + LayerNorm) of the last hidden state, then for a
position whose next token is of level l only `h @ E_l^T + b_l` over that level's K_l tokens (the
input ID embeddings, tied; paper eq. 8). No 30k-50k word head is computed for ID targets; word
targets (item titles, reviews) use the tied word embeddings, only at those positions.

Backbones. Causal LMs (LLaMA, SmolLM2, Qwen) are used as they are. The default `minilm` is a BERT:
we load it with `is_decoder=True`, which makes HF apply a causal attention mask and keep a KV cache,
so one code path serves both: whole-sequence teacher forcing in training (every next item of a
history predicted in one forward) and prompt-once KV-cached beam search at inference. We chose
this over "BERT encoder + small ID decoder" because a bidirectional encoder would see the items it
must predict, which rules out whole-sequence training; the price is that MiniLM's weights were
pretrained bidirectionally and must adapt to the causal mask during fine-tuning.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ttds.backbone.backbone import run_body
from ttds.errors import TTDSError
from ttds.index.base import SemanticIndex
from ttds.index.trie import IDTrie
from ttds.tasks.builders import PromptCodec


class GenerativeRecommender(nn.Module):
    def __init__(self, backbone, item_index: SemanticIndex, user_index: SemanticIndex | None = None,
                 id_embedding_provider: Callable[[], torch.Tensor] | None = None, max_text_tokens: int = 32,
                 prompt: str = "instruction"):
        super().__init__()
        self.backbone = backbone  # ttds.backbone.Backbone (not a module; its model is registered below)
        self.lm = backbone.model
        word = backbone.hf_model.get_input_embeddings()
        self.n_words = int(word.num_embeddings)
        d = backbone.hidden_size
        # ID token groups: (tower, level, size); offsets into the ID table
        self.groups = [("item", l, int(k)) for l, k in enumerate(item_index.level_sizes)]
        if user_index is not None:
            self.groups += [("user", l, int(k)) for l, k in enumerate(user_index.level_sizes)]
        sizes = [k for _, _, k in self.groups]
        self.offsets = [0] + list(np.cumsum(sizes)[:-1].tolist())
        self.n_id_tokens = int(sum(sizes))
        self.register_buffer("token_group", torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)), persistent=False)
        std = float(word.weight.detach().std())
        self.id_emb = nn.Parameter(torch.randn(self.n_id_tokens, d) * std)
        self.id_bias = nn.Parameter(torch.zeros(self.n_id_tokens))
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))
        self.id_embedding_provider = id_embedding_provider
        self.max_text_tokens = max_text_tokens
        self.prompt = prompt  # tasks.prompt: instruction | ids (the codec's sequential-recommendation templates)
        self.eval_template = 0  # the sequential-recommendation template used by recommend()
        self.beam = 20
        self.beam_batch = 32  # users per beam-search micro-batch
        self.precision = "fp32"  # beam search in fp32 | bf16 (autocast: matmuls in bf16, scores summed in fp32)
        self.set_index(item_index, user_index)

    # ------------------------------------------------------------------ index (re-assignable)

    @property
    def user_group0(self) -> int:
        return len(self.item_index.level_sizes)

    def id_tokens(self, tower: str, codes: np.ndarray) -> np.ndarray:
        """Codes [n, L] of a tower -> unified token ids [n, L] (-1 stays -1: a short ID's missing token)."""
        g0 = 0 if tower == "item" else self.user_group0
        offs = np.asarray(self.offsets[g0:g0 + codes.shape[1]], dtype=np.int64)
        return np.where(codes >= 0, self.n_words + offs + codes, -1)

    def set_index(self, item_index: SemanticIndex, user_index: SemanticIndex | None = None) -> None:
        """Install (or re-install after a re-assignment) the indices; rebuilds tries and prompt codec.
        The level sizes must match the token space the model was built with."""
        want = [k for t, _, k in self.groups if t == "item"]
        if list(item_index.level_sizes) != want:
            raise ValueError(f"item index level sizes {item_index.level_sizes} != model's {want}")
        self.item_index, self.user_index = item_index, user_index
        self.n_items = item_index.n
        self.trie = IDTrie(item_index)
        self.user_trie = IDTrie(user_index) if user_index is not None else None
        self.codec = PromptCodec(self.backbone.tokenizer, self.id_tokens("item", item_index.codes),
                                 self.id_tokens("user", user_index.codes) if user_index is not None else None,
                                 self.max_text_tokens, self.prompt)

    # ------------------------------------------------------------------ network

    def id_table(self) -> torch.Tensor:
        """[n_id_tokens, d] embeddings of the ID tokens (input and tied output)."""
        return self.id_embedding_provider() if self.id_embedding_provider is not None else self.id_emb

    def word_embeddings(self) -> torch.Tensor:
        return self.backbone.hf_model.get_input_embeddings().weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        words = self.backbone.hf_model.get_input_embeddings()(ids.clamp(max=self.n_words - 1))
        idv = self.id_table()[(ids - self.n_words).clamp(min=0)]
        return torch.where((ids >= self.n_words).unsqueeze(-1), idv.to(words.dtype), words)

    def hidden(self, ids, attention_mask, position_ids, cache=None, use_cache: bool = False):
        return run_body(self.backbone.body, cache=cache, use_cache=use_cache, inputs_embeds=self.embed(ids),
                        attention_mask=attention_mask, position_ids=position_ids)

    def level_logits(self, h: torch.Tensor, group: int, transformed: bool = False) -> torch.Tensor:
        """Logits over the K tokens of ID group `group` (a tower's level) only."""
        s, k = self.offsets[group], self.groups[group][2]
        z = h if transformed else self.head(h)
        return z @ self.id_table()[s:s + k].t().to(z.dtype) + self.id_bias[s:s + k]

    target_state_hook = None  # called by loss() with (transformed states, targets) of the labelled positions

    def loss(self, ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all target tokens: ID targets over their level's tokens only,
        word targets over the word vocabulary. labels[b, p] = token predicted at p, -100 = none."""
        pos = (attention_mask.cumsum(1) - 1).clamp(min=0)
        h = self.hidden(ids, attention_mask, pos)
        sel = labels >= 0
        z, y = self.head(h[sel]), labels[sel]
        if self.target_state_hook is not None:
            self.target_state_hook(z.detach(), y)
        total = z.new_zeros(())
        word = y < self.n_words
        if word.any():
            total = total + F.cross_entropy(z[word] @ self.word_embeddings().t(), y[word], reduction="sum")
        yid = (y - self.n_words).clamp(min=0)
        group = self.token_group[yid]
        for g in range(len(self.groups)):
            m = ~word & (group == g)
            if m.any():
                total = total + F.cross_entropy(self.level_logits(z[m], g, transformed=True), yid[m] - self.offsets[g], reduction="sum")
        return total / sel.sum().clamp(min=1)

    # ------------------------------------------------------------------ recommendation

    def prompts(self, users, history, template: int | None = None, user_texts: list[str | None] | None = None) -> list[np.ndarray]:
        """Evaluation prompts. A user id < 0 (PAD) is a user outside the index: with a text in `user_texts`
        and a user coder, the user tower gives them an ID; otherwise the prompt has no user ID."""
        t = self.eval_template if template is None else template
        users = np.asarray(torch.as_tensor(users).cpu())
        history = np.asarray(torch.as_tensor(history).cpu())
        texts = user_texts or [None] * len(users)
        who = [int(u) if u >= 0 else self.anonymous_user_tokens(s) for u, s in zip(users, texts)]
        return [self.codec.seqrec_prompt(u, h[h >= 0], t) for u, h in zip(who, history)]

    @torch.no_grad()
    def recommend(self, users, history, k: int = 10, template: int | None = None, user_texts: list[str | None] | None = None,
                  return_scores: bool = False, exclude: list | None = None):
        """Ranked item ids [B, k] by trie-constrained beam search (-1 where fewer than k exist); with
        `return_scores` also their scores [B, k]: log P(item ID | prompt), the sum over the ID's tokens.
        `exclude`: per user, item ids that must not come out (searched around, not filtered afterwards).
        With `exclude_seen` (config `eval.seen_items`) the user's history items are excluded too. `precision`
        (config `eval.precision`) bf16 runs the backbone's matmuls in bf16 (2x faster on CPUs with AMX)."""
        from ttds.models.beam import beam_search_prompts

        if self.exclude_seen:
            hist = np.asarray(torch.as_tensor(history).cpu())
            extra = exclude or [()] * len(hist)
            exclude = [sorted(set(h[h >= 0].tolist()) | {int(i) for i in e}) for h, e in zip(hist, extra)]
        with torch.autocast(self.id_bias.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            items, scores = beam_search_prompts(self, self.prompts(users, history, template, user_texts), self.trie, 0,
                                                beam=max(self.beam, k), k=k, batch=self.beam_batch, exclude=exclude)
        return (items, scores) if return_scores else items

    @contextmanager
    def inference(self):
        """A region in which `recommend` calls share one bf16 copy of the weights (`precision` bf16; else a no-op).
        `torch.autocast` casts an fp32 weight to bf16 once per outermost autocast region, and caches the copy only
        for leaf tensors that require grad; `recommend` alone is one region, so each call re-casts every weight
        of the body (~11 M values for MiniLM; session 23, Games TTDS, batch 1 on a loaded core: p50 132 -> 124 ms). The
        serving worker thread, pre-compute and `evaluate()` hold this region around many calls. Frozen weights
        (LoRA's base) are marked as requiring grad while it lasts, so they are cached too (`recommend` runs under
        no_grad; the flag is shared by every thread of the process) and restored on exit. The weights must not
        change inside the region: casts are not refreshed."""
        if self.precision != "bf16":
            yield
            return
        frozen = [p for p in self.parameters() if not p.requires_grad]
        for p in frozen:
            p.requires_grad_(True)
        try:
            with torch.autocast(self.id_bias.device.type, dtype=torch.bfloat16):
                yield
        finally:
            for p in frozen:
                p.requires_grad_(False)

    # ------------------------------------------------------------------ serving: new items, anonymous users

    accepts_user_text = True  # recommend() takes user_texts (serving engine)
    accepts_exclude = True  # recommend() takes exclude: seen items are searched around, in one pass
    exclude_seen = False  # the model's seen-item rule (config eval.seen_items): never recommend a history item
    item_coder = None  # ttds.serve.new_items.TextCoder: a new item's text -> vector -> base codes (set when served)
    user_coder = None  # the same for an anonymous user's text (None: no user ID for anonymous users)

    @property
    def supports_new_items(self) -> bool:
        return self.item_coder is not None

    def add_item(self, fields: dict[str, str]) -> int:
        """A new item, without retraining: text vector and base codes from `item_coder`, then a free
        semantic ID; the index, trie and prompt codec are extended (`set_index`). Returns its id (the
        old n_items). Raises TTDSError when its ID does not fit the model's fixed token space."""
        if self.item_coder is None:
            raise TTDSError("model: no item coder attached (serving attaches one: ttds.serve.new_items.attach)")
        with torch.autocast(self.id_bias.device.type, enabled=False):  # full precision, as at indexing, in any region
            return self.add_item_vector(self.item_coder.item_vector(fields))

    def add_item_vector(self, x: torch.Tensor) -> int:
        item = self.add_item_codes(self.item_coder.base_codes(x, self.item_index))
        self.item_coder.remember(x)
        return item

    def add_item_codes(self, base_codes) -> int:
        """Append an item with these base codes and the first free disambiguation code (TTDS rule)."""
        codes = self._new_id(self.item_index, base_codes)
        self.set_index(SemanticIndex(codes, self.item_index.level_sizes, self.item_index.prefixes, "item"), self.user_index)
        return self.n_items - 1

    @staticmethod
    def _new_id(index: SemanticIndex, base_codes) -> np.ndarray:
        """All codes of `index` plus the new entity's row; TTDSError when a code exceeds its level's size."""
        from ttds.index.collisions import assign_new_id

        codes, sizes = assign_new_id(index, base_codes)
        full = [l for l, (s, k) in enumerate(zip(sizes, index.level_sizes)) if s > k]
        if full:
            l, row = full[0], codes[-1]
            prefix = "".join(index.token(j, c) for j, c in enumerate(row[:l]))
            raise TTDSError(f"new {index.tower}: its semantic ID needs {index.token(l, row[l])}, but level {l} of the model's "
                            f"token space has {index.level_sizes[l]} codes: the level is full after the prefix {prefix} "
                            "(retrain or re-index to grow it)")
        return codes

    def anonymous_user_tokens(self, text: str | None) -> np.ndarray | None:
        """Unified ID tokens for a user outside the index, from their text (None: no user ID)."""
        if not text or self.user_coder is None or self.user_index is None:
            return None
        base = self.user_coder.base_codes(self.user_coder.vector(text), self.user_index)
        try:
            row = self._new_id(self.user_index, base)[-1]
        except TTDSError:  # the disambiguation level is full here: the user's base codes with its code 0
            row = np.append(base, 0)[: self.user_index.n_levels]
        return self.id_tokens("user", row[None])[0]
