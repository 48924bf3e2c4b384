"""Distributed training and sharded inference (ttds.dist) with 2 gloo processes on this machine.

- `torchrun -m ttds train` with 2 processes = one process with the same global batch (weights after N steps),
  and a resume of that run on ONE process equals the single-process run continued the same way;
- sharded evaluation = single-process evaluation, exactly (every user's rank, both model kinds);
- global-batch sharding covers every sample exactly once; the loss factors make DDP's mean the global mean;
- an index (re-)assigned differently on each rank is identical everywhere after `broadcast_index`.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = "builtin:users=120,items=60"
# dropout off: with it, ranks draw other masks than one process (correct, but not comparable)
SETS = ["train.batch_size=48", "model.dropout=0", "model.attn_dropout=0", "threads=1", "eval.batch_size=50"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if k.startswith("model.")}


def _train(out: Path, epochs: int):
    from ttds.train.commands import train_model

    return train_model("sasrec", DATA, out, None, SETS + [f"train.epochs={epochs}"])[0]


def test_ddp_training_matches_single_process_and_resumes_on_another_world_size(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    two = tmp_path / "two"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "ttds", "train", "--model", "sasrec",
           "--data", DATA, "--out", str(two)] + [a for s in SETS + ["train.epochs=2"] for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 1 of 2, backend gloo" in r.stderr
    assert r.stdout.count("run folder:") == 1 and r.stdout.count("sasrec test") == 1  # rank 0 prints the table

    one = tmp_path / "one"
    single = _train(one, 2)
    a, b = _model_tensors(one / "last.safetensors"), _model_tensors(two / "last.safetensors")
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-4, diff  # 2 epochs x 3 global batches of 48 windows: same path up to float sums
    st = json.loads((two / "state.json").read_text())
    assert st["step"] == 2 * 3 and st["epoch"] == 2  # global batches: the same number of steps as one process
    assert not [p for p in two.iterdir() if p.name.endswith(".tmp")]
    m2 = json.loads((two / "metrics.json").read_text())
    assert m2["test"]["n"] == single["test"]["n"] == 120  # every user evaluated once
    assert abs(m2["test"]["NDCG@10"] - single["test"]["NDCG@10"]) < 1e-3

    # resume the 2-process run on 1 process for one more epoch = the 1-process run continued the same way
    _train(two, 3)
    _train(one, 3)
    a, b = _model_tensors(one / "last.safetensors"), _model_tensors(two / "last.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert json.loads((two / "state.json").read_text())["step"] == 9


# ---------------------------------------------------------------- spawned workers (evaluation, sharding, index)


class _ListModel:
    """A recommend() model whose lists depend on the user and the history only (beam-search stand-in)."""

    def __init__(self, n_items: int):
        self.n_items = n_items

    def recommend(self, users, history, k):
        h = history.clamp(min=0).sum(1, keepdim=True)
        return (users.unsqueeze(1) * 7 + h + torch.arange(k)) % self.n_items


def _setup_models():
    from ttds.config import load_config
    from ttds.data.dataset import leave_one_out
    from ttds.data.readers import load_dataset
    from ttds.train.classic import build_model

    ds = load_dataset(DATA)
    cfg = load_config(model="sasrec", dataset=ds.name)
    torch.manual_seed(0)
    model = build_model(cfg, ds.n_items, ds.n_users).eval()
    return leave_one_out(ds, 20).valid, model, _ListModel(ds.n_items), ds


def _rank_index(seed: int):
    """A (re-)assignment that depends on the rank's random stream: RQ-like codes, LC-Rec Sinkhorn re-assignment."""
    from ttds.index.base import SemanticIndex, level_prefixes
    from ttds.index.collisions import resolve

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 4, (60, 3), generator=g).numpy()
    codes = resolve(codes, "lcrec", torch.rand(60, 4, generator=g))
    return SemanticIndex(codes, [4, 4, 4, int(codes[:, -1].max()) + 1], level_prefixes("item", 3, True), "item")


def _one_step(strategy: str):
    """One SGD step (lr 1: the update is the gradient) of SASRec on a fixed global batch of 10 windows (FSDP2 / DDP /
    one process). Not Adam: its first step divides each gradient by its own size, so float noise on near-zero
    gradients became weight differences of ~1e-5 (seen on an AVX-512 CPU); with SGD the weights compare the gradients."""
    from ttds import dist
    from ttds.config import load_config
    from ttds.train.classic import build_model

    cfg = load_config(model="sasrec", overrides=["model.dropout=0", "model.attn_dropout=0", f"dist.strategy={strategy.replace('manual', 'ddp')}"])
    torch.manual_seed(0)
    model = build_model(cfg, 60, 120)
    net = dist.wrap(model, cfg, fsdp=True) if strategy != "manual" else dist.Method(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # after wrapping: FSDP2 swaps in sharded parameters
    g = torch.Generator().manual_seed(1)
    seq, users = torch.randint(-1, 60, (10, 21), generator=g), torch.arange(10)
    counts = ((seq[:, 1:] >= 0) & (seq[:, :-1] >= 0)).sum(1).numpy()
    part, factor = dist.shard(np.arange(10), counts)
    (net(users[part], seq[part]) * factor).backward()
    if strategy == "manual":
        dist.average_gradients(model)  # no DDP: one all-reduce of every gradient
    opt.step()
    with dist.unsharded_params(net):
        scores = model.scores(users, seq[:, 1:])
    return {k: v.detach().numpy() for k, v in dist.full_state_dict(model).items()}, scores.numpy()


GEN_DATA = "builtin:users=40,items=30,seed=2"


def _gen_train(bb_dir: str, out: Path, max_steps: int = 3, strategy: str = "ddp") -> dict:
    """The generative recipe on a tiny dropout-free backbone: steps of 2 accumulated micro-batches of 8."""
    from ttds.config import load_config
    from ttds.data.readers import load_dataset
    from ttds.train import generative

    over = [f"backbone.name_or_path={bb_dir}", "index.source=random", "index.user_source=random", "index.options.levels=2",
            "index.options.codebook_size=8", "train.batch_size=8", "train.grad_accum=2", "train.warmup_steps=2",
            "train.valid_users=20", "train.lr=0.001", f"train.max_steps={max_steps}", "eval.template_mean_users=-1",
            "eval.beam=10", "eval.final_valid=false", "threads=1", f"dist.strategy={strategy}"]
    cfg = load_config(model="ttss", overrides=over)
    cfg["name"] = "ttss"
    return generative.train(cfg, load_dataset(GEN_DATA), out)


def _dyn_train(bb_dir: str, out: Path, strategy: str = "ddp") -> dict:
    """TTDS (recipe dynamic) on the tiny backbone: 1 warm-up step, then joint steps of 2 accumulated micro-batches,
    L_DM-VAE on 15 entities per tower (8 + 7 over 2 ranks), codes re-assigned (X re-encoded) every 2 steps."""
    from ttds.config import load_config
    from ttds.data.readers import load_dataset
    from ttds.train import dynamic

    over = [f"backbone.name_or_path={bb_dir}", "index.options.levels=2", "index.options.codebook_size=8",
            "index.options.rqvae.epochs=10", "index.options.rqvae.code_dim=16", "index.options.rqvae.hidden=[32]",
            "index.options.cache_embeddings=false", "index.options.max_text_tokens=24", "tasks.item2index=0",
            "tasks.index2item=0", "train.batch_size=8", "train.grad_accum=2", "train.warmup_steps=2", "train.valid_users=20",
            "train.lr=0.001", "train.max_steps=5", "train.eval_steps=5", "dynamic.warmup_steps=1", "dynamic.reassign_steps=2",
            "dynamic.reassign_margin=0",  # plain argmin: after 5 tiny steps a sticky margin may keep every code
            "loss.dm_batch=15", "eval.template_mean_users=-1", "eval.beam=10", "eval.final_valid=false", "threads=1",
            f"dist.strategy={strategy}"]
    cfg = load_config(model="ttds", overrides=over)
    cfg["name"] = "ttds"
    return dynamic.train(cfg, load_dataset(GEN_DATA), out)


def _dyn_worker(bb_dir: str, out: Path) -> dict:
    """The dynamic run on this rank, with every index synchronisation recorded (codes before and after)."""
    from ttds import dist

    real, seen = dist.sync_model_index, {"before": [], "after": []}

    def recording(model):
        seen["before"].append(np.concatenate([model.item_index.codes.ravel(), model.user_index.codes.ravel()]))
        real(model)
        seen["after"].append(np.concatenate([model.item_index.codes.ravel(), model.user_index.codes.ravel()]))

    dist.sync_model_index = recording
    try:
        m = _dyn_train(bb_dir, out)
    finally:
        dist.sync_model_index = real
    return {"dyn_test": np.asarray([m["test"]["NDCG@10"]]), "dyn_before": np.stack(seen["before"]),
            "dyn_after": np.stack(seen["after"])}


def _worker(r: int, port: int, out: str, bb_dir: str) -> None:
    os.environ.update(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from ttds import dist
    from ttds.eval.evaluator import evaluate, evaluate_ranks

    assert dist.init("gloo")
    valid, model, lists, ds = _setup_models()
    res = {}
    for bs in (7, 50, 1000):  # 18 batches (uneven), 3 batches (rank 1 gets one), 1 batch (rank 1 gets none)
        res[f"scores_{bs}"] = evaluate_ranks(model, valid, bs, progress=False)
        res[f"lists_{bs}"] = evaluate_ranks(lists, valid, bs, k=10, progress=False)
    m = evaluate(model, valid, 7, progress=False)
    res["metrics"] = np.asarray([m[k] for k in sorted(m) if "seconds" not in k])

    batches = [np.arange(s, min(s + 5, 23)) for s in range(0, 23, 5)] + [np.asarray([30])]
    counts = np.arange(40) % 4 + 1
    parts = [dist.shard(b, counts) for b in batches]
    res["parts"] = np.concatenate([p for p, f in parts if f > 0])
    res["factors"] = np.asarray([f for _, f in parts])

    idx = _rank_index(100 + r)  # diverges between ranks, as an unsynchronised re-assignment would
    res["before_same"] = np.asarray([dist.same_on_all_ranks(idx.codes)])
    res["own_codes"] = idx.codes
    synced = dist.broadcast_index(idx)
    res["after_same"] = np.asarray([dist.same_on_all_ranks(synced.codes)])
    res["codes"] = synced.codes
    res["level_sizes"] = np.asarray(synced.level_sizes)
    res["prefixes"] = np.asarray(synced.prefixes)
    res["loss"] = np.asarray([dist.mean(float(r + 1))])
    res["written"] = np.asarray([_precompute(model, ds, out + "/dist.db")["written"]])
    for strategy in ("fsdp", "ddp", "manual"):
        sd, scores = _one_step(strategy)
        res[f"{strategy}_scores"] = scores
        res.update({f"{strategy}:{k}": v for k, v in sd.items()})
    res["gen_test"] = np.asarray([_gen_train(bb_dir, Path(out) / "gen")["test"]["NDCG@10"]])
    # FSDP2 (dist.strategy=fsdp): 2 steps, stop, resume (full checkpoint tensors re-sharded) to 3
    _gen_train(bb_dir, Path(out) / "gen_fsdp", max_steps=2, strategy="fsdp")
    if dist.is_main():
        (Path(out) / "gen_fsdp" / "metrics.json").unlink()
    dist.barrier()
    res["fsdp_test"] = np.asarray([_gen_train(bb_dir, Path(out) / "gen_fsdp", max_steps=3, strategy="fsdp")["test"]["NDCG@10"]])
    res.update(_dyn_worker(bb_dir, Path(out) / "dyn"))
    _dyn_train(bb_dir, Path(out) / "dyn_fsdp", strategy="fsdp")  # warm-up freezing, re-assignment on sharded weights
    res["out"] = np.asarray(out)
    np.savez(Path(out) / f"rank{r}.npz", **res)
    torch.distributed.destroy_process_group()


def _precompute(model, ds, path: str) -> dict:
    from ttds.serve.engine import RecommenderEngine
    from ttds.serve.precompute import precompute
    from ttds.serve.store import open_store

    st = open_store(f"sqlite:///{path}")  # every rank opens the store, as `ttds precompute` does
    try:  # 120 users in rounds of 2 x 16: the last round leaves rank 1 with 12 users
        return precompute(RecommenderEngine(model, ds, "dist-test", max_history=20), st, k=10, batch_size=16, progress=False)
    finally:
        st.close()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from _generative_fixtures import tiny_backbone_dir

    out = tmp_path_factory.mktemp("dist")
    bb = tiny_backbone_dir(out, hidden=32)
    c = json.loads((bb / "config.json").read_text())  # dropout off: comparable with one process
    c.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (bb / "config.json").write_text(json.dumps(c))
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out), str(bb)), nprocs=2, join=True)
    return [dict(np.load(out / f"rank{r}.npz", allow_pickle=False)) for r in range(2)]


def test_sharded_evaluation_equals_single_process_exactly(spawned):
    from ttds.eval.evaluator import evaluate, evaluate_ranks

    valid, model, lists, ds = _setup_models()
    for bs in (7, 50, 1000):
        ref_s = evaluate_ranks(model, valid, bs, progress=False)
        ref_l = evaluate_ranks(lists, valid, bs, k=10, progress=False)
        for res in spawned:  # every rank holds every user's rank, in order, bit for bit
            assert np.array_equal(res[f"scores_{bs}"], ref_s)
            assert np.array_equal(res[f"lists_{bs}"], ref_l)
    assert len(ref_s) == len(valid) and (ref_l < 10).any() and (ref_s > 0).any()
    m = evaluate(model, valid, 7, progress=False)
    ref = np.asarray([m[k] for k in sorted(m) if "seconds" not in k])
    for res in spawned:
        assert np.array_equal(res["metrics"], ref)


def test_global_batch_sharding_covers_every_sample_once(spawned):
    parts = np.concatenate([spawned[0]["parts"], spawned[1]["parts"]])
    assert sorted(parts.tolist()) == list(range(23)) + [30]  # nothing lost, nothing twice
    counts = np.arange(40) % 4 + 1
    # factor_r = 2 * terms(part_r) / terms(batch): the mean over ranks of factor_r x (mean of part_r) is the
    # batch mean; the rank with an empty part (batch [30] has one sample) gets factor 0
    f = spawned[0]["factors"] + spawned[1]["factors"]
    assert np.allclose(f, 2.0)
    assert spawned[1]["factors"][-1] == 0.0
    b0 = np.arange(0, 5)
    assert np.isclose(spawned[0]["factors"][0], 2 * counts[b0[:3]].sum() / counts[b0].sum())
    assert spawned[0]["loss"][0] == spawned[1]["loss"][0] == 1.5


def test_index_reassignment_is_identical_on_every_rank(spawned):
    r0, r1 = spawned
    assert not r0["before_same"][0] and not np.array_equal(r0["own_codes"], r1["own_codes"])
    assert r0["after_same"][0] and r1["after_same"][0]
    assert np.array_equal(r0["codes"], r1["codes"]) and np.array_equal(r0["codes"], r0["own_codes"])
    assert np.array_equal(r0["level_sizes"], r1["level_sizes"]) and list(r1["prefixes"]) == ["a", "b", "c", "p"]
    assert len(np.unique(r1["codes"], axis=0)) == 60  # still a unique index


def test_one_process_is_unchanged(tmp_path):
    """Without torchrun every helper is the identity: one process trains and evaluates as before."""
    from ttds import dist

    assert not dist.active() and dist.world() == 1 and dist.is_main()
    b = np.arange(5)
    part, f = dist.shard(b, np.ones(5))
    assert part is not None and np.array_equal(part, b) and f == 1.0
    assert dist.shard_starts(10, 4) == [0, 4, 8]
    net = dist.wrap(torch.nn.Linear(2, 2), {})
    assert isinstance(net, dist.Method)


def test_sharded_precompute_fills_one_store_like_one_process(spawned, tmp_path):
    from ttds.serve.store import open_store

    _, model, _, ds = _setup_models()
    one = _precompute(model, ds, str(tmp_path / "one.db"))
    assert spawned[0]["written"][0] == spawned[1]["written"][0] == 120  # every rank counts the gathered rounds
    dist_store = open_store(f"sqlite:///{Path(spawned[0]['out'].item()) / 'dist.db'}")
    one_store = open_store(f"sqlite:///{tmp_path / 'one.db'}")
    try:
        assert dist_store.active() == one_store.active() == one["tag"]  # published, same version tag
        assert dist_store.count(one["tag"]) == 120
        for u in range(120):
            a, b = dist_store.get(u), one_store.get(u)
            assert a.items == b.items and np.allclose(a.scores, b.scores, atol=1e-5)
    finally:
        dist_store.close()
        one_store.close()


@pytest.fixture(scope="module")
def single_gen(spawned, tmp_path_factory):
    """The generative run of the workers, on one process."""
    out, folder = Path(spawned[0]["out"].item()), tmp_path_factory.mktemp("single_gen")
    return _gen_train(str(next(out.glob("tiny-bert-*"))), folder), folder


def _same_run(one: Path, two: Path, n_steps: int, rtol: float = 1e-5) -> None:
    """Two run folders took the same steps: the global loss of every step and the final weights agree. Reduction
    order differs between one process and two, so they agree to float rounding as training amplifies it: AdamW
    turns a gradient that is ~0 into a step of +-lr on rounding noise alone, so a few coordinates may differ by up
    to steps x lr (allowed for 0.1 % of the weights; a sharding or synchronisation error moves most of them)."""
    la = json.loads((one / "state.json").read_text())["losses"]
    lb = json.loads((two / "state.json").read_text())["losses"]
    assert len(la) == len(lb) == n_steps and np.allclose(la, lb, rtol=rtol), (la, lb)  # all-reduced global loss per step
    a, b = _model_tensors(one / "last.safetensors"), _model_tensors(two / "last.safetensors")
    assert a.keys() == b.keys()
    off = {k: (a[k].double() - b[k].double()).abs() for k in a}
    n_off = sum(int((d > 1e-4).sum()) for d in off.values())
    worst = max(off, key=lambda k: float(off[k].max()))
    lr = 1e-3  # train.lr, train.id_lr and dynamic.warmup_lr of these runs: a flipped step moves a weight by 2 lr at most
    assert n_off <= 1e-3 * sum(d.numel() for d in off.values()) and float(off[worst].max()) < 2 * lr * n_steps, \
        (two.name, n_off, worst, float(off[worst].max()))


def test_ddp_generative_recipe_matches_single_process(spawned, single_gen):
    """Whole-sequence teacher forcing with accumulation: same global batches, same losses and weights."""
    out = Path(spawned[0]["out"].item())
    single, folder = single_gen
    _same_run(folder, out / "gen", 3)
    for f in ("index.item.json", "index.user.json", "model.safetensors", "metrics.json", "tokenizer"):
        assert (out / "gen" / f).exists(), f
    assert spawned[0]["gen_test"][0] == spawned[1]["gen_test"][0]  # sharded beam-search test on both ranks
    assert abs(spawned[0]["gen_test"][0] - single["test"]["NDCG@10"]) < 0.05


def test_fsdp_generative_recipe_resumes_and_matches_single_process(spawned, single_gen):
    """dist.strategy=fsdp in the shared LM loop: 2 steps, stop, resume to 3 (the checkpoint holds full tensors, the
    optimizer state is re-sharded on load) = 3 steps on one process."""
    out = Path(spawned[0]["out"].item())
    single, folder = single_gen
    _same_run(folder, out / "gen_fsdp", 3)
    assert json.loads((out / "gen_fsdp" / "metrics.json").read_text())["world_size"] == 2
    assert spawned[0]["fsdp_test"][0] == spawned[1]["fsdp_test"][0]
    assert abs(spawned[0]["fsdp_test"][0] - single["test"]["NDCG@10"]) < 0.05


def test_ddp_dynamic_recipe_matches_single_process_and_keeps_one_index(spawned, tmp_path):
    """TTDS under torchrun: DDP over the whole model (backbone, ID head, both tokenizers), the DM-VAE term inside the
    synchronised forward on a shared entity sample, codes re-assigned at steps 2 and 4 and synchronised: the same
    losses, weights and codes as one process, and every rank holds the same index after every (re-)assignment."""
    out = Path(spawned[0]["out"].item())
    r0, r1 = spawned
    assert r0["dyn_after"].shape[0] == 3  # after the initial assignment and the 2 re-assignments
    assert np.array_equal(r0["dyn_after"], r1["dyn_after"])  # identical on both ranks ...
    assert np.array_equal(r0["dyn_after"], r0["dyn_before"])  # ... namely rank 0's codes
    assert not np.array_equal(r0["dyn_after"][0], r0["dyn_after"][-1])  # and the codes did move
    single = _dyn_train(str(next(out.glob("tiny-bert-*"))), tmp_path / "dyn")
    _same_run(tmp_path / "dyn", out / "dyn", 5, rtol=1e-4)  # as dm_losses: the tokenizers' steps amplify rounding
    sa, sb = (json.loads((d / "state.json").read_text()) for d in (tmp_path / "dyn", out / "dyn"))
    assert np.allclose(sa["dm_losses"], sb["dm_losses"], rtol=1e-4, atol=1e-6) and sa["dm_losses"][0][0] > 0
    assert [r["step"] for r in sb["reassign"]] == [2, 4]
    assert [(r["item"], r["user"]) for r in sa["reassign"]] == [(r["item"], r["user"]) for r in sb["reassign"]]
    a, b = (_model_tensors(d / "last.safetensors") for d in (tmp_path / "dyn", out / "dyn"))
    assert torch.equal(a["model.item_codes"], b["model.item_codes"]) and torch.equal(a["model.user_codes"], b["model.user_codes"])
    assert abs(r0["dyn_test"][0] - single["test"]["NDCG@10"]) < 0.05 and r0["dyn_test"][0] == r1["dyn_test"][0]
    # the same run with dist.strategy=fsdp (FSDP2: backbone blocks and the rest sharded over the 2 ranks)
    _same_run(tmp_path / "dyn", out / "dyn_fsdp", 5, rtol=1e-4)
    c = _model_tensors(out / "dyn_fsdp" / "last.safetensors")
    assert torch.equal(a["model.item_codes"], c["model.item_codes"]) and torch.equal(a["model.user_codes"], c["model.user_codes"])


def test_fsdp_and_ddp_step_equal_one_process(spawned):
    """dist.strategy=fsdp (FSDP2 fully_shard, parameters sharded over 2 ranks), ddp, and average_gradients without
    a wrapper: one step = one process."""
    sd, scores = _one_step("ddp")
    for strategy in ("fsdp", "ddp", "manual"):
        for res in spawned:
            assert np.allclose(res[f"{strategy}_scores"], scores, atol=1e-5)
            for k, v in sd.items():
                assert np.allclose(res[f"{strategy}:{k}"], v, atol=1e-6), (strategy, k)


def test_fsdp_refused_by_recipes_that_do_not_support_it(monkeypatch):
    from ttds import dist
    from ttds.errors import TTDSError

    monkeypatch.setattr(dist, "active", lambda: True)  # as under torchrun
    with pytest.raises(TTDSError, match="dist.strategy=fsdp: recipe 'classic'"):
        dist.wrap(torch.nn.Linear(2, 2), {"dist": {"strategy": "fsdp"}, "recipe": "classic"})
