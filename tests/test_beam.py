import numpy as np
import pytest
import torch

from _generative_fixtures import tiny_backbone_dir
from ttds.backbone import Backbone, BackboneConfig
from ttds.index.base import SemanticIndex
from ttds.models.beam import beam_search, beam_search_prompts, exhaustive_scores
from ttds.models.generative import GenerativeRecommender


@pytest.fixture(scope="module", params=["bert", "llama", "short-ids"])
def model(request, tmp_path_factory):
    from ttds.index.collisions import disambiguate

    torch.manual_seed(0)
    folder = tiny_backbone_dir(tmp_path_factory.mktemp("bb"), "bert" if request.param == "short-ids" else request.param)
    bb = Backbone.load(BackboneConfig(name_or_path=str(folder), causal=True))
    if request.param == "short-ids":  # the paper's IDs: 2 codes, plus a third token only where 2 codes collide
        codes = disambiguate(np.random.default_rng(1).integers(0, 4, (30, 2)))
        assert (codes[:, -1] < 0).sum() >= 5 and (codes[:, -1] >= 0).sum() >= 5
        items = SemanticIndex(codes, [4, 4, 4], ["a", "b", "p"])
    else:
        codes = np.unique(np.random.default_rng(1).integers(0, 4, (30, 3)), axis=0)  # a sparse 3-level trie
        items = SemanticIndex(codes, [4, 4, 4], ["a", "b", "c"])
    users = SemanticIndex(np.arange(6).reshape(6, 1), [6], ["ua"], "user")
    m = GenerativeRecommender(bb, items, users).eval()
    with torch.no_grad():
        m.id_emb.mul_(30)  # peaked distributions so rankings are not near-ties
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared machine
    yield m
    torch.set_num_threads(n)


def test_beam_matches_exhaustive_and_is_valid(model):
    prompts = [model.codec.seqrec_prompt(0, [1, 2, 3]), model.codec.seqrec_prompt(3, [5]), model.codec.seqrec_prompt(5, [])]
    n = model.item_index.n
    # beam >= catalogue: beam search is exact, so it must equal exhaustive scoring of every ID
    ent, score = beam_search(model, prompts, model.trie, 0, beam=64, k=10)
    for i, p in enumerate(prompts):
        ref = exhaustive_scores(model, p, model.item_index.codes)
        top = ref.topk(10)
        assert ent[i].tolist() == top.indices.tolist()
        assert torch.allclose(score[i], top.values, atol=1e-4)
    # default beam 20 < catalogue: still valid, unique, sorted; more than the catalogue -> -1 padding
    ent, score = beam_search(model, prompts, model.trie, 0, beam=20, k=20)
    for row, s in zip(ent.tolist(), score):
        assert all(0 <= e < n for e in row) and len(set(row)) == 20
        assert torch.all(s[:-1] >= s[1:])
    ent, _ = beam_search(model, prompts[:1], model.trie, 0, beam=64, k=n + 5)
    assert sorted(ent[0, :n].tolist()) == list(range(n)) and ent[0, n:].tolist() == [-1] * 5


def test_batching_does_not_change_results(model):
    prompts = [model.codec.seqrec_prompt(u % 6, list(range(u % 7))) for u in range(9)]
    alone = torch.cat([beam_search(model, [p], model.trie, 0, beam=20, k=10)[0] for p in prompts])
    batched, _ = beam_search_prompts(model, prompts, model.trie, 0, beam=20, k=10, batch=4)
    assert torch.equal(alone, batched)


def test_user_tower_beam(model):
    prompt = model.codec.render("Item {item} was bought by: ", item=2)
    ent, _ = beam_search(model, [prompt], model.user_trie, model.user_group0, beam=6, k=6)
    assert sorted(ent[0].tolist()) == list(range(6))


def test_common_prefix_length():
    from ttds.models.beam import common_prefix_length

    a = np.array([1, 2, 3, 4, 5])
    assert common_prefix_length([a, np.array([1, 2, 3, 9])]) == 3
    assert common_prefix_length([a, a.copy()]) == 4  # each prompt keeps at least its last token
    assert common_prefix_length([a, np.array([7, 2, 3])]) == 0
    assert common_prefix_length([a]) == 4


def test_shared_prefix_gives_the_same_results(model):
    from ttds.models.beam import shared_prefix

    # prompts of different lengths sharing the instruction; one user without an ID (a shorter rest)
    prompts = [model.codec.seqrec_prompt(u, list(range(n))) for u, n in [(0, 5), (3, 1), (5, 0), (None, 3)]]
    prefix = shared_prefix(model, prompts)
    assert prefix is not None and prefix[0] >= 2
    full, s_full = beam_search(model, prompts, model.trie, 0, beam=20, k=10)
    shared, s_shared = beam_search(model, prompts, model.trie, 0, beam=20, k=10, prefix=prefix)
    assert torch.equal(full, shared)
    assert torch.allclose(s_full, s_shared, atol=1e-4)
    # and both equal exhaustive scoring when the beam covers the catalogue
    ent, score = beam_search(model, prompts, model.trie, 0, beam=64, k=10, prefix=prefix)
    for i, p in enumerate(prompts):
        top = exhaustive_scores(model, p, model.item_index.codes).topk(10)
        assert ent[i].tolist() == top.indices.tolist()
        assert torch.allclose(score[i], top.values, atol=1e-4)


def test_reserved_cache_refuses_overflow():
    from ttds.models.beam import _ReservedLayer

    layer = _ReservedLayer(capacity=3)
    k = torch.randn(2, 1, 2, 4)
    keys, _ = layer.update(k, k)
    assert torch.equal(keys, k)
    keys, _ = layer.update(k[:, :, :1], k[:, :, :1])
    assert keys.shape[2] == 3 and torch.equal(keys[:, :, 2:], k[:, :, :1])
    with pytest.raises(RuntimeError, match="capacity"):
        layer.update(k, k)


def test_last_level_pruning_is_exact_and_skips_beams(model):
    prompts = [model.codec.seqrec_prompt(u % 6, list(range(u % 7))) for u in range(6)]
    fed = []
    hidden = model.hidden

    def counting(ids, *a, **kw):
        fed.append(ids.numel())
        return hidden(ids, *a, **kw)

    model.hidden = counting
    try:
        full, s_full = beam_search(model, prompts, model.trie, 0, beam=20, k=5, prune_last=False)
        n_full, fed[:] = sum(fed), []
        pruned, s_pruned = beam_search(model, prompts, model.trie, 0, beam=20, k=5)
        n_pruned = sum(fed)
    finally:
        del model.hidden
    assert torch.equal(full, pruned) and torch.allclose(s_full, s_pruned, atol=1e-5)
    assert n_pruned < n_full  # peaked scores: beams below the 5th best child are not fed
    if model.item_index.short_ids:  # a beam whose short ID ended at depth L-1 is never fed to the last level
        fed[:] = []
        model.hidden = counting
        try:
            beam_search(model, prompts, model.trie, 0, beam=16, k=16, prune_last=False)
        finally:
            del model.hidden
        assert fed[-1] < len(prompts) * 16


def test_excluded_items_are_searched_around(model):
    """`exclude` masks every prefix that leads only to excluded items: exact with a beam >= catalogue (the top k
    of exhaustive scoring over the other items) and, with a small beam, still k valid unseen distinct items,
    even when the excluded items would fill the whole unconstrained top k."""
    prompts = [model.codec.seqrec_prompt(0, [1, 2, 3]), model.codec.seqrec_prompt(3, [5]), model.codec.seqrec_prompt(5, [])]
    n = model.item_index.n
    free, _ = beam_search(model, prompts, model.trie, 0, beam=64, k=n)
    exclude = [free[0, :8].tolist(), [], list(range(0, n, 2))]  # row 0: its own top 8 items
    ent, score = beam_search(model, prompts, model.trie, 0, beam=64, k=10, exclude=exclude)
    for i, p in enumerate(prompts):
        ref = exhaustive_scores(model, p, model.item_index.codes)
        ref[exclude[i]] = float("-inf")
        top = ref.topk(10)
        assert ent[i].tolist() == top.indices.tolist()
        assert torch.allclose(score[i], top.values, atol=1e-4)
    ent, _ = beam_search(model, prompts, model.trie, 0, beam=4, k=4, exclude=exclude)
    for row, ex in zip(ent.tolist(), exclude):
        assert all(0 <= e < n for e in row) and len(set(row)) == 4 and not set(row) & set(ex)
    batched, _ = beam_search_prompts(model, prompts, model.trie, 0, beam=4, k=4, batch=2, exclude=exclude)
    assert torch.equal(batched, ent)


def test_hf_generate_adapter_agrees_with_the_engine(model):
    """benchmarks/beam_vs_hf.py compares this engine with transformers' `generate(num_beams=...)`; its adapter
    must keep working across transformers versions (the KV-cache argument was renamed in 5.24)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("beam_vs_hf", Path(__file__).parents[1] / "benchmarks" / "beam_vs_hf.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    adapter = bench.hf_adapter(model)
    # prompts end with their last history item's ID; with short IDs, end on a short and on a long one (the adapter
    # once read the next level off the prompt's last token, so a short ID's level-1 token made it score level 2)
    short = model.item_index.codes[:, -1] < 0
    last = [int(np.flatnonzero(short)[0]), int(np.flatnonzero(~short)[0])] if short.any() else [3, 5]
    prompts = [model.codec.seqrec_prompt(0, [1, 2, last[0]]), model.codec.seqrec_prompt(3, [last[1]]),
               model.codec.seqrec_prompt(5, [])]
    with torch.no_grad():
        ours, _ = beam_search(model, prompts, model.trie, 0, beam=8, k=5)
        for p, row in zip(prompts, ours.tolist()):
            assert bench.hf_recommend(adapter, model, np.asarray(p), 8, 5) == row


def test_bf16_precision_runs_the_backbone_in_bf16_and_keeps_the_ranking(model, monkeypatch):
    """`eval.precision: bf16` (autocast in recommend): the backbone's Linear layers really run in bf16, the items stay
    valid and unique, and the scores stay those of fp32 up to bf16 rounding; `auto` follows `has_fast_bf16`."""
    from ttds import runtime
    from ttds.errors import TTDSError
    from ttds.runtime import resolve_precision

    users, hist = torch.tensor([0, 3, 5]), torch.tensor([[1, 2, 3], [-1, -1, 5], [-1, -1, -1]])
    seen = []
    lin = next(m for m in model.backbone.body.modules() if isinstance(m, torch.nn.Linear))
    hook = lin.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    try:
        ref, ref_s = model.recommend(users, hist, k=10, return_scores=True)
        assert set(seen) == {torch.float32}
        seen.clear()
        model.precision = "bf16"
        got, got_s = model.recommend(users, hist, k=10, return_scores=True)
        assert set(seen) == {torch.bfloat16}
    finally:
        model.precision = "fp32"
        hook.remove()
    n = model.item_index.n
    for row in got.tolist():
        assert all(0 <= e < n for e in row) and len(set(row)) == 10
    assert got_s.dtype == torch.float32 and torch.allclose(got_s[:, 0], ref_s[:, 0], atol=0.1)
    assert (got[:, 0] == ref[:, 0]).all()
    for fast, want in [(True, "bf16"), (False, "fp32")]:
        monkeypatch.setattr(runtime, "has_fast_bf16", lambda device, fast=fast: fast)
        assert resolve_precision("auto", "cpu", "eval.precision") == want
    assert resolve_precision("fp32", "cpu", "eval.precision") == "fp32"
    with pytest.raises(TTDSError, match=r"eval\.precision='fp16': expected one of fp32, bf16, auto"):
        resolve_precision("fp16", "cpu", "eval.precision")


def test_inference_region_casts_the_weights_once_and_keeps_the_results(model):
    """`GenerativeRecommender.inference()` (held by evaluate(), pre-compute and the serving worker thread): recommend()
    calls inside it return exactly the lists and scores of calls outside, and cast each weight to bf16 once for the
    region instead of once per call, frozen weights (LoRA's base) included, whose requires_grad comes back after."""
    users, hist = torch.tensor([0, 3, 5]), torch.tensor([[1, 2, 3], [-1, -1, 5], [-1, -1, -1]])
    body = list(model.backbone.body.parameters())
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.backbone.body.modules())

    def copies() -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model.recommend(users, hist, k=10)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")

    model.precision = "bf16"
    try:
        ref, ref_s = model.recommend(users, hist, k=10, return_scores=True)
        for p in body:  # frozen, as under LoRA
            p.requires_grad_(False)
        outside = copies()
        with model.inference():
            model.recommend(users, hist, k=10)  # casts the weights
            got, got_s = model.recommend(users, hist, k=10, return_scores=True)
            inside = copies()
        assert not any(p.requires_grad for p in body)
    finally:
        model.precision = "fp32"
        for p in body:
            p.requires_grad_(True)
    assert torch.equal(got, ref) and torch.equal(got_s, ref_s)
    assert n_linear > 0 and outside - inside >= n_linear, (outside, inside, n_linear)
    with model.inference():  # fp32: a no-op region
        assert not torch.is_autocast_enabled("cpu")
