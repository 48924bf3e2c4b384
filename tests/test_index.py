"""Semantic index: RQ-VAE training, collision handling, LSH/random, files, semantic check, CLI."""
import numpy as np
import pytest
import torch

from ttds.errors import TTDSError
from ttds.index import collisions
from ttds.index.base import SemanticIndex
from ttds.index.build import (IndexConfig, build, build_index, items_to_users, load_index, save_build, tower_texts,
                              tower_vectors, user_vector_source)
from ttds.index.quality import entity_texts, semantic_check
from ttds.index.rqvae import RQVAE, RQVAEConfig

SMALL = {"epochs": 30, "batch_size": 64, "code_dim": 32, "hidden": [128], "kmeans_iters": 10}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import os

    from ttds.backbone import Backbone
    from ttds.data.readers import load_dataset

    os.environ["TTDS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    ds = load_dataset("builtin:users=200,items=120")
    return ds, Backbone.load("minilm")


def cfg(**kw):
    base = dict(levels=3, codebook_size=16, rqvae=SMALL)
    base.update(kw)
    return IndexConfig(**base)


def test_rqvae_loss_decreases_and_exposes_levels(env):
    ds, bb = env
    from ttds.index.build import embed

    x, _, _ = embed(bb, tower_texts(ds, "item", IndexConfig(), bb.tokenizer))
    m = RQVAE(x.shape[1], RQVAEConfig(levels=3, codebook_size=16, **(SMALL | {"epochs": 100})))
    m.fit(x, progress=False)
    h = m.history
    # the commitment term first grows with the latent scale; reconstruction falls from the start
    assert h["epochs"] == 100 and h["recon"][-1] < 0.7 * h["recon"][0] and h["loss"][-1] < 0.95 * h["loss"][0]
    codes = m.encode(x)
    assert codes.shape == (ds.n_items, 3) and int(codes.max()) < 16
    q = m.quantize(m.embed(x[:5]))  # what the dynamic model uses: per-level residuals and code vectors
    assert len(q.residuals) == len(q.vectors) == 3 and q.vectors[0].shape == (5, 32)
    assert torch.equal(q.codes, codes[:5])
    assert torch.allclose(q.vectors[1], m.codebooks[1][codes[:5, 1]])
    assert torch.allclose(q.residuals[1], q.residuals[0] - q.vectors[0], atol=1e-5)


def test_rqvae_step_budget_is_whole_epochs_and_reproducible():
    """`max_steps` (the default budget, not wall-clock time) stops after the epoch that reaches it: 100 rows at
    batch 32 are 4 steps per epoch, so 10 steps -> 3 epochs; two fits give the same codes."""
    x = torch.randn(100, 24, generator=torch.Generator().manual_seed(0))
    cfg = RQVAEConfig(levels=2, codebook_size=8, code_dim=8, hidden=[16], batch_size=32, epochs=50, max_steps=10,
                      kmeans_iters=5)
    assert RQVAEConfig().max_minutes == 0 and RQVAEConfig().max_steps > 0
    fits = []
    for _ in range(2):
        m = RQVAE(24, cfg)
        m.fit(x, progress=False)
        fits.append(m.encode(x))
    assert m.history["epochs"] == 3 and len(m.history["loss"]) == 3
    assert torch.equal(fits[0], fits[1])
    m = RQVAE(24, RQVAEConfig(**{**cfg.__dict__, "max_steps": 0, "epochs": 5}))
    m.fit(x, progress=False)
    assert m.history["epochs"] == 5


def test_rqvae_fit_is_bit_reproducible_on_two_threads():
    """The fit depends only on (x, cfg): not on the global RNG, nor on how 2 threads interleave. Batches of 512 x 128
    are past torch's parallel grain, where the codebook gradient (index_put with accumulate) adds in thread order
    unless `setup_torch` turns on deterministic algorithms (without it the codes differed from run to run)."""
    from ttds.runtime import setup_torch

    x = torch.randn(1024, 64, generator=torch.Generator().manual_seed(1))
    cfg = RQVAEConfig(levels=2, codebook_size=16, code_dim=128, hidden=[64], batch_size=512, epochs=8, max_steps=0,
                      kmeans_iters=3)
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    try:
        setup_torch({"threads": 2})
        assert torch.are_deterministic_algorithms_enabled()  # the default
        fits = []
        for noise in range(2):
            torch.randn(noise + 1)  # a different global RNG state before each fit
            m = RQVAE(64, cfg).fit(x, progress=False)
            fits.append((m.encode(x), [p.detach().clone() for p in m.parameters()]))
        assert torch.equal(fits[0][0], fits[1][0])
        assert all(torch.equal(a, b) for a, b in zip(fits[0][1], fits[1][1]))
        with pytest.raises(TTDSError, match="config deterministic="):
            setup_torch({"deterministic": "yes"})
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def test_rqvae_leaves_the_callers_rng_alone():
    """Building and fitting a tokenizer (its own seed) must not reset the global RNG: what a run initialises
    afterwards (ID embeddings ...) follows the run's seed, so runs with different seeds start differently."""
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))
    cfg = RQVAEConfig(levels=2, codebook_size=8, code_dim=16, hidden=[32], epochs=2, max_steps=0, kmeans_iters=2)
    after = []
    for fit in (False, True):
        torch.manual_seed(7)
        if fit:
            RQVAE(32, cfg).fit(x, progress=False)
        after.append(torch.rand(4))
    assert torch.equal(after[0], after[1])


@pytest.mark.parametrize("strategy", ["ttds", "lcrec"])
def test_collision_handling_makes_ids_unique(env, strategy):
    ds, bb = env
    b = build(ds, "item", bb, cfg(levels=2, codebook_size=8, collisions=strategy), progress=False)
    assert b.stats["collision_rate_before"] > 0.2  # 64 possible IDs for 120 items
    assert b.index.is_unique() and b.index.collision_rate() == 0.0 and b.stats["collision_rate_after"] == 0.0
    assert b.index.prefixes == ["a", "b", "p"] and b.index.n == ds.n_items
    if strategy == "ttds":  # the first levels are the raw codes, the extra one the order in the set
        assert (b.index.codes[:, :2] == b.raw_codes).all()
    else:  # Sinkhorn moved some colliding items to free last-level codes before the extra level
        assert b.stats["collision_rate_sinkhorn"] < b.stats["collision_rate_before"]
        assert (b.index.codes[:, 0] == b.raw_codes[:, 0]).all() and (b.index.codes[:, 1] != b.raw_codes[:, 1]).any()


def test_disambiguate_and_sinkhorn(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 3, (300, 2))
    d = collisions.disambiguate(raw, only_colliding=False)
    assert collisions.collision_rate(d) == 0 and (d[:, :2] == raw).all()
    _, counts = np.unique(raw, axis=0, return_counts=True)
    assert d[:, 2].max() == counts.max() - 1
    # the paper's rule (the default): only colliding IDs get the extra token; a lone ID ends one level early
    raw = np.array([[0, 1], [0, 1], [2, 2], [1, 0]])
    d = collisions.disambiguate(raw)
    assert d[:, 2].tolist() == [0, 1, -1, -1]
    idx = SemanticIndex(d, [3, 3, 2], ["a", "b", "p"])
    assert idx.is_unique() and idx.to_json()["2"] == ["<a_2>", "<b_2>"] and idx.to_json()["0"] == ["<a_0>", "<b_1>", "<p_0>"]
    idx.save(tmp_path / "i.json")
    back = SemanticIndex.load(tmp_path / "i.json")
    assert (back.codes == d).all() and back.level_sizes == [3, 3, 2]
    alone = SemanticIndex(np.array([[0, 1, -1], [2, 2, -1]]), [3, 3, 4], ["a", "b", "p"])  # no collision at all
    alone.save(tmp_path / "a.json")
    back = SemanticIndex.load(tmp_path / "a.json")
    assert (back.codes == alone.codes).all() and back.level_sizes == [3, 3, 4] and back.prefixes == ["a", "b", "p"]
    with pytest.raises(TTDSError, match="1 levels, expected 2"):  # only the disambiguation token may be missing
        SemanticIndex.from_tokens({"0": ["<a_0>", "<b_1>"], "1": ["<a_2>"]})
    # a new item: base codes of its own -> a short ID; shared with a short ID -> both get the token
    codes, sizes = collisions.assign_new_id(idx, [2, 0])
    assert codes[-1].tolist() == [2, 0, -1] and (codes[:-1] == d).all()
    codes, sizes = collisions.assign_new_id(idx, [1, 0])
    assert codes[3].tolist() == [1, 0, 0] and codes[-1].tolist() == [1, 0, 1] and sizes == [3, 3, 2]
    codes, _ = collisions.assign_new_id(idx, [0, 1])
    assert codes[-1].tolist() == [0, 1, 2]
    # 8 entities on one code; 8 last-level codes free: Sinkhorn spreads them
    raw = np.zeros((8, 2), dtype=np.int64)
    dist = torch.rand(8, 8)
    moved = collisions.sinkhorn_reassign(raw, dist)
    assert collisions.colliding(moved).sum() < 8 and (moved[:, 0] == 0).all()
    plan = collisions.sinkhorn(torch.rand(40, 8).double(), epsilon=0.05, iters=200)
    assert torch.allclose(plan.sum(0), torch.full((8,), 1 / 8, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("kind", ["rqvae", "lsh", "random"])
def test_index_kinds_share_interface_and_round_trip(env, kind, tmp_path):
    ds, bb = env
    b = build(ds, "item", bb, cfg(kind=kind), progress=False)
    assert isinstance(b.index, SemanticIndex) and b.index.n == ds.n_items and b.index.is_unique()
    assert b.tokenizer.level_sizes == [16, 16, 16] and b.raw_codes.shape == (ds.n_items, 3)
    assert b.index.id_string(0).startswith("<a_")
    save_build(b, tmp_path / kind)
    idx, tok = load_index(tmp_path / kind)
    assert (idx.codes == b.index.codes).all() and idx.level_sizes == b.index.level_sizes and idx.prefixes == b.index.prefixes
    x = torch.randn(7, 384)
    assert torch.equal(tok.encode(x), b.tokenizer.encode(x))  # same tokenizer weights after reload


def test_prefix_codes_are_semantic(env):
    ds, bb = env
    texts, cats = entity_texts(ds, "item")
    sem = {k: semantic_check(build(ds, "item", bb, cfg(kind=k), progress=False).index, texts, cats, level=1)
           for k in ("rqvae", "random")}
    assert sem["rqvae"]["jaccard_ratio"] > 2.0 and sem["rqvae"]["category_ratio"] > 2.0
    assert sem["rqvae"]["jaccard_ratio"] > 2 * sem["random"]["jaccard_ratio"]


def test_user_tower_and_recipe_entry_point(env, tmp_path):
    ds, bb = env
    run_cfg = {"index": {"options": {"kind": "lsh", "levels": 2, "codebook_size": 8, "max_text_tokens": 32}}}
    users = build_index(run_cfg, ds, bb, "user", tmp_path)
    assert users.tower == "user" and users.n == ds.n_users and users.prefixes == ["ua", "ub", "up"]
    assert users.is_unique() and set(users.vocabulary()).isdisjoint(build(ds, "item", bb, cfg(kind="lsh")).index.vocabulary())
    idx, tok = load_index(tmp_path / "tokenizer.user")
    assert (idx.codes == users.codes).all() and tok is not None
    with pytest.raises(TTDSError, match="index.options.levles"):
        build_index({"index": {"options": {"levles": 3}}}, ds, bb, "item")
    with pytest.raises(TTDSError, match="index.kind"):
        IndexConfig(kind="kmeans")


def test_user_vectors_from_items(env):
    """Without user text (`auto`), a user's vector is the mean of the item vectors of the user's training items
    (never the valid/test items), and no user text is encoded; with user text, `auto` encodes it."""
    from dataclasses import replace

    ds, bb = env
    plain = replace(ds, user_text=None)
    assert user_vector_source(ds, cfg()) == "text" and user_vector_source(plain, cfg()) == "items"
    assert user_vector_source(ds, cfg(user_vectors="items")) == "items"
    w = items_to_users(plain).to_dense()
    for u in (0, 7, 199):
        seq = plain.sequences[u]
        train_items = [int(i) for i in seq[:-2][-20:]]
        expect = torch.zeros(plain.n_items)
        for i in train_items:
            expect[i] += 1 / len(train_items)
        assert torch.allclose(w[u], expect)
    item_x, _, _ = tower_vectors(plain, "item", cfg(), bb)
    calls = []
    encode = bb.encode
    bb.encode = lambda texts, **kw: calls.append(len(texts)) or encode(texts, **kw)
    try:
        user_x, _, _ = tower_vectors(plain, "user", cfg(cache_embeddings=False), bb)
    finally:
        bb.encode = encode
    assert calls == [plain.n_items]  # the items' texts only (cache off): no user text is encoded
    assert torch.allclose(user_x, w @ item_x, atol=1e-6)
    b = build(plain, "user", bb, cfg(kind="lsh"))
    assert b.stats["user_vectors"] == "items" and b.index.n == plain.n_users and b.index.is_unique()
    with pytest.raises(TTDSError, match="index.user_vectors"):
        IndexConfig(user_vectors="profile")


def test_given_index(env):
    ds, bb = env
    b = build(ds, "item", bb, cfg(kind="random"))
    ds.index = {i: toks for i, toks in enumerate(b.index.to_json().values())}
    try:
        g = build(ds, "item", None, cfg(kind="given"))
        assert (g.index.codes == b.index.codes).all() and g.tokenizer is None
        with pytest.raises(TTDSError, match="item index only"):
            build(ds, "user", None, cfg(kind="given"))
    finally:
        ds.index = None


def test_cli_build_and_stats(run_cli, tmp_path):
    out = tmp_path / "ix"
    code, stdout, err = run_cli("index", "build", "--data", "builtin:users=200,items=120", "--kind", "lsh",
                                "--out", out, "--set", "index.options.levels=2", "--set", "index.options.codebook_size=16")
    assert code == 0, err
    assert "collision rate" in stdout and "ratio" in stdout
    code, stdout, _ = run_cli("index", "stats", out, "--data", "builtin:users=200,items=120")
    assert code == 0 and "perplexity" in stdout and "title-word Jaccard" in stdout
    code, stdout, _ = run_cli("index", "stats", out / "index.json")
    assert code == 0 and "after 0.0000" in stdout
    code, _, err = run_cli("index", "stats", tmp_path / "missing")
    assert code == 2 and "no such index" in err
    code, _, err = run_cli("index", "build", "--data", "builtin:users=200,items=120", "--kind", "bogus", "--out", out)
    assert code == 2 and "index.kind" in err
