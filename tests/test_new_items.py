"""Serving the generative models: new items (POST /v1/items), beam scores, anonymous users.

A real TTSS run (tiny random BERT backbone, RQ-VAE item and user towers, 2 levels x 8 codes + the
disambiguation level) trained for a few steps, served through `load_engine` and the FastAPI app.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).parent))
from _generative_fixtures import tiny_backbone_dir  # noqa: E402

from ttds.serve.app import create_app  # noqa: E402
from ttds.serve.engine import load_engine  # noqa: E402

DATA = "builtin:users=60,items=50,seed=3"
SETS = ["index.options.levels=2", "index.options.codebook_size=8", "index.options.rqvae.epochs=10",
        "index.options.rqvae.code_dim=16", "index.options.rqvae.hidden=[32]", "index.options.cache_embeddings=false",
        "index.options.max_text_tokens=24", "train.batch_size=8", "train.valid_users=10", "eval.template_mean_users=-1",
        "eval.final_valid=false", "eval.beam=10", "threads=1"]


@pytest.fixture(scope="module")
def bb_dir(tmp_path_factory):
    torch.manual_seed(1234)
    return tiny_backbone_dir(tmp_path_factory.mktemp("bb"), "bert", 32)


@pytest.fixture(scope="module")
def run_dir(bb_dir, tmp_path_factory, one_thread):
    from ttds.train.commands import train_model

    _, out = train_model("ttss", DATA, tmp_path_factory.mktemp("run") / "ttss",
                         overrides=[f"backbone.name_or_path={bb_dir}", "train.max_steps=3", *SETS])
    return out


@pytest.fixture
def engine(run_dir, one_thread):
    return load_engine(run_dir, DATA, threads=1)


def _boost(model, tokens: list[str]) -> None:
    """Make the ID head prefer these ID tokens whatever the prompt (so beam search must find them)."""
    with torch.no_grad():
        for level, tok in enumerate(tokens):
            code = int(tok.split("_")[1].rstrip(">"))
            model.id_bias[model.offsets[level] + code] += 50.0


def test_static_item_coder_reproduces_the_index(engine, run_dir):
    """The new-item path (pretrained encoder + saved RQ-VAE) gives every existing item its raw codes."""
    from ttds.index.build import load_raw_codes

    coder = engine.model.item_coder
    assert coder.rule == "quantiser" and engine.supports_new_items
    # a static index was built by the pretrained backbone: the coder encodes with a copy of it, not the fine-tuned one
    tuned, pre = engine.model.backbone.hf_model, coder.encoder.hf_model
    assert coder.encoder is not engine.model.backbone
    assert any(not torch.equal(a, b) for a, b in zip(tuned.base_model.parameters(), pre.base_model.parameters()))
    raw = load_raw_codes(run_dir / "tokenizer.item")
    got = np.stack([coder.base_codes(coder.item_vector(engine.item_fields(i)), engine.model.item_index) for i in range(engine.n_items)])
    assert (got == raw).all(axis=1).mean() == 1.0


def test_new_item_api_trie_and_recommendation(engine):
    model, n = engine.model, engine.n_items
    client = TestClient(create_app(engine), raise_server_exceptions=False)
    r = client.post("/v1/items", json={"title": "Brand-new digital microscope", "brand": "Acme", "categories": "Lab"})
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["item_id"] == n and engine.n_items == model.n_items == n + 1 and model.item_index.is_unique()
    # the paper's rule: the disambiguation token only when another item has the same codes
    shared = (model.item_index.codes[:n, :-1] == model.item_index.codes[n, :-1]).all(1).any()
    assert [t[:3] for t in new["tokens"]] == ["<a_", "<b_", "<p_"][:3 if shared else 2]
    assert client.get(f"/v1/items/{n}").json()["tokens"] == new["tokens"] == model.item_index.tokens(n)
    codes = torch.as_tensor(model.item_index.codes[n:])
    assert int(model.trie.entities(codes)[0]) == n  # the trie holds the new ID
    # the ID head pushed towards its tokens: constrained beam search returns it first, with its log-probability
    _boost(model, new["tokens"])
    r = client.post("/v1/recommendations", json={"history": [1, 2, 3], "k": 5})
    items = r.json()["items"]
    assert r.status_code == 200 and items[0]["item_id"] == n and items[0]["title"] == "Brand-new digital microscope"
    scores = [x["score"] for x in items]
    assert all(s is not None and s <= 0 for s in scores) and scores == sorted(scores, reverse=True)
    # the new item takes part in the prompts of histories that contain it
    assert client.post("/v1/recommendations", json={"history": [n], "k": 3}).status_code == 200


def test_full_disambiguation_level_is_a_clear_409(engine):
    model = engine.model
    client = TestClient(create_app(engine), raise_server_exceptions=False)
    body = {"title": "The same gadget", "description": "posted again and again"}
    cap = model.item_index.level_sizes[-1]
    statuses = [client.post("/v1/items", json=body).status_code for _ in range(cap + 1)]
    assert statuses[-1] == 409 and statuses.count(201) >= 1 and set(statuses) <= {201, 409}
    err = client.post("/v1/items", json=body).json()
    assert "full" in err["error"] and "<p_" in err["error"]
    n = engine.n_items
    assert model.n_items == n == len(model.item_index.codes) == model.trie.n_entities and model.item_index.is_unique()
    assert client.get(f"/v1/items/{n}").status_code == 404


def test_nearest_neighbour_rule_without_saved_tokenizer(run_dir, tmp_path, one_thread):
    """A static run without tokenizer.item/ (a shipped 'given' index): prefix of the nearest item + a free code."""
    d = tmp_path / "given"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("tokenizer.item"))
    eng = load_engine(d, DATA, threads=1)
    assert eng.model.item_coder.rule == "nearest"
    idx = eng.model.item_index
    free = idx.level_sizes[-1] - np.array([(idx.codes[:, :-1] == c[:-1]).all(1).sum() for c in idx.codes])
    i = int(np.flatnonzero(free >= 2)[0])  # an item whose prefix has room for two more (the level size is fixed)
    fields = eng.item_fields(i)
    item, tokens = eng.add_item(dict(fields))
    assert tokens[:-1] == eng.item_tokens(i)[:-1] and tokens[-1] != eng.item_tokens(i)[-1]
    item2, tokens2 = eng.add_item(dict(fields))  # the copy of a copy: the new item itself may be the neighbour
    assert tokens2[:-1] == tokens[:-1] and len({tokens[-1], tokens2[-1], eng.item_tokens(i)[-1]}) == 3


def test_scores_are_id_log_probabilities_and_evaluator_api_kept(engine, monkeypatch):
    from ttds.models.beam import exhaustive_scores

    model = engine.model
    monkeypatch.setattr(model, "precision", "fp32")  # the fp32 reference below (eval.precision auto is bf16 on AMX)
    users, hist = torch.tensor([3]), torch.tensor([[-1, 4, 5, 6]])
    items = model.recommend(users, hist, 5)
    assert isinstance(items, torch.Tensor) and items.shape == (1, 5)  # what ttds.eval.evaluator expects
    items2, scores = model.recommend(users, hist, 5, return_scores=True)
    assert torch.equal(items, items2)
    ref = exhaustive_scores(model, model.prompts(users, hist)[0], model.item_index.codes)
    assert torch.allclose(scores[0], ref[items[0]], atol=1e-4)


def test_anonymous_user_prompts(engine):
    model = engine.model
    codec, hist = model.codec, torch.tensor([[4, 5, 6]])
    user0 = model.n_words + model.offsets[model.user_group0]
    known = model.prompts(torch.tensor([model.user_index.n - 1]), hist)[0]
    anon = model.prompts(torch.tensor([-1]), hist)[0]
    assert (known >= user0).sum() == len(model.user_index.tokens(model.user_index.n - 1))  # a known user: their ID
    assert not (anon >= user0).any()  # PAD: no user ID (it used to index user_tokens[-1], the last user)
    the_user = codec.text("the user")
    assert any((anon[i:i + len(the_user)] == the_user).all() for i in range(len(anon)))
    text = "I write reviews about lab glassware and pipettes"
    with_text = model.prompts(torch.tensor([-1]), hist, user_texts=[text])[0]
    ids = with_text[with_text >= user0]
    coder = model.user_coder
    base = coder.base_codes(coder.vector(text), model.user_index)
    assert len(ids) in (model.user_index.n_levels, model.user_index.n_levels - 1)  # a short ID when its codes are its own
    assert (ids[:len(base)] == model.id_tokens("user", np.asarray(base)[None])[0]).all()
    # through the API: an anonymous request with and without text answers (and differs only by the prompt)
    client = TestClient(create_app(engine), raise_server_exceptions=False)
    for body in ({"history": [4, 5, 6], "k": 5}, {"history": [4, 5, 6], "k": 5, "user_text": text}):
        r = client.post("/v1/recommendations", json=body)
        assert r.status_code == 200 and len(r.json()["items"]) == 5 and r.json()["items"][0]["score"] is not None


def test_ttds_model_adds_items_with_its_own_tower(bb_dir, tmp_path, one_thread):
    from ttds.config import load_config
    from ttds.data.readers import load_dataset
    from ttds.serve.new_items import attach
    from ttds.train import dynamic
    from ttds.train.generative import _backbone

    cfg = load_config(model="ttds", overrides=[f"backbone.name_or_path={bb_dir}", *SETS])
    ds = load_dataset(DATA)
    torch.manual_seed(0)
    model = dynamic.build_model(cfg, ds, _backbone(cfg, "cpu"), tmp_path).eval()
    attach(model, cfg, tmp_path, ds)
    tower, coder = model.towers["item"], model.item_coder
    # X = f(C) was encoded once, before training (dynamic.refresh_text: false): new items are coded with the
    # pretrained backbone, not the fine-tuned one (stood in for by perturbing the served backbone's weights)
    assert coder.encoder is not model.backbone and coder.tokenizer is tower.tokenizer
    with torch.no_grad():
        for p in model.backbone.hf_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.cat([coder.item_vector({f: ds.item_text[f][i] for f in ds.item_text}) for i in range(10)])
    assert torch.allclose(x, tower.x[:10], atol=1e-4)  # the vectors the tower was trained on
    cfg_refresh = load_config(model="ttds", overrides=[f"backbone.name_or_path={bb_dir}", *SETS, "dynamic.refresh_text=true"])
    attach(model, cfg_refresh, tmp_path, ds)  # X followed the fine-tuned backbone: the served backbone codes new items
    assert model.item_coder.encoder is model.backbone
    attach(model, cfg, tmp_path, ds)
    coder = model.item_coder
    n = model.n_items
    item = model.add_item({"title": "A new pipette", "description": "10 ul"})
    assert item == n and len(tower.x) == n + 1 and model.item_codes.shape[0] == n + 1
    assert model.item_index.is_unique() and int(model.trie.entities(torch.as_tensor(model.item_index.codes[n:]))[0]) == n
    assert (model.item_codes[n].numpy() == model.item_index.codes[n]).all()


def test_int8_serving_option(run_dir, one_thread):
    from ttds.errors import TTDSError

    eng = load_engine(run_dir, DATA, threads=1, quantize="int8")
    linears = [m for m in eng.model.backbone.body.modules() if isinstance(m, torch.nn.Linear) or "quantized" in type(m).__module__]
    assert linears and all("quantized" in type(m).__module__ for m in linears)  # every Linear swapped for an int8 one
    qlin = [m for m in linears if type(m).__name__ == "Linear"]
    assert qlin and all(m.weight().qscheme() == torch.per_channel_affine for m in qlin)  # one scale per output channel
    assert eng.model_version.endswith("+int8")
    recs = eng.recommend_histories([[1, 2, 3]], 5)[0]
    assert len(recs) == 5 and all(0 <= i < eng.n_items and s is not None for i, s in recs)
    assert eng.add_item({"title": "still works"})[0] == eng.n_items - 1  # the coder keeps its own fp32 encoder
    with pytest.raises(TTDSError, match="--quantize"):
        load_engine(run_dir, DATA, quantize="fp8")


def test_engine_searches_around_seen_items_in_one_pass(engine):
    """A generative model gets the user's history as `exclude`: one beam search of k, no seen item out, and the
    list is the top k of exhaustive scoring over the unseen items (beam >= catalogue here: exact)."""
    from ttds.models.beam import exhaustive_scores

    model, calls = engine.model, []
    inner = model.recommend

    def spy(*a, **kw):
        calls.append((a[2] if len(a) > 2 else kw.get("k"), kw.get("exclude")))
        return inner(*a, **kw)

    hist = engine.user_history(2)[-4:]
    ref = exhaustive_scores(model, model.prompts(torch.tensor([-1]), torch.tensor([hist]))[0], model.item_index.codes)
    ref[hist] = float("-inf")
    k = min(5, model.n_items - len(hist))
    beam = model.beam
    model.recommend, model.beam = spy, model.n_items
    try:
        got = engine.recommend_histories([hist], k)[0]
    finally:
        del model.recommend
        model.beam = beam
    assert len(calls) == 1 and calls[0][0] == k and [set(e) for e in calls[0][1]] == [set(hist)]
    assert [i for i, _ in got] == ref.topk(k).indices.tolist()


def test_new_item_text_is_encoded_in_full_precision_inside_an_inference_region(engine, monkeypatch):
    """The serving worker holds the model's bf16 inference region for its lifetime; a new item's text vector (and so its
    codes) is still computed in fp32, as the index was, and the new item is recommendable within the region."""
    monkeypatch.setattr(engine.model, "precision", "bf16")
    coder = engine.model.item_coder
    lin = next(m for m in coder.encoder.body.modules() if isinstance(m, torch.nn.Linear))
    seen = []
    hook = lin.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    try:
        with engine.model.inference():
            assert torch.is_autocast_enabled("cpu")
            item, _ = engine.add_item({"title": "A bf16 region item"})
            recs = engine.recommend_histories([[1, 2, 3]], 5)[0]
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.float32}
    assert item == engine.n_items - 1 and len(recs) == 5
