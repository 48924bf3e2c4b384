"""TTDS (recipe `dynamic`): gradients reach the tokenizers only when joint, re-assignment keeps IDs
unique and the trie consistent, each loss term follows its flag, a short joint run learns, resume is exact."""
import json
import re

import numpy as np
import pytest
import torch

from _generative_fixtures import tiny_backbone_dir
from ttds.config import load_config
from ttds.data.readers import load_dataset
from ttds.errors import TTDSError
from ttds.io import load_safetensors
from ttds.tasks import templates
from ttds.tasks.builders import TaskConfig, TaskData, build_epoch
from ttds.train import dynamic
from ttds.train.engine import collate
from ttds.train.loop import resolve_user_profile

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: a second thread only waits on a shared CPU

DATA = "builtin:users=150,items=60,seed=4"
SMALL = "builtin:users=40,items=30,seed=2"  # the resume/static runs


@pytest.fixture(scope="module")
def bb_dir(tmp_path_factory):
    torch.manual_seed(1234)  # the random tiny backbone: the same one every session
    return tiny_backbone_dir(tmp_path_factory.mktemp("bb"), "bert", 48)


@pytest.fixture(scope="module")
def ds():
    return load_dataset(DATA)


def _cfg(bb_dir, model="ttds", extra=()):
    over = [f"backbone.name_or_path={bb_dir}", "index.options.levels=2", "index.options.codebook_size=8",
            "index.options.rqvae.epochs=15", "index.options.rqvae.code_dim=16", "index.options.rqvae.hidden=[32]",
            "index.options.cache_embeddings=false", "index.options.max_text_tokens=24",
            "train.batch_size=16", "train.warmup_steps=2", "train.valid_users=40", "train.lr=0.001", "train.epochs=50",
            "train.patience=50", "dynamic.warmup_steps=2", "eval.template_mean_users=-1", "eval.final_valid=false",
            "eval.beam=10", "threads=1", "tasks.item2index=0", "tasks.index2item=0", *extra]
    cfg = load_config(model=model, overrides=over)
    cfg["name"] = model
    return cfg


def _model(bb_dir, ds, tmp_path, model="ttds", extra=()):
    from ttds.train.generative import _backbone

    cfg = _cfg(bb_dir, model, extra)
    torch.manual_seed(0)
    return dynamic.build_model(cfg, ds, _backbone(cfg, "cpu"), tmp_path), cfg


def _batch(model, ds, cfg):
    from ttds.data.dataset import leave_one_out

    sp = leave_one_out(ds, 20)
    data = TaskData(ds, sp.train, model.codec, 20)
    ex = build_epoch(data, TaskConfig(userpred=0.2), np.random.default_rng(0))
    return collate(ex[:12])


def test_gradients_reach_tokenizers_when_joint_not_when_static(bb_dir, ds, tmp_path):
    model, cfg = _model(bb_dir, ds, tmp_path)
    opt = torch.optim.AdamW(dynamic.param_groups(model, dynamic.GenTrainConfig(), dynamic.DynamicConfig()))
    cb = model.towers["item"].tokenizer.codebooks[0]
    enc = next(model.towers["item"].tokenizer.encoder.parameters())
    # joint: L_LLM reaches the item and user codebooks (tied ID embeddings) and the projection
    dynamic._set_phase(model, opt, True, True)
    model.loss(*_batch(model, ds, cfg)).backward()
    for t in ("item", "user"):
        g = model.towers[t].tokenizer.codebooks[0].grad
        assert g is not None and g.abs().sum() > 0, t
        assert model.towers[t].proj.weight.grad.abs().sum() > 0
    # L_DM-VAE: L_Token trains the encoder, L_ID the backbone
    opt.zero_grad(set_to_none=True)
    ents = {t: torch.arange(10) for t in model.towers}
    loss, parts = model.dm_vae_loss(ents, beta=0.5)
    loss.backward()
    assert enc.grad is not None and enc.grad.abs().sum() > 0 and parts["l_id"] > 0 and parts["l_token"] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.body.encoder.parameters())
    # static (dynamic.enabled=false, late freeze): no gradient reaches any tokenizer parameter; the recommender's
    # side of the towers (codebook projection, L_ID text head) still trains
    opt.zero_grad(set_to_none=True)
    dynamic._set_phase(model, opt, True, False)
    model.loss(*_batch(model, ds, cfg)).backward()
    model.dm_vae_loss(ents, beta=0.5)[0].backward()
    for t in ("item", "user"):
        assert all(p.grad is None for p in model.towers[t].tokenizer.parameters()), t
        assert model.towers[t].proj.weight.grad.abs().sum() > 0 and model.towers[t].text_head.weight.grad.abs().sum() > 0
    # TTSS (generative recipe): the tokenizer is not part of the model at all; ID embeddings are free rows
    from ttds.train import generative

    ttss = generative.build_model(cfg, model.backbone, model.item_index, model.user_index)
    assert ttss.id_embedding_provider is None
    assert not [n for n, _ in ttss.named_parameters() if "codebook" in n or "towers" in n]


def test_reassignment_keeps_ids_unique_and_trie_consistent(bb_dir, ds, tmp_path):
    model, _ = _model(bb_dir, ds, tmp_path)
    before = {t: idx.codes.copy() for t, idx in (("item", model.item_index), ("user", model.user_index))}
    g = torch.Generator().manual_seed(1)
    for t in model.towers.values():  # the backbone moved: new text representations
        t.set_text(t.x + 0.5 * t.x.std() * torch.randn(t.x.shape, generator=g))
    changed = model.reassign()
    assert 0 < changed["item"] <= 1 and 0 < changed["user"] <= 1
    for name, idx, trie in (("item", model.item_index, model.trie), ("user", model.user_index, model.user_trie)):
        assert idx.is_unique(), name
        assert not np.array_equal(idx.codes, before[name])
        ents = trie.entities(torch.as_tensor(idx.codes))
        assert torch.equal(ents, torch.arange(idx.n)), name  # every entity reachable, maps back to itself
        codes_buf = model.item_codes if name == "item" else model.user_codes
        assert np.array_equal(codes_buf.numpy(), idx.codes)  # what checkpoints carry
    assert np.array_equal(model.codec.item_tokens, model.id_tokens("item", model.item_index.codes))
    top = model.eval().recommend(torch.arange(5), torch.as_tensor(np.stack([s[-6:-1] for s in ds.sequences[:5]])), k=10)
    assert ((top >= 0) & (top < ds.n_items)).all() and all(len(set(r.tolist())) == 10 for r in top)
    # a collapse that overflows the disambiguation level keeps the previous (unique) codes
    keep = model.user_index.codes.copy()
    assert ds.n_users > model.towers["user"].capacity
    model.towers["user"].set_text(torch.ones_like(model.towers["user"].x))
    assert model.reassign()["user"] == 0.0 and np.array_equal(model.user_index.codes, keep)


def test_sticky_reassignment_changes_only_clear_winners(bb_dir, ds, tmp_path):
    """margin 0 = the plain nearest-code assignment; a margin keeps near-ties, so fewer codes change;
    the per-level shares of changed codes are reported."""
    model, _ = _model(bb_dir, ds, tmp_path)
    tok, x = model.towers["item"].tokenizer, model.towers["item"].x
    g = torch.Generator().manual_seed(3)
    moved = x + 0.3 * x.std() * torch.randn(x.shape, generator=g)
    old = tok.encode(x)
    assert torch.equal(tok.encode(moved, keep=old, margin=0.0), tok.encode(moved))
    plain = (tok.encode(moved) != old).any(1).float().mean()
    sticky = (tok.encode(moved, keep=old, margin=0.5) != old).any(1).float().mean()
    assert 0 < plain and sticky < plain
    assert torch.equal(tok.encode(x, keep=old, margin=0.5), old)  # nothing moved: nothing changes
    model.towers["item"].set_text(moved)
    codes = model.item_index.codes.copy()
    preview = model.reassign(margin=0.5, apply=False)  # measures only: the codes in use stay
    assert np.array_equal(model.item_index.codes, codes) and np.array_equal(model.item_codes.numpy(), codes)
    r = model.reassign(margin=0.5)
    assert r == preview and not np.array_equal(model.item_index.codes, codes)
    assert len(r["item_levels"]) == model.item_index.n_levels and 0 < r["item"] <= 1
    assert model.item_index.is_unique()


def test_token_loss_trains_the_tokenizer_as_an_autoencoder_and_free_rows_start_at_zero(bb_dir, ds, tmp_path):
    model, _ = _model(bb_dir, ds, tmp_path, extra=("dynamic.id_init=projected",))
    t = model.towers["item"]
    t.token_loss(torch.arange(10)).backward()  # the reconstruction reaches the tokenizer's decoder
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.tokenizer.decoder.parameters())
    # ID embedding = P(codebook) + a free row that starts at zero (and is trained: it gets gradient)
    g = model.groups.index(("item", 0, t.level_sizes[0]))
    s, k = model.offsets[g], t.level_sizes[0]
    with torch.no_grad():
        assert torch.allclose(model.id_table()[s:s + k], t.level_embeddings(0))
    model.zero_grad(set_to_none=True)
    model.id_table()[s:s + k].sum().backward()
    assert model.id_emb.grad[s:s + k].abs().sum() > 0 and t.tokenizer.codebooks[0].grad.abs().sum() > 0
    # dynamic.id_rows=false: the projection only
    proj_only, _ = _model(bb_dir, ds, tmp_path / "p", extra=("dynamic.id_rows=false", "dynamic.id_init=projected"))
    assert not proj_only.free_rows and "id_rows" not in proj_only.state_dict()


def test_random_id_init_starts_like_ttss_and_the_rec_loss_still_reaches_the_codebooks(bb_dir, ds, tmp_path):
    """`dynamic.id_init=random`: the ID embeddings start as TTSS's do (random free rows at the word-embedding scale,
    projections zero); the projection learns from the first step, and through it the codebooks from the second."""
    model, cfg = _model(bb_dir, ds, tmp_path, extra=("dynamic.id_init=random",))
    word_std = float(model.backbone.hf_model.get_input_embeddings().weight.detach().std())
    t = model.towers["item"]
    g = model.groups.index(("item", 0, t.level_sizes[0]))
    s, k = model.offsets[g], t.level_sizes[0]
    with torch.no_grad():
        assert torch.equal(model.id_table(), model.id_emb)  # P(codebook) = 0 everywhere: the table is the free rows
        assert float(model.id_emb[s:s + k].std()) == pytest.approx(word_std, rel=0.3)
    assert all(float(tw.proj.weight.abs().sum()) == 0 for tw in model.towers.values())
    opt = torch.optim.AdamW(dynamic.param_groups(model, dynamic.GenTrainConfig(), dynamic.DynamicConfig()))
    dynamic._set_phase(model, opt, True, True)
    opt.zero_grad(set_to_none=True)  # (the tokenizer fit leaves its last gradients)
    model.loss(*_batch(model, ds, cfg)).backward()
    cb_grad = t.tokenizer.codebooks[0].grad
    assert t.proj.weight.grad.abs().sum() > 0 and (cb_grad is None or not cb_grad.abs().sum() > 0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.loss(*_batch(model, ds, cfg)).backward()
    assert t.tokenizer.codebooks[0].grad.abs().sum() > 0
    # projected starts from P(codebook) instead: tested above; bad settings are one-line errors
    for extra, words in ((("dynamic.id_init=zeros",), "dynamic.id_init='zeros'"),
                         (("dynamic.id_init=random", "dynamic.id_rows=false"), "needs dynamic.id_rows=true")):
        with pytest.raises(TTDSError, match=words):
            _model(bb_dir, ds, tmp_path / "bad", extra=extra)


def test_projection_lr_keeps_the_projected_table_as_slow_as_a_free_row(bb_dir, ds, tmp_path):
    """`dynamic.proj_lr_scale`: an AdamW step moves each weight of P by its lr, so P(c) by up to lr x ||c||_1. With
    `auto` (lr = train.id_lr / the largest mean codebook row L1) the first step moves the projected level-0 table by
    no more than a free row moves (train.id_lr); at the rows' own lr (scale 1) it moves up to ||c||_1 times more (with
    SmolLM2-L10 on Scientific ||c||_1 ~ 90 at level 0: part of session 25's slow TTDS, README)."""
    model, cfg = _model(bb_dir, ds, tmp_path)
    t = model.towers["item"]
    l1 = max(float(cb.detach().abs().sum(1).mean()) for tw in model.towers.values() for cb in tw.tokenizer.codebooks)
    assert l1 > 2  # (else the test below could not tell the settings apart)
    tc = dynamic.GenTrainConfig(id_lr=0.001)

    def step_moves(dyn):  # mean over level-0 codes of max |change| of P(c) after one AdamW step on L_LLM
        p0 = {k: v.clone() for k, v in model.state_dict().items()}
        groups = dynamic.param_groups(model, tc, dyn)
        proj = next(g for g in groups if g["name"] == "projection")
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        dynamic._set_phase(model, opt, True, False)  # tokenizers frozen: only P moves P(c)
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            before = t.level_embeddings(0).clone()
        model.loss(*_batch(model, ds, cfg)).backward()
        opt.step()
        with torch.no_grad():
            moved = (t.level_embeddings(0) - before).abs().amax(1).mean().item()
        model.load_state_dict(p0)
        return moved, proj["lr"]

    moved, lr = step_moves(dynamic.DynamicConfig())
    assert lr == pytest.approx(tc.id_lr / l1, rel=1e-5)
    assert moved <= tc.id_lr
    fast, lr_fast = step_moves(dynamic.DynamicConfig(proj_lr_scale=1.0))
    assert lr_fast == pytest.approx(tc.id_lr) and fast > 1.5 * tc.id_lr
    # warm-up: the projection at its share of dynamic.warmup_lr, the backbone frozen
    trainer = type("T", (), {})()
    trainer.state, trainer.warm, trainer.dyn = {"step": 0}, 2, dynamic.DynamicConfig()
    trainer.opt = torch.optim.AdamW(dynamic.param_groups(model, tc, trainer.dyn))
    dynamic.DynamicTrainer.set_lr(trainer)
    lrs = {g["name"]: g["lr"] for g in trainer.opt.param_groups}
    assert lrs["body"] == 0 and lrs["new"] == lrs["tokenizer"] == 1e-3
    assert lrs["projection"] == pytest.approx(1e-3 / l1, rel=1e-5)
    with pytest.raises(TTDSError, match="dynamic.proj_lr_scale='fast'"):
        dynamic.DynamicConfig(proj_lr_scale="fast")


def test_level_norm_starts_every_level_at_one_scale_and_checkpoints_keep_it(bb_dir, ds, tmp_path):
    """`dynamic.level_norm`: P sees each level's codebook over that level's RMS. Residual levels shrink, so without it
    the deeper level's projected embeddings start smaller than the first's; with it both start at the same RMS. The
    flag is a saved buffer: a checkpoint rebuilds the table it was trained with, and older ones keep the raw form."""
    from ttds.train.loop import load_weights, weights

    def level_rms(model):
        t = model.towers["item"]
        with torch.no_grad():
            return [float(t.level_embeddings(lv).pow(2).mean().sqrt()) for lv in range(t.n_code_levels)]

    raw, cfg = _model(bb_dir, ds, tmp_path / "raw", extra=("dynamic.id_init=projected",))
    r = level_rms(raw)
    assert r[1] < 0.8 * r[0] and "towers.item.level_norm" not in weights(raw)
    normed, cfg_n = _model(bb_dir, ds, tmp_path / "raw", extra=("dynamic.id_init=projected", "dynamic.level_norm=true"))  # same fitted tokenizers
    n = level_rms(normed)
    assert n[1] == pytest.approx(n[0], rel=0.05)
    rms_all = float(torch.cat([normed.towers["item"].level_embeddings(lv) for lv in range(2)]).detach().std())
    assert rms_all == pytest.approx(float(normed.backbone.hf_model.get_input_embeddings().weight.detach().std()), rel=0.1)
    tensors = {k: v.clone() for k, v in weights(normed).items()}
    assert "towers.item.level_norm" in tensors
    for c, ts, ref in ((cfg, tensors, normed), (cfg_n, weights(raw), raw)):  # the checkpoint decides, not the config
        again = dynamic.model_from_weights(c, normed.backbone, tmp_path / "raw", ts)
        load_weights(again, ts)
        with torch.no_grad():
            torch.testing.assert_close(again.id_table(), ref.id_table())
    # the RMS is a constant of the step: the gradient reaches the codebooks through P only
    normed.towers["item"].level_embeddings(1).sum().backward()
    cb = normed.towers["item"].tokenizer.codebooks[1]
    expected = normed.towers["item"].proj.weight.sum(0) / cb.detach().pow(2).mean().sqrt()
    torch.testing.assert_close(cb.grad, expected.expand_as(cb))


def test_each_loss_term_follows_its_flag(bb_dir, ds, tmp_path, monkeypatch):
    # STDS: no user tower, no user tokens anywhere
    stds, cfg = _model(bb_dir, ds, tmp_path / "stds", "stds")
    assert set(stds.towers) == {"item"} and stds.user_index is None and stds.codec.user_tokens is None
    assert all(t == "item" for t, _, _ in stds.groups)
    ents = {"item": torch.arange(8)}
    _, parts = stds.dm_vae_loss(ents, beta=0.0)
    assert parts["l_token"] == 0 and parts["l_id"] > 0
    _, parts = stds.dm_vae_loss(ents, beta=1.0)
    assert parts["l_token"] > 0
    # HO off: no user-prediction or review example is ever sampled; on: both are
    data = TaskData(ds, [s[:-2] for s in ds.sequences], stds.codec, 20)

    from ttds.tasks import builders

    def kinds(tasks_cfg, codec, monkeypatch):
        """The task kinds that produced examples in one epoch of the mix."""
        seen = set()
        for name in ("userpred", "review"):
            real = getattr(builders, f"{name}_examples")
            monkeypatch.setattr(builders, f"{name}_examples",
                                lambda *a, _r=real, _n=name: (lambda out: (seen.add(_n) if out else None, out)[1])(_r(*a)))
        data.codec = codec
        build_epoch(data, tasks_cfg, np.random.default_rng(0))
        monkeypatch.undo()
        return seen

    full, _ = _model(bb_dir, ds, tmp_path / "full")
    def tasks(m):  # the task config as the recipe resolves it (tasks.user_profile: auto)
        cfg = _cfg(bb_dir, m)
        resolve_user_profile(cfg, ds, "rqvae")
        return dynamic.section(cfg, "tasks", TaskConfig)

    assert kinds(tasks("ttds"), full.codec, monkeypatch) == {"userpred", "review"}
    assert kinds(tasks("ttds_ho"), full.codec, monkeypatch) == set()
    assert kinds(tasks("ttds"), stds.codec, monkeypatch) == {"review"}  # STDS: no user IDs to predict
    # DM off (TTDS-DM) vs on: the step's L_DM-VAE term is exactly zero (no gradient) / non-zero
    for model, zero in (("ttds_dm", True), ("ttds", False)):
        lc = dynamic.section(_cfg(bb_dir, model), "loss", dynamic.LossConfig)
        full.zero_grad(set_to_none=True)
        term = dynamic.dm_vae_term(full, lc, seed=0)  # None when alpha = 0: nothing computed
        if term is not None:
            term[0].backward()
        parts = term[1] if term is not None else {"l_id": 0.0, "l_token": 0.0}
        grads = [p.grad for p in full.towers["item"].tokenizer.encoder.parameters()]
        assert (parts["l_id"] == 0 and parts["l_token"] == 0) == zero, (model, parts)
        assert all(g is None for g in grads) == zero


def test_joint_run_learns_and_reassigns(bb_dir, ds, tmp_path):
    # a short joint run (codes re-assigned every epoch, ~8 steps) lowers the recommendation loss and moves the codes.
    # NOT asserted: "validation NDCG@10 beats the untrained model" - with this random tiny backbone and 40 steps it
    # held for some random backbones and not for others (untrained NDCG@10 0.03-0.09 on 60 items), so it is not a
    # reliable test at this budget.
    fast = ["train.max_steps=40", "train.batch_size=32", "train.id_lr=0.03", "train.lr=0.0005", "dynamic.tokenizer_lr=0.001",
            "loss.dm_batch=16", "train.eval_steps=20", "data.max_history=10",
            "dynamic.reassign_margin=0.5",  # the default 2.0 may keep every code over 40 tiny steps
            "dynamic.refresh_text=true"]  # the paper's re-encoding of X (off by default)
    m = dynamic.train(_cfg(bb_dir, "ttds", fast), ds, tmp_path / "a")
    losses = json.loads((tmp_path / "a" / "state.json").read_text())["losses"]
    assert np.mean(losses[-8:]) < 0.9 * np.mean(losses[:8]), losses
    assert len(m["reassignments"]) >= 3 and any(r["item"] > 0 for r in m["reassignments"])
    # texts re-encoded at each re-assignment: the share the tokenizers alone would have changed is reported beside it
    assert all(0 <= r["tokenizer_only"]["item"] <= 1 and set(r["tokenizer_only"]) == {"item", "user"}
               for r in m["reassignments"])
    # the gradient norms of the recommender and of the towers are logged apart (one clip covers both)
    norms = re.findall(r"step \d+: loss [\d.]+, .*grad_norm ([\d.]+), grad_norm_towers ([\d.]+)",
                       (tmp_path / "a" / "run.log").read_text())
    assert norms and all(float(a) > 0 and float(b) > 0 for a, b in norms)
    # the tokenizer moved (joint)
    start = load_safetensors(tmp_path / "a" / "tokenizer.item" / "tokenizer.safetensors")["codebooks.0"]
    assert not torch.allclose(load_safetensors(tmp_path / "a" / "model.safetensors")["towers.item.tokenizer.codebooks.0"], start)


def test_static_flag_and_exact_resume(bb_dir, tmp_path):
    small = load_dataset(SMALL)
    # dynamic.enabled=false: the tokenizer does not move (a static index inside this recipe)
    dynamic.train(_cfg(bb_dir, "ttds", ["train.max_steps=2", "dynamic.enabled=false"]), small, tmp_path / "s")
    start = load_safetensors(tmp_path / "s" / "tokenizer.item" / "tokenizer.safetensors")["codebooks.0"]
    assert torch.equal(load_safetensors(tmp_path / "s" / "last.safetensors")["model.towers.item.tokenizer.codebooks.0"], start)
    # resume: 5 steps straight == 3 steps, stop, resume to 5 (re-assignments before and after the stop)
    extra = ["dynamic.reassign_steps=2", "dynamic.warmup_steps=1"]
    dynamic.train(_cfg(bb_dir, "ttds", ["train.max_steps=5", *extra]), small, tmp_path / "b")
    dynamic.train(_cfg(bb_dir, "ttds", ["train.max_steps=3", *extra]), small, tmp_path / "c")
    (tmp_path / "c" / "metrics.json").unlink()
    dynamic.train(_cfg(bb_dir, "ttds", ["train.max_steps=5", *extra]), small, tmp_path / "c")
    sb, sc = (json.loads((tmp_path / r / "state.json").read_text()) for r in ("b", "c"))
    assert len(sb["losses"]) == len(sc["losses"]) == 5 and len(sb["reassign"]) == 2
    # the default keeps X = f(C) as first encoded across re-assignments (dynamic.refresh_text: false)
    last = {r: load_safetensors(tmp_path / r / "last.safetensors") for r in ("s", "b")}
    assert torch.equal(last["b"]["model.towers.item.x"], last["s"]["model.towers.item.x"])
    assert sc["losses"][:3] == sb["losses"][:3]
    assert sc["losses"][3:] == pytest.approx(sb["losses"][3:], rel=1e-5)
    np.testing.assert_allclose(sc["dm_losses"], sb["dm_losses"], rtol=1e-4)
    assert [r["item"] for r in sc["reassign"]] == pytest.approx([r["item"] for r in sb["reassign"]])


def test_checkpoints_from_before_the_free_rows_and_text_head_load_as_trained(bb_dir, ds, tmp_path):
    """A session-2 checkpoint has no `id_rows` flag and no text head: it rebuilds as projection-only with
    L_ID on h directly, loads without missing keys, and gives the same ID table and L_ID as the model it came from."""
    from ttds.train.loop import load_weights, weights

    old, cfg = _model(bb_dir, ds, tmp_path, extra=("dynamic.id_rows=false", "dynamic.id_init=projected"))
    for t in old.towers.values():
        t.text_head = torch.nn.Identity()  # what such a checkpoint was trained with
    tensors = {k: v.clone() for k, v in weights(old).items()}
    assert "id_rows" not in tensors and not any("text_head" in k for k in tensors)
    again = dynamic.model_from_weights(cfg, old.backbone, tmp_path, tensors)
    load_weights(again, tensors)
    again.index_from_buffers()
    assert not again.free_rows and all(isinstance(t.text_head, torch.nn.Identity) for t in again.towers.values())
    with torch.no_grad():
        torch.testing.assert_close(again.id_table(), old.id_table())
        ents = {"item": torch.arange(6)}
        assert again.eval().dm_vae_loss(ents, 0.0)[1]["l_id"] == pytest.approx(old.eval().dm_vae_loss(ents, 0.0)[1]["l_id"])
    # a current checkpoint carries both and rebuilds with them
    new, _ = _model(bb_dir, ds, tmp_path / "n")
    rebuilt = dynamic.model_from_weights(cfg, new.backbone, tmp_path / "n", weights(new))
    assert rebuilt.free_rows and not isinstance(rebuilt.towers["item"].text_head, torch.nn.Identity)


def test_late_freeze_counts_from_the_last_epoch_the_step_budget_reaches(bb_dir, tmp_path):
    """`dynamic.freeze_last_epochs`: no re-assignment (and frozen tokenizers) in the final epochs, counted back from the
    last epoch `train.max_steps` lets the run reach, not from `train.epochs` (which a step budget may never reach)."""
    small = load_dataset(SMALL)
    base = ["dynamic.warmup_steps=1", "train.eval_every=100", "dynamic.reassign_margin=0"]
    dynamic.train(_cfg(bb_dir, "ttds", ["train.epochs=1", *base]), small, tmp_path / "one")
    per_epoch = json.loads((tmp_path / "one" / "state.json").read_text())["step"]
    assert per_epoch >= 3  # the "short" budget below (per_epoch - 1 steps) must stay a real, positive step budget
    three = [f"train.max_steps={3 * per_epoch}", *base]  # train.epochs stays 50

    def reassigned_at(name, extra=(), budget=three):
        dynamic.train(_cfg(bb_dir, "ttds", [*budget, *extra]), small, tmp_path / name)
        done = [r["step"] for r in json.loads((tmp_path / name / "state.json").read_text())["reassign"]]
        log = (tmp_path / name / "run.log").read_text()
        planned = re.search(r"dynamic: \d+ code re-assignment\(s\) planned, at step\(s\) ([\d, ]+)", log)
        # the plan logged at the start is what the run did; an empty plan is a warning naming the setting to change
        assert [int(x) for x in planned.group(1).split(", ")] == done if planned else \
            not done and "dynamic: no code re-assignment falls inside this run's" in log and "reassign_steps=N" in log
        return done

    assert reassigned_at("free") == [per_epoch, 2 * per_epoch]
    assert reassigned_at("late", ["dynamic.freeze_last_epochs=1"]) == [per_epoch]  # the final epoch keeps its index
    assert reassigned_at("steps", ["dynamic.reassign_steps=2"]) == list(range(2, 3 * per_epoch, 2))
    assert reassigned_at("short", budget=[f"train.max_steps={per_epoch - 1}", *base]) == []  # under an epoch: none
    # an epoch budget: the last epoch's end is the end of the run, no re-assignment there
    assert reassigned_at("epochs", budget=["train.epochs=2", *base]) == [per_epoch]


def test_behaviour_states_are_recorded_per_predicted_item_and_fused(bb_dir, ds, tmp_path):
    """dynamic.behaviour_weight: loss() adds, for every position that predicts an item's first ID token, the
    transformed state there to that item's sum (checked against a plain loop over the labels); the re-assignment
    input is then text + w x the centred mean state at the text's RMS, and items never predicted keep their text."""
    model, cfg = _model(bb_dir, ds, tmp_path, extra=["dynamic.behaviour_weight=1.0"])
    t = model.towers["item"]
    assert t.has_behaviour and not model.towers["user"].has_behaviour  # items only
    model.target_state_hook = model.record_target_states
    ids, attn, labels = _batch(model, ds, cfg)
    model.eval()  # no dropout: the reference forward below gives the same states
    model.loss(ids, attn, labels)
    # reference: a loop over each row's labels, IDs looked up in a dict
    by_id = {tuple(c): e for e, c in enumerate(model.item_index.codes.tolist())}
    L, first = model.item_index.n_levels, model.n_words
    with torch.no_grad():
        z = model.head(model.hidden(ids, attn, (attn.cumsum(1) - 1).clamp(min=0)))
    want_sum, want_n = torch.zeros_like(t.behaviour_sum), torch.zeros_like(t.behaviour_count)
    for b in range(len(ids)):
        pos = [p for p in range(labels.shape[1]) if labels[b, p] >= 0]
        lab = [int(labels[b, p]) for p in pos]
        for j in range(len(lab)):
            for n in (L, L - 1):  # an ID's L tokens, or L - 1 for a short ID (no disambiguation token)
                codes = [lab[j + l] - first - model.offsets[l] for l in range(n) if j + l < len(lab)]
                key = tuple(codes + [-1] * (L - n))
                if len(codes) == n and all(0 <= c < model.groups[l][2] for l, c in enumerate(codes)) and key in by_id:
                    e = by_id[key]
                    want_sum[e] += z[b, pos[j]]
                    want_n[e] += 1
                    break
    assert want_n.sum() > 10
    assert torch.equal(t.behaviour_count, want_n)
    assert torch.allclose(t.behaviour_sum, want_sum, atol=1e-4)
    # fusion
    x = torch.randn(t.n, t.x.shape[1])
    fused = t.fuse_behaviour(x, 0.5)
    seen = want_n > 0
    assert torch.equal(fused[~seen], x[~seen]) and not torch.allclose(fused[seen], x[seen])
    b = want_sum[seen] / want_n[seen, None]
    b = b - b.mean(0)
    scale = (x - x.mean(0)).pow(2).sum(1).mean().sqrt() / b.pow(2).sum(1).mean().sqrt()
    assert torch.allclose(fused[seen], x[seen] + 0.5 * scale * b, atol=1e-4)
    assert t.behaviour_count.sum() == 0 and t.behaviour_sum.abs().sum() == 0  # restarted


def test_behaviour_fusion_runs_and_resumes_exactly(bb_dir, tmp_path):
    small = load_dataset(SMALL)
    extra = ["dynamic.reassign_steps=2", "dynamic.warmup_steps=1", "dynamic.behaviour_weight=1.0"]
    on = [*extra, "dynamic.refresh_text=true"]  # the fusion happens when X is re-encoded
    dynamic.train(_cfg(bb_dir, "ttds", ["train.max_steps=5", *on]), small, tmp_path / "b")
    dynamic.train(_cfg(bb_dir, "ttds", ["train.max_steps=3", *on]), small, tmp_path / "c")
    (tmp_path / "c" / "metrics.json").unlink()
    dynamic.train(_cfg(bb_dir, "ttds", ["train.max_steps=5", *on]), small, tmp_path / "c")
    sb, sc = (json.loads((tmp_path / r / "state.json").read_text()) for r in ("b", "c"))
    assert len(sb["reassign"]) == 2 and sc["losses"] == pytest.approx(sb["losses"], rel=1e-5)
    xb, xc = (load_safetensors(tmp_path / r / "last.safetensors") for r in ("b", "c"))
    assert torch.allclose(xb["model.towers.item.x"], xc["model.towers.item.x"], atol=1e-5)
    assert xb["model.towers.item.behaviour_count"].sum() > 0  # the training loss fed the sums (since step 4)
    assert torch.allclose(xb["model.towers.item.behaviour_sum"], xc["model.towers.item.behaviour_sum"], atol=1e-4)
    with pytest.raises(Exception, match="refresh_text"):
        dynamic.train(_cfg(bb_dir, "ttds", ["train.max_steps=1", "dynamic.refresh_text=false", *extra]), small, tmp_path / "d")


def test_users_made_from_items_follow_the_items_refreshed_vectors(bb_dir, ds, tmp_path):
    """Without user text, the user tower's X is the mean of the user's training items' X (`index.user_vectors: auto`),
    at the start and after every re-encoding with the fine-tuned backbone: the user texts are never encoded."""
    from dataclasses import replace

    from ttds.index.build import index_config, items_to_users, tower_inputs

    plain = replace(ds, user_text=None)
    model, cfg = _model(bb_dir, plain, tmp_path)
    w = items_to_users(plain)
    assert torch.allclose(model.towers["user"].x, torch.sparse.mm(w, model.towers["item"].x), atol=1e-5)
    texts = {t: tower_inputs(plain, t, index_config(cfg), model.backbone.tokenizer) for t in model.towers}
    assert isinstance(texts["user"], torch.Tensor) and isinstance(texts["item"], list)
    with torch.no_grad():  # the backbone moves (as in joint training): every X moves with it
        for p in model.backbone.hf_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = model.towers["user"].x.clone()
    dynamic.refresh_text(model, texts)
    assert not torch.allclose(model.towers["user"].x, before, atol=1e-4)
    assert torch.allclose(model.towers["user"].x, torch.sparse.mm(w, model.towers["item"].x), atol=1e-5)
    # a user tokenizer fitted on text (the built-in data has reviews) is not silently fed item means
    _model(bb_dir, ds, tmp_path / "text")
    with pytest.raises(TTDSError, match="user_vectors=text"):
        _model(bb_dir, plain, tmp_path / "text")
    _model(bb_dir, plain, tmp_path / "text", extra=["index.options.user_vectors=text"])


def test_refresh_encodes_in_the_training_precision(bb_dir, ds, tmp_path, monkeypatch):
    """With `train.precision=bf16` the re-encoding of X = f(C) runs under bf16 autocast (the training's precision;
    2.9x faster with SmolLM2-L10 on the AMX machine), with fp32 the backbone stays in fp32; the vectors agree closely."""
    from ttds.index.build import index_config, tower_inputs

    model, cfg = _model(bb_dir, ds, tmp_path)
    texts = {t: tower_inputs(ds, t, index_config(cfg), model.backbone.tokenizer) for t in model.towers}
    seen, body = [], model.backbone.hidden_states

    def spy(*a, **k):
        seen.append(torch.is_autocast_enabled("cpu"))
        return body(*a, **k)

    monkeypatch.setattr(model.backbone, "hidden_states", spy)
    x = {}
    for prec in ("fp32", "bf16"):
        seen.clear()
        dynamic.refresh_text(model, texts, precision=prec)
        assert seen and set(seen) == {prec == "bf16"}
        x[prec] = {t: tw.x.clone() for t, tw in model.towers.items()}
        assert all(tw.x.dtype == torch.float32 for tw in model.towers.values())
    for t in model.towers:
        cos = torch.nn.functional.cosine_similarity(x["fp32"][t], x["bf16"][t], dim=1)
        assert cos.min() > 0.99 and not torch.equal(x["fp32"][t], x["bf16"][t])


def test_id_table_parts_benchmark_reads_a_checkpoint(bb_dir, ds, tmp_path):
    """benchmarks/id_table_parts.py: the P(c) and free-row sizes it prints are the model's own."""
    import importlib.util
    from pathlib import Path

    from ttds.io import save_safetensors
    from ttds.train.loop import weights

    spec = importlib.util.spec_from_file_location("id_table_parts", Path(__file__).parents[1] / "benchmarks" / "id_table_parts.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for init, norm in (("projected", "false"), ("projected", "true"), ("random", "false")):
        model, _ = _model(bb_dir, ds, tmp_path / "m", extra=(f"dynamic.id_init={init}", f"dynamic.level_norm={norm}"))
        save_safetensors(tmp_path / "model.safetensors", weights(model))
        got = dict(bench.parts(str(tmp_path / "model.safetensors")))
        t = model.towers["item"]
        with torch.no_grad():
            for lv in range(t.n_code_levels):
                want = float(t.level_embeddings(lv).pow(2).mean().sqrt())
                assert got[f"item: P(c) RMS, level {lv}"] == pytest.approx(want, rel=1e-4, abs=1e-8)
            assert got["free rows R, all ID tokens"] == pytest.approx(float(model.id_emb.pow(2).mean().sqrt()), rel=1e-4)
        assert (got["item: P(c) RMS, level 0"] == 0) == (init == "random")


def test_ids_prompt_survives_reassignment(bb_dir, ds, tmp_path):
    """`tasks.prompt: ids` reaches the TTDS model, and a re-assignment (which rebuilds the prompt codec) keeps it."""
    from ttds.tasks import templates

    model, _ = _model(bb_dir, ds, tmp_path, extra=("tasks.prompt=ids",))
    assert model.codec.seqrec == templates.SEQREC_IDS
    for t in model.towers.values():
        t.set_text(t.x + 0.5 * t.x.std() * torch.randn(t.x.shape, generator=torch.Generator().manual_seed(1)))
    assert model.reassign()["item"] > 0
    p = model.codec.seqrec_prompt(0, [1, 2], 0)
    assert model.codec.seqrec == templates.SEQREC_IDS and (p[len(model.codec.bos):] >= model.n_words).all()


def test_tiger_ttds_trains_a_scratch_recommender_on_a_fixed_encoders_x(bb_dir, tmp_path):
    """`--model tiger_ttds`: the towers read X from `index.options.encoder` (48 dims) while the recommender is a
    16-wide scratch model; the tokenizers still train jointly, `ttds eval` reloads the run, new items are coded
    with that encoder, and re-encoding X with the recommender is refused."""
    from ttds.recipes import run_config
    from ttds.serve.new_items import attach
    from ttds.train.commands import eval_model, train_model

    sets = [f"backbone.name_or_path={bb_dir}", "backbone.arch.hidden_size=16", "backbone.arch.num_hidden_layers=1",
            "backbone.arch.num_attention_heads=2", "backbone.arch.intermediate_size=32", f"index.options.encoder={bb_dir}",
            "index.options.levels=2", "index.options.codebook_size=8", "index.options.rqvae.max_steps=20",
            "index.options.cache_embeddings=false", "train.batch_size=8", "train.valid_users=20", "train.max_steps=10",
            "train.eval_steps=5", "train.warmup_steps=2", "dynamic.warmup_steps=2", "dynamic.reassign_steps=4",
            "loss.dm_batch=8", "eval.beam=10", "threads=1", "eval.precision=fp32"]
    metrics, out = train_model("tiger_ttds", SMALL, tmp_path / "run", overrides=sets)
    cfg = run_config(out)
    assert cfg["recipe"] == "dynamic" and cfg["backbone"]["init"] == "scratch" and cfg["tasks"]["prompt"] == "ids"
    assert len(metrics["reassignments"]) >= 1 and 0 <= metrics["test"]["NDCG@10"] <= 1
    w = load_safetensors(out / "model.safetensors")
    assert w["towers.item.x"].shape[1] == 48 and w["towers.user.x"].shape[1] == 48  # the encoder's width
    assert w["towers.item.text_head.weight"].shape == (48, 16)  # L_ID maps the 16-wide recommender to it
    start = load_safetensors(out / "tokenizer.item" / "tokenizer.safetensors")["codebooks.0"]
    assert not torch.allclose(w["towers.item.tokenizer.codebooks.0"], start)  # joint: the tokenizer moved
    r = eval_model(out, SMALL)
    assert r["metrics"]["NDCG@10"] == pytest.approx(metrics["test"]["NDCG@10"])
    model, small = dynamic.load(out), load_dataset(SMALL)
    attach(model, cfg, out, small)
    coder = model.item_coder
    assert coder.encoder is not model.backbone and coder.encoder.hidden_size == 48
    x = torch.cat([coder.item_vector({f: small.item_text[f][i] for f in small.item_text}) for i in range(5)])
    assert torch.allclose(x, model.towers["item"].x[:5], atol=1e-4)  # the vectors the tower was trained on
    with pytest.raises(TTDSError, match="refresh_text=true .* index.options.encoder empty"):
        train_model("tiger_ttds", SMALL, tmp_path / "bad", overrides=[*sets, "dynamic.refresh_text=true"])
