"""User IDs from item profiles (`ttds.index.profiles`) and `tasks.user_profile: earlier`: a training example's
user ID is coded from the items before its first target, never from the targets."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from _generative_fixtures import tiny_backbone_dir
from ttds.backbone import Backbone, BackboneConfig
from ttds.config import load_config
from ttds.data.readers import load_dataset
from ttds.errors import TTDSError
from ttds.index.build import index_from_codes
from ttds.index.lsh import LSHIndexer
from ttds.index.profiles import ProfileIDs
from ttds.models.generative import GenerativeRecommender
from ttds.tasks.builders import TaskConfig, TaskData, build_epoch, window_bounds

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = "builtin:users=40,items=30,seed=2"


@pytest.fixture(scope="module")
def bb_dir(tmp_path_factory):
    torch.manual_seed(1234)
    return tiny_backbone_dir(tmp_path_factory.mktemp("bb"), "bert", 48)


def _user_tower(n_items=30, n_users=200, seed=0):
    """Item vectors, users' profiles (random item sets), an LSH user quantiser fitted on their mean vectors and the
    user index with its disambiguation level (2 levels of 4 codes: many users share base codes)."""
    g = torch.Generator().manual_seed(seed)
    item_x = torch.randn(n_items, 8, generator=g)
    rng = np.random.default_rng(seed)
    profiles = [sorted(rng.choice(n_items, rng.integers(1, 6), replace=False).tolist()) for _ in range(n_users)]
    users_x = torch.stack([item_x[p].mean(0) for p in profiles])
    q = LSHIndexer(8, levels=2, codebook_size=4, seed=seed).fit(users_x)
    index = index_from_codes(q.encode(users_x).numpy(), q.level_sizes, "user", "ttds")
    return item_x, profiles, q, index


def test_profile_ids_keep_the_owners_id_and_give_new_profiles_a_free_disambiguation_code():
    item_x, profiles, q, index = _user_tower()
    pid = ProfileIDs(index, q, item_x)
    assert index.n_levels == 3 and len(q.level_sizes) == 2
    # a user's own profile: their stored ID, the disambiguation code included
    np.testing.assert_array_equal(pid.codes(profiles, list(range(len(profiles)))), index.codes)
    # without an owner (or another owner) the ID has the same base codes and a code no indexed user holds under them
    new = pid.codes(profiles[:50])
    np.testing.assert_array_equal(new[:, :2], index.codes[:50, :2])
    held = {tuple(r) for r in index.codes.tolist()}
    for row in new.tolist():
        same = [r for r in held if r[:2] == tuple(row[:2])]
        assert tuple(row) not in held or row[2] == 0 and len(same) >= index.level_sizes[2], row  # level full: code 0
        assert row[2] < index.level_sizes[2]
    # only the newest 20 items count (as `profile_items`)
    long = list(range(30)) * 2
    np.testing.assert_array_equal(pid.codes([long]), pid.codes([long[-20:]]))
    with pytest.raises(ValueError):
        pid.codes([[]])


def test_earlier_examples_code_the_user_id_from_items_before_the_first_target(bb_dir):
    from test_generative import random_index

    ds = load_dataset("builtin:users=30,items=40,seed=3")
    bb = Backbone.load(BackboneConfig(name_or_path=str(bb_dir), causal=True))
    model = GenerativeRecommender(bb, random_index(ds.n_items, 2, 8, "item", 0), random_index(ds.n_users, 2, 8, "user", 1))
    train = [s[:-2] for s in ds.sequences]
    calls = []

    def record(profiles, owners):
        calls.extend((int(u), [int(i) for i in p]) for p, u in zip(profiles, owners))
        return model.codec.user_tokens[np.asarray(owners)]  # any user-ID tokens: the test reads the recorded profiles

    H = 4
    data = TaskData(ds, train, model.codec, H, profile_tokens=record)
    ex = build_epoch(data, TaskConfig(user_profile="earlier"), np.random.default_rng(0))
    expect = [(u, a, b) for u, s in enumerate(train) for a, b in window_bounds(len(s), H + 1)]
    assert len(ex) == len(expect)
    item_of = {tuple(r): i for i, r in enumerate(model.codec.item_tokens.tolist())}  # short IDs end with -1
    L, V, ug = model.item_index.n_levels, model.n_words, model.n_words + model.offsets[model.user_group0]
    first_level = lambda tok: (tok >= V) & (tok - V < model.offsets[1])  # an item ID starts here
    calls = iter(calls)
    cuts = []
    for e, (u, a, b) in zip(ex, expect):
        items_part = e.tokens[(e.tokens >= V) & (e.tokens < ug)]
        segs = np.split(items_part, np.flatnonzero(first_level(items_part))[1:])
        items = [item_of[tuple(s.tolist() + [-1] * (L - len(s)))] for s in segs]
        assert items == train[u][a:b].tolist()  # the window, in order
        n_targets, n_tok = int(first_level(e.tokens[e.target]).sum()), int(e.target.sum())
        c = b - n_targets  # the cut: the first target's position in the user's sequence
        assert a <= c < b and e.target[-n_tok:].all() and not e.target[:-n_tok].any()
        if (e.tokens >= ug).any():  # a user ID: coded from exactly the user's items before the cut
            owner, profile = next(calls)
            assert owner == u and c > 0 and profile == train[u][:c].tolist()
        else:  # no ID only when nothing comes before the first target
            assert c == 0
        cuts.append((c - a, b - a))
    assert next(calls, None) is None
    assert any(c == 0 for c, _ in cuts) and any(c == n - 1 for c, n in cuts if n > 2)  # both ends drawn
    # the default: every example has the user's one ID and all window items are targets
    ex = build_epoch(TaskData(ds, train, model.codec, H), TaskConfig(), np.random.default_rng(0))
    assert all((e.tokens >= ug).any() and int(first_level(e.tokens[e.target]).sum()) == b - a for e, (u, a, b) in zip(ex, expect))
    with pytest.raises(TTDSError, match="tasks.user_profile"):
        TaskConfig(user_profile="future")
    with pytest.raises(TTDSError, match="no user tower"):
        build_epoch(TaskData(ds, train, model.codec, H), TaskConfig(user_profile="earlier"), np.random.default_rng(0))


def _cfg(bb_dir, model, extra=()):
    over = [f"backbone.name_or_path={bb_dir}", "index.options.levels=2", "index.options.codebook_size=8",
            "index.options.kind=rqvae", "index.options.rqvae.epochs=5", "index.options.rqvae.code_dim=16",
            "index.options.rqvae.hidden=[32]", "index.options.cache_embeddings=false", "index.options.max_text_tokens=24",
            "index.options.user_vectors=items", "tasks.user_profile=earlier", "tasks.item2index=0", "tasks.index2item=0",
            "train.batch_size=16", "train.warmup_steps=1", "train.valid_users=10", "train.max_steps=2",
            "dynamic.warmup_steps=0", "dynamic.reassign_steps=1", "eval.template_mean_users=-1", "eval.final_valid=false",
            "eval.beam=5", "threads=1", *extra]
    cfg = load_config(model=model, overrides=over)
    cfg["name"] = model
    return cfg


def test_earlier_profiles_train_end_to_end_static_and_dynamic(bb_dir, tmp_path):
    from ttds.train import dynamic, generative

    ds = load_dataset(SMALL)
    assert generative.train(_cfg(bb_dir, "ttss"), ds, tmp_path / "ttss")["steps"] == 2
    m = dynamic.train(_cfg(bb_dir, "ttds"), ds, tmp_path / "ttds")  # re-assigned after step 1: IDs re-coded
    assert m["steps"] == 2 and len(m["reassignments"]) == 1
    # the same config and seed: the same run, bit for bit (tokenizers, codes, LM weights, metrics)
    again = dynamic.train(_cfg(bb_dir, "ttds"), ds, tmp_path / "ttds2")
    def scores(metrics):  # the test metrics without their timings
        return {k: v for k, v in metrics["test"].items() if not k.endswith("seconds")}

    assert scores(again) == scores(m) and len(scores(m)) >= 5
    assert again["reassignments"][0]["item"] == m["reassignments"][0]["item"]
    for name in ("index.item.json", "index.user.json"):
        assert (tmp_path / "ttds" / name).read_text() == (tmp_path / "ttds2" / name).read_text()
    a, b = load_file(tmp_path / "ttds" / "model.safetensors"), load_file(tmp_path / "ttds2" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # users coded from their text cannot be coded from item profiles: one clear line
    with pytest.raises(TTDSError, match="user_vectors=items"):
        generative.train(_cfg(bb_dir, "ttss", ["index.options.user_vectors=text"]), ds, tmp_path / "text")
    with pytest.raises(TTDSError, match="RQ-VAE or LSH"):
        dynamic.train(_cfg(bb_dir, "ttds", ["index.user_source=random"]), ds, tmp_path / "random")
    assert not (tmp_path / "text").exists() and not (tmp_path / "random").exists()  # refused before any index is built


def test_user_profile_auto_is_earlier_exactly_for_towers_that_code_item_profiles():
    from ttds.train.loop import resolve_user_profile

    ds = load_dataset(SMALL)  # the built-in data has user text (reviews)
    assert ds.has_user_text()
    cases = [("items", "rqvae", "earlier"), ("items", "lsh", "earlier"), ("items", "random", "all"), ("items", None, "all"),
             ("text", "rqvae", "all"), ("auto", "rqvae", "all")]  # auto: text here, since the users have text
    for vectors, user_source, expect in cases:
        cfg = {"tasks": {"user_profile": "auto"}, "index": {"options": {"user_vectors": vectors}}}
        assert resolve_user_profile(cfg, ds, user_source) == expect, (vectors, user_source)
        assert cfg["tasks"]["user_profile"] == expect  # written back: the run's config.yaml records the decision
    no_text = load_dataset(SMALL)
    no_text.user_text = None
    assert not no_text.has_user_text()
    cfg = {"tasks": {"user_profile": "auto"}, "index": {"options": {"user_vectors": "auto"}}}
    assert resolve_user_profile(cfg, no_text, "rqvae") == "earlier"  # Games, Scientific: users made from items
    cfg = {"tasks": {"user_profile": "all"}, "index": {"options": {"user_vectors": "items"}}}
    assert resolve_user_profile(cfg, ds, "rqvae") == "all"  # an explicit choice is kept
    cfg = {"tasks": {"user_profile": "earlier"}, "index": {"options": {"user_vectors": "items"}}}
    assert resolve_user_profile(cfg, ds, "lsh") == "earlier"
    assert resolve_user_profile(cfg, ds, None) == "earlier"  # no user tower: no user IDs, nothing to refuse
    for vectors, user_source in (("items", "random"), ("text", "rqvae")):  # where `auto` is `all`, `earlier` fails
        cfg = {"tasks": {"user_profile": "earlier"}, "index": {"options": {"user_vectors": vectors}}}
        with pytest.raises(TTDSError, match="tasks.user_profile=earlier: needs"):
            resolve_user_profile(cfg, ds, user_source)
    with pytest.raises(TTDSError, match="tasks.user_profile='later'"):
        resolve_user_profile({"tasks": {"user_profile": "later"}}, ds, "rqvae")
    train = [s[:-2] for s in ds.sequences]
    with pytest.raises(TTDSError, match="resolve"):  # never silently `all`
        build_epoch(TaskData(ds, train, None, 4), TaskConfig(user_profile="auto"), np.random.default_rng(0))
