import time

import numpy as np
import pytest
import torch

from _generative_fixtures import tiny_backbone_dir
from ttds.backbone import Backbone, BackboneConfig
from ttds.config import load_config
from ttds.data.readers import load_dataset
from ttds.index.base import SemanticIndex
from ttds.models.generative import GenerativeRecommender
from ttds.tasks.builders import TaskConfig, TaskData, build_epoch, windows
from ttds.tasks import templates
from ttds.train.engine import collate


def random_index(n, levels, codebook, tower, seed):
    from ttds.index.build import IndexConfig, build
    from ttds.data.dataset import RecDataset

    fake = RecDataset("x", [np.zeros(3, np.int64)] * n, {}, [str(i) for i in range(n)], [str(i) for i in range(n)])
    return build(fake, "user" if tower == "user" else "item", None,
                 IndexConfig(kind="random", levels=levels, codebook_size=codebook, seed=seed), progress=False).index


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()  # runs set threads=1 (tiny matrices); leave the process as found
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bb_dir(tmp_path_factory):
    return tiny_backbone_dir(tmp_path_factory.mktemp("bb"), "bert", 48)


def test_dense_peak_is_measured_on_the_given_clock():
    """MFU's peak: FLOP per unit of the clock given (the trainer passes process time on CPU, so a core shared with
    other jobs lowers neither the peak nor the training's FLOP per CPU-second)."""
    from ttds.train.engine import dense_peak_flops

    ticks = iter(range(100))
    assert dense_peak_flops(n=64, repeats=3, clock=lambda: 2.0 * next(ticks)) == 2 * 64**3 / 2.0
    assert dense_peak_flops(n=256, repeats=2, clock=time.process_time) > 1e8


def test_templates_and_windows():
    assert len(templates.SEQREC) >= 5 and all(t.rstrip().endswith((":", "?")) for t in templates.SEQREC)
    w = windows(np.arange(10), 4)
    assert [x.tolist() for x in w] == [[6, 7, 8, 9], [3, 4, 5, 6], [0, 1, 2, 3]]


def test_tasks_targets_and_no_leak(bb_dir):
    ds = load_dataset("builtin:users=30,items=40,seed=3")
    bb = Backbone.load(BackboneConfig(name_or_path=str(bb_dir), causal=True))
    items, users = random_index(ds.n_items, 2, 8, "item", 0), random_index(ds.n_users, 2, 8, "user", 1)
    model = GenerativeRecommender(bb, items, users)
    train = [s[:-2] for s in ds.sequences]
    data = TaskData(ds, train, model.codec, 5)
    cfg = TaskConfig(seqrec=1.0, item2index=0.5, index2item=0.5, userpred=0.5, review=0.5)
    ex = build_epoch(data, cfg, np.random.default_rng(0))
    assert len(ex) > len(train)
    V = model.n_words
    kinds = set()
    for e in ex:
        t = e.tokens[e.target]
        kinds.add("id" if (t >= V).all() else "word" if (t < V).all() else "mixed")
    assert kinds == {"id", "word"}
    # the seqrec examples contain only training items of their user
    held_out = {(u, int(i)) for u, s in enumerate(ds.sequences) for i in s[-2:]}
    item_tok = {tuple(r): i for i, r in enumerate(model.codec.item_tokens.tolist())}
    ids, attn, labels = collate(ex[:4])
    assert ids.shape == labels.shape and (labels[attn == 0] == -100).all()
    loss = model.loss(ids, attn, labels)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert model.id_emb.grad is not None and model.id_emb.grad.abs().sum() > 0


def test_batches_survive_ids_changing_length(bb_dir):
    """A re-assignment that lengthens some short IDs (a new collision) and shortens others leaves the epoch's
    batches as they were (buckets by `Example.slots`), while the examples' tokens do change."""
    from ttds.tasks.builders import PromptCodec
    from ttds.train.engine import bucket_batches

    ds = load_dataset("builtin:users=30,items=40,seed=3")
    bb = Backbone.load(BackboneConfig(name_or_path=str(bb_dir), causal=True))
    rng = np.random.default_rng(0)
    V = int(bb.hf_model.get_input_embeddings().num_embeddings)
    items = V + rng.integers(0, 8, (ds.n_items, 3))
    users = V + 100 + rng.integers(0, 8, (ds.n_users, 3))
    items[:, 2] = np.where(np.arange(ds.n_items) % 3 == 0, items[:, 2], -1)  # a third of the items: 3 tokens
    users[:, 2] = np.where(np.arange(ds.n_users) % 2 == 0, users[:, 2], -1)
    after_i, after_u = items.copy(), users.copy()
    after_i[:, 2] = np.where(np.arange(ds.n_items) % 3 == 1, V + 7, -1)  # other items long now
    after_u[:, 2] = np.where(np.arange(ds.n_users) % 2 == 1, V + 107, -1)
    train = [s[:-2] for s in ds.sequences]
    cfg = TaskConfig(seqrec=1.0, item2index=0.5, index2item=0.5, userpred=0.5, review=0.5)
    out = []
    for it, us in ((items, users), (after_i, after_u)):
        ex = build_epoch(TaskData(ds, train, PromptCodec(bb.tokenizer, it, us), 5), cfg, np.random.default_rng(1))
        out.append((ex, bucket_batches(ex, 4, np.random.default_rng(2))))
    (ex0, b0), (ex1, b1) = out
    assert [e.slots for e in ex0] == [e.slots for e in ex1]
    assert sum(len(a.tokens) != len(b.tokens) for a, b in zip(ex0, ex1)) > len(ex0) // 4  # lengths did change
    assert all((e.tokens >= 0).all() and len(e.tokens) == len(e.target) <= e.slots for e in ex0 + ex1)
    assert b0 == b1


def test_tiny_model_overfits_to_hr1(bb_dir):
    from ttds.tasks.builders import _example

    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    ds = load_dataset("builtin:users=10,items=30,seed=5")
    bb = Backbone.load(BackboneConfig(name_or_path=str(bb_dir), causal=True))
    model = GenerativeRecommender(bb, random_index(ds.n_items, 2, 6, "item", 0), None)
    seqs = [s[:5] for s in ds.sequences]  # memorise every next item; test: history seq[:-1] -> seq[-1]
    # whole-sequence examples with the evaluation template (template 0)
    ex = [_example(model.codec.seqrec_prompt(u, [], 0), model.codec.items(s)) for u, s in enumerate(seqs)]
    batch = collate(ex)
    model.word_embeddings().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for step in range(100):
        loss = model.loss(*batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    users = torch.arange(len(seqs))
    hist = torch.as_tensor(np.stack([s[:-1] for s in seqs]))
    top = model.recommend(users, hist, k=10)
    hr1 = (top[:, 0] == torch.as_tensor([s[-1] for s in seqs])).float().mean().item()
    assert hr1 == 1.0, f"loss {loss.item():.4f}, HR@1 {hr1}"
    # an untrained model does not (the test can fail)
    fresh = GenerativeRecommender(Backbone.load(BackboneConfig(name_or_path=str(bb_dir), causal=True)), model.item_index, None).eval()
    assert (fresh.recommend(users, hist, k=10)[:, 0] == torch.as_tensor([s[-1] for s in seqs])).float().mean().item() < 0.5


def _cfg(bb_dir, extra=()):
    over = [f"backbone.name_or_path={bb_dir}", "index.source=random", "index.user_source=random", "index.options.levels=2",
            "index.options.codebook_size=8", "train.batch_size=8", "train.warmup_steps=2", "train.valid_users=20", "train.lr=0.001",
            "eval.template_mean_users=10", "eval.beam=10", "threads=1", *extra]
    cfg = load_config(model="ttss", overrides=over)
    cfg["name"] = "ttss"
    return cfg


def test_resume_gives_same_next_step_loss(bb_dir, tmp_path, caplog):
    from ttds.train import generative

    ds = load_dataset("builtin:users=40,items=30,seed=2")
    straight = generative.train(_cfg(bb_dir, ["train.max_steps=3"]), ds, tmp_path / "a")
    assert straight["steps"] == 3
    assert "train.warmup_steps=2 is over half of the 3 planned steps" in caplog.text  # a short run is told
    import json
    losses_a = json.loads((tmp_path / "a" / "state.json").read_text())["losses"]
    generative.train(_cfg(bb_dir, ["train.max_steps=2"]), ds, tmp_path / "b")
    (tmp_path / "b" / "metrics.json").unlink()
    generative.train(_cfg(bb_dir, ["train.max_steps=3"]), ds, tmp_path / "b")
    losses_b = json.loads((tmp_path / "b" / "state.json").read_text())["losses"]
    assert len(losses_a) == len(losses_b) == 3
    assert losses_b[:2] == losses_a[:2]
    assert losses_b[2] == pytest.approx(losses_a[2], rel=1e-5)


def test_a_finished_run_continues_only_when_a_limit_is_raised(bb_dir, tmp_path):
    """Early stopping, then the same command with a larger `train.patience` continues the run from its last
    checkpoint (as a larger max_steps / max_minutes / epochs does); the same command without one only re-reads
    metrics.json. lr 0 keeps the validation score flat, so every validation after the first counts as bad."""
    import json

    from ttds.train import generative

    ds = load_dataset("builtin:users=40,items=30,seed=2")
    over = ["train.lr=0", "train.id_lr=0", "train.eval_steps=1", "train.max_steps=20", "eval.final_valid=false"]
    out = tmp_path / "a"

    def state():
        return json.loads((out / "state.json").read_text())

    assert generative.train(_cfg(bb_dir, [*over, "train.patience=1"]), ds, out)["steps"] == 2
    assert state()["stopped"] == "patience" and [h["step"] for h in state()["history"]] == [1, 2]
    assert generative.train(_cfg(bb_dir, [*over, "train.patience=1"]), ds, out)["steps"] == 2  # nothing to continue
    assert generative.train(_cfg(bb_dir, [*over, "train.patience=3"]), ds, out)["steps"] == 4
    assert state()["stopped"] == "patience" and [h["step"] for h in state()["history"]] == [1, 2, 3, 4]
    assert generative.train(_cfg(bb_dir, [*over, "train.patience=9", "train.max_steps=5"]), ds, out)["steps"] == 5
    assert state()["stopped"] == "max_steps"


def test_lr_schedule_ends_at_max_steps(bb_dir, tmp_path, caplog):
    """`train.max_steps` before the last of `train.epochs` ends the cosine there (as HF Trainer's max_steps), and
    training that stops between validations still validates its final weights."""
    import json

    from ttds.train import generative

    ds = load_dataset("builtin:users=40,items=30,seed=2")
    generative.train(_cfg(bb_dir, ["train.max_steps=8", "train.epochs=50", "train.min_lr_ratio=0.05", "train.eval_steps=3"]),
                     ds, tmp_path / "a")
    state = json.loads((tmp_path / "a" / "state.json").read_text())
    assert [h["step"] for h in state["history"]] == [3, 6, 8]  # the final weights are validated too
    mult = state["lr_mult"]
    assert len(mult) == 8 and mult[:2] == [0.5, 1.0]  # linear warm-up over train.warmup_steps=2
    assert "is over half of the" not in caplog.text  # warm-up 2 of 8 steps: no warning
    assert all(a > b for a, b in zip(mult[2:], mult[3:])) and mult[-1] < 0.2  # x0.99 when planned over 50 epochs


def test_train_precision_auto_trains_in_bf16_where_the_machine_has_bf16_units(bb_dir, tmp_path, monkeypatch):
    """`train.precision: auto` follows `runtime.has_fast_bf16`: with bf16 units the steps run under bf16 autocast (the
    backbone's Linear layers output bf16), the MFU is taken against a bf16 matmul peak, and metrics.json records it."""
    from ttds import runtime
    from ttds.train import engine, generative
    from ttds.train import loop as loop_mod

    monkeypatch.setattr(runtime, "has_fast_bf16", lambda device: True)
    peaks, real_peak = [], engine.dense_peak_flops
    monkeypatch.setattr(loop_mod, "dense_peak_flops", lambda **kw: (peaks.append(kw.get("dtype")), real_peak(n=128, **kw))[1])
    seen, real_linear = [], torch.nn.Linear.forward

    def linear(self, x):
        y = real_linear(self, x)
        if torch.is_grad_enabled():  # training steps (validation runs under no_grad)
            seen.append(y.dtype)
        return y

    monkeypatch.setattr(torch.nn.Linear, "forward", linear)
    ds = load_dataset("builtin:users=40,items=30,seed=2")
    m = generative.train(_cfg(bb_dir, ["train.max_steps=2", "train.precision=auto", "eval.template_mean_users=-1"]), ds, tmp_path / "a")
    assert torch.bfloat16 in seen
    assert peaks == [torch.bfloat16] and m["precision"]["train"] == "bf16"


def test_cli_train_and_eval_end_to_end(bb_dir, tmp_path, monkeypatch):
    import ttds.serve.engine as serve_engine
    from ttds.errors import TTDSError
    from ttds.train.commands import eval_model, train_model

    sets = [f"backbone.name_or_path={bb_dir}", "index.source=random", "index.user_source=random", "index.options.levels=2",
            "index.options.codebook_size=8", "train.batch_size=8", "train.valid_users=20", "eval.template_mean_users=10",
            "eval.beam=10", "threads=1", "train.epochs=1", "tasks.review=0.2", "tasks.userpred=0.2",
            "eval.precision=fp32"]  # the default `auto` would depend on the machine's bf16 units
    metrics, out = train_model("ttss", "builtin:users=40,items=30,seed=2", tmp_path / "run", overrides=sets)
    for k in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"):
        assert 0 <= metrics["test"][k] <= 1
    assert metrics["test_template_mean"]["templates"] == len(templates.SEQREC)
    assert 0 < metrics["mfu"] < 1 and metrics["train_flops_per_token"] > 0  # per CPU-second on both sides
    for f in ("model.safetensors", "last.safetensors", "index.item.json", "index.user.json", "config.yaml", "run.log", "tokenizer"):
        assert (out / f).exists(), f
    r = eval_model(out, "builtin:users=40,items=30,seed=2")
    assert r["metrics"]["NDCG@10"] == pytest.approx(metrics["test"]["NDCG@10"])
    # per-user ranks from training's test and from `ttds eval`: the same model gives every user the same rank
    from ttds.eval.compare import compare, load_ranks

    same = compare([out], [out / "eval-builtin-test.ranks.safetensors"], ("NDCG@10", "HR@1"))["pairs"][0]["metrics"]
    assert same["NDCG@10"]["b_ahead"] == same["NDCG@10"]["b_behind"] == 0 and same["HR@1"]["n"] == 40
    assert load_ranks(out)["k"] == 10
    assert r["seen_items"] == "keep"
    # `ttds eval --set eval.seen_items=auto`: the built-in data never repeats an item -> the model excludes history
    r = eval_model(out, "builtin:users=40,items=30,seed=2", overrides=["eval.seen_items=auto"])
    assert r["seen_items"] == "exclude" and (out / "eval-builtin-test-exclude_seen.json").is_file()
    # `ttds eval --quantize int8`: the LM's Linear layers run in int8, and the result goes to its own file
    quantized, real = [], serve_engine.quantize_int8
    monkeypatch.setattr(serve_engine, "quantize_int8", lambda model: (quantized.append(model), real(model)))
    r = eval_model(out, "builtin:users=40,items=30,seed=2", quantize="int8")
    assert len(quantized) == 1 and any("quantized" in type(m).__module__ for m in quantized[0].backbone.body.modules())
    assert r["quantize"] == "int8" and 0 <= r["metrics"]["NDCG@10"] <= 1 and (out / "eval-builtin-test-int8.json").is_file()
    with pytest.raises(TTDSError, match="--quantize"):
        eval_model(out, "builtin:users=40,items=30,seed=2", quantize="fp8")
    # `ttds eval --set eval.precision=bf16`: beam search under bf16 autocast, recorded, in its own file
    assert metrics["precision"] == {"train": "fp32", "eval": "fp32"}
    r = eval_model(out, "builtin:users=40,items=30,seed=2", overrides=["eval.precision=bf16"])
    assert r["precision"] == "bf16" and 0 <= r["metrics"]["NDCG@10"] <= 1 and (out / "eval-builtin-test-bf16.json").is_file()
    r = eval_model(out, "builtin:users=40,items=30,seed=2", quantize="int8", overrides=["eval.precision=bf16"])
    assert r["precision"] == "fp32" and r["quantize"] == "int8"  # int8 layers take fp32 activations
    with pytest.raises(TTDSError, match=r"eval\.precision='half'"):
        eval_model(out, "builtin:users=40,items=30,seed=2", overrides=["eval.precision=half"])


def test_repeat_rate_counts_targets_within_the_history_window():
    from ttds.data.dataset import repeat_rate

    seqs = [np.array([1, 2, 1, 3]), np.array([4, 5, 6, 7, 4])]
    # targets: 2, 1 (repeat, 2 back), 3 | 5, 6, 7, 4 (repeat, 4 back)
    assert repeat_rate(seqs, 20) == pytest.approx(2 / 7)
    assert repeat_rate(seqs, 3) == pytest.approx(1 / 7)  # 4 is 4 items back: outside a 3-item window
    assert repeat_rate([np.array([1, 2, 3])], 20) == 0.0


def test_seen_items_auto_rule_and_bad_value():
    from ttds.data.dataset import RecDataset
    from ttds.errors import TTDSError
    from ttds.train.loop import resolve_seen_items

    no_repeats = load_dataset("builtin:users=40,items=30,seed=2")
    cfg = {"data": {"max_history": 20}, "eval": {"seen_items": "auto"}}
    assert resolve_seen_items(cfg, no_repeats) == "exclude" and cfg["eval"]["seen_items"] == "exclude"
    seqs = [np.array([0, 1, 0, 2, 3, 4]), np.array([1, 2, 3, 4, 0])]  # user 0 re-buys item 0 in training
    repeats = RecDataset("r", seqs, {}, ["0", "1"], [str(i) for i in range(5)])
    cfg = {"data": {"max_history": 20}, "eval": {"seen_items": "auto"}}
    assert resolve_seen_items(cfg, repeats) == "keep"
    assert resolve_seen_items({"data": {"max_history": 20}, "eval": {"seen_items": "keep"}}, no_repeats) == "keep"
    with pytest.raises(TTDSError, match="eval.seen_items"):
        resolve_seen_items({"data": {"max_history": 20}, "eval": {"seen_items": "never"}}, no_repeats)


def test_exclude_seen_never_recommends_history_and_matches_mask_seen(bb_dir):
    from ttds.data.dataset import EvalSet
    from ttds.eval.evaluator import evaluate_ranks

    torch.manual_seed(0)
    torch.set_num_threads(1)
    ds = load_dataset("builtin:users=12,items=30,seed=3")
    model = GenerativeRecommender(Backbone.load(BackboneConfig(name_or_path=str(bb_dir), causal=True)),
                                  random_index(ds.n_items, 2, 6, "item", 0), None).eval()
    model.beam = 10
    rng = np.random.default_rng(0)
    hist = np.stack([rng.choice(ds.n_items, 12, replace=False) for _ in range(12)])
    users = torch.arange(12)
    kept = model.recommend(users, torch.as_tensor(hist), k=10).numpy()
    assert sum(np.isin(r, h).sum() for r, h in zip(kept, hist)) > 0  # without the rule history items come out
    model.exclude_seen = True
    top = model.recommend(users, torch.as_tensor(hist), k=10).numpy()
    for r, h in zip(top, hist):
        assert not np.isin(r, h).any() and (r >= 0).all() and len(set(r.tolist())) == 10
    # the protocol's mask_seen on a list model gives the same ranks as the model's own rule
    targets = np.array([np.setdiff1d(np.arange(ds.n_items), h)[0] for h in hist])
    ev = EvalSet(users.numpy(), hist, targets)
    own = evaluate_ranks(model, ev, k=10, progress=False)
    model.exclude_seen = False
    masked = evaluate_ranks(model, ev, k=10, mask_seen=True, progress=False)
    assert (own == masked).all()


def test_ids_prompt_has_no_words(bb_dir):
    """`tasks.prompt: ids` (TIGER): a sequential prompt is BOS + the user's ID tokens (none without a user tower) + the
    history's ID tokens; training examples match; the text tasks keep their words."""
    from ttds.errors import TTDSError

    ds = load_dataset("builtin:users=30,items=40,seed=3")
    bb = Backbone.load(BackboneConfig(name_or_path=str(bb_dir), causal=True))
    items, users = random_index(ds.n_items, 2, 8, "item", 0), random_index(ds.n_users, 2, 8, "user", 1)
    for user_index in (users, None):
        model = GenerativeRecommender(bb, items, user_index, prompt="ids")
        V, bos = model.n_words, model.codec.bos
        p = model.codec.seqrec_prompt(3, [1, 2], 0)
        uid = [] if user_index is None else [t for t in model.codec.user_tokens[3].tolist() if t >= 0]  # -1: a short ID
        want = bos + uid + model.codec.items([1, 2]).tolist()
        assert p.tolist() == want and (p[len(bos):] >= V).all()
        ex = build_epoch(TaskData(ds, [s[:-2] for s in ds.sequences], model.codec, 5),
                         TaskConfig(seqrec=1.0, index2item=0.5, user_profile="all"), np.random.default_rng(0))
        seq = [e for e in ex if (e.tokens[e.target] >= V).all()]
        assert seq and all((e.tokens[len(bos):] >= V).all() for e in seq)  # no word in any sequential example
        assert any((e.tokens[e.target] < V).all() for e in ex)  # index2item answers are words
    words = GenerativeRecommender(bb, items, users).codec.seqrec_prompt(3, [1, 2], 0)
    assert (words[len(bos):] < V).sum() > 5  # the default instruction prompt has words
    with pytest.raises(TTDSError, match="tasks.prompt='text'"):
        TaskConfig(prompt="text")


def test_tiger_trains_from_scratch_on_ids_and_reloads(bb_dir, tmp_path):
    """`--model tiger`: a scratch backbone (`backbone.arch`) on ID-only prompts, its index fitted on a pretrained
    encoder's embeddings (`index.options.encoder`); `ttds eval` reloads the trained weights and ranks the same."""
    from ttds.recipes import run_config
    from ttds.train.commands import eval_model, train_model

    sets = [f"backbone.name_or_path={bb_dir}", "backbone.arch.hidden_size=16", "backbone.arch.num_hidden_layers=1",
            "backbone.arch.num_attention_heads=2", "backbone.arch.intermediate_size=32", f"index.options.encoder={bb_dir}",
            "index.options.levels=2", "index.options.codebook_size=8", "index.options.rqvae.max_steps=20",
            "train.batch_size=8", "train.valid_users=20", "train.max_steps=12", "train.eval_steps=6", "eval.beam=10",
            "threads=1", "eval.precision=fp32"]
    metrics, out = train_model("tiger", "builtin:users=40,items=30,seed=2", tmp_path / "run", overrides=sets)
    cfg = run_config(out)
    assert cfg["backbone"]["init"] == "scratch" and cfg["tasks"]["prompt"] == "ids"
    assert "test_template_mean" not in metrics  # one template: its mean would be the test row again
    assert metrics["train_flops_per_token"] > 0 and 0 <= metrics["test"]["NDCG@10"] <= 1
    r = eval_model(out, "builtin:users=40,items=30,seed=2")
    assert r["metrics"]["NDCG@10"] == pytest.approx(metrics["test"]["NDCG@10"])
