"""Classical baselines: each learns, SASRec beats random, checkpoints resume exactly, CLI end to end."""
import json

import numpy as np
import pytest
import torch

from ttds.config import load_config
from ttds.data.dataset import leave_one_out
from ttds.data.readers import load_dataset
from ttds.eval.evaluator import evaluate
from ttds.io import load_safetensors
from ttds.train import classic
from ttds.train.classic import build_model, prefixes, windows

MODELS = ["sasrec", "sasrec_bce", "gru4rec", "bert4rec", "caser", "hgn", "fmlp"]
TINY = "builtin:users=200,items=120,seed=3"


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_dataset(TINY)


def test_windows_cover_every_target_once():
    seqs = [np.arange(10, 17), np.array([1, 2]), np.array([5])]
    users, w = windows(seqs, 4)
    targets = sorted(int(t) for row in w for t, prev in zip(row[1:], row[:-1]) if t >= 0 and prev >= 0)
    assert targets == sorted(list(range(11, 17)) + [2])
    assert set(users.tolist()) == {0, 1}
    u, p = prefixes(seqs, 3)
    assert p.tolist()[:3] == [[-1, 10, 11], [10, 11, 12], [11, 12, 13]] and len(p) == 7


@pytest.mark.parametrize("name", MODELS)
def test_each_model_learns(name, tiny):
    cfg = load_config(model=name)
    split = leave_one_out(tiny, 20)
    torch.manual_seed(0)
    model = build_model(cfg, tiny.n_items, tiny.n_users)
    make = prefixes if model.train_mode == "last" else windows
    users, seqs = (torch.as_tensor(a) for a in make(split.train, 21))
    users, seqs = users[:128], seqs[:128]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def batch_loss():
        torch.manual_seed(1)  # same masks / negatives before and after
        model.eval()
        with torch.no_grad():
            return model.loss(users, seqs).item()

    before = batch_loss()
    model.train()
    for _ in range(25):
        loss = model.loss(users, seqs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = batch_loss()
    assert np.isfinite(after) and after < 0.9 * before, (name, before, after)
    s = model.eval().scores(torch.as_tensor(split.test.users[:4]), torch.as_tensor(split.test.history[:4]))
    assert s.shape == (4, tiny.n_items) and torch.isfinite(s).all()


class RandomScores:
    def __init__(self, n_items):
        self.n_items = n_items
        self.g = torch.Generator().manual_seed(0)

    def scores(self, users, history):
        return torch.rand(len(users), self.n_items, generator=self.g)


def test_sasrec_beats_random(tmp_path):
    ds = load_dataset("builtin:users=400,items=150,seed=1")
    cfg = load_config(model="sasrec", overrides=["train.epochs=8", "threads=1", "train.lr=0.005"])
    m = classic.train(cfg, ds, tmp_path / "run")
    rnd = evaluate(RandomScores(ds.n_items), leave_one_out(ds, 20).test, progress=False)
    assert m["test"]["NDCG@10"] > 2 * rnd["NDCG@10"], (m["test"], rnd)
    assert m["test"]["HR@10"] > 1.5 * rnd["HR@10"]
    assert (tmp_path / "run" / "model.safetensors").is_file() and m["best_epoch"] >= 1


def test_resume_continues_the_same_run(tmp_path, tiny):
    over = ["threads=1", "train.patience=100", "model.dropout=0.3"]
    straight = load_config(model="sasrec", overrides=over + ["train.epochs=3"])
    classic.train(straight, tiny, tmp_path / "a")
    first = load_config(model="sasrec", overrides=over + ["train.epochs=1"])
    m1 = classic.train(first, tiny, tmp_path / "b")
    assert m1["epochs"] == 1
    classic.train(straight, tiny, tmp_path / "b")  # same command with more epochs: resumes
    a = load_safetensors(tmp_path / "a" / "last.safetensors")
    b = load_safetensors(tmp_path / "b" / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if k != "rng.torch":
            torch.testing.assert_close(a[k], b[k], msg=k)
    sa = json.loads((tmp_path / "a" / "state.json").read_text())
    sb = json.loads((tmp_path / "b" / "state.json").read_text())
    assert sa["epoch"] == sb["epoch"] == 3 and sa["history"][-1]["valid"] == sb["history"][-1]["valid"]
    # a finished run is not retrained
    again = classic.train(straight, tiny, tmp_path / "a")
    assert again["epochs"] == 3


def run_cli(args):
    from ttds.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code


def test_cli_train_eval_bench(tmp_path, capsys):
    out = tmp_path / "run"
    data = "builtin:users=120,items=80"
    assert run_cli(["train", "--model", "gru4rec", "--data", data, "--out", str(out),
                    "--set", "train.epochs=1", "--set", "threads=1"]) in (0, None)
    assert "gru4rec test" in capsys.readouterr().out
    assert run_cli(["eval", "--model-dir", str(out), "--data", data, "--split", "valid"]) in (0, None)
    text = capsys.readouterr().out
    assert "HR@10" in text and "not masked" in text
    r = json.loads((out / "eval-builtin-valid.json").read_text())
    assert r["split"] == "valid" and 0 <= r["metrics"]["NDCG@10"] <= 1
    train_metrics = json.loads((out / "metrics.json").read_text())
    assert r["metrics"]["NDCG@10"] == pytest.approx(train_metrics["valid"]["NDCG@10"])
    # user mistakes: one line, exit code 2
    assert run_cli(["train", "--model", "nope", "--data", data, "--out", str(tmp_path / "x")]) == 2
    assert "known models" in capsys.readouterr().err
    assert run_cli(["eval", "--model-dir", str(tmp_path / "none"), "--data", data]) == 2
    # the harness, one cheap entry
    res = tmp_path / "results"
    assert run_cli(["bench", "classic", "--data", data, "--runs", str(tmp_path / "b"), "--results", str(res),
                    "--only", "HGN", "--set", "train.epochs=1", "--set", "threads=1"]) in (0, None)
    j = json.loads((res / "classic-builtin.json").read_text())
    assert [r["label"] for r in j["rows"]] == ["HGN"] and "peak_rss_mb" in j["rows"][0]
    assert "| HGN |" in (res / "classic-builtin.md").read_text()
    # over seeds: one run per seed, mean ± std in the table; a bad --seeds is one line, exit 2
    assert run_cli(["bench", "classic", "--data", data, "--runs", str(tmp_path / "b"), "--results", str(res), "--only", "HGN",
                    "--seeds", "1,2", "--set", "train.epochs=1", "--set", "threads=1"]) in (0, None)
    j = json.loads((res / "classic-builtin.json").read_text())
    assert [r["label"] for r in j["rows"]] == ["HGN", "HGN@1", "HGN@2"]
    assert j["rows"][1]["test"] != j["rows"][2]["test"]
    md = (res / "classic-builtin.md").read_text()
    assert "Over seeds" in md and "| HGN | 1, 2 | " in md and " ± " in md
    run2 = tmp_path / "b" / "classic-builtin" / "HGN-s2"
    assert (run2 / "metrics.json").is_file() and "seed: 2" in (run2 / "config.yaml").read_text()
    # every test evaluation keeps each user's rank: `ttds compare` pairs two runs user by user
    runs = [tmp_path / "b" / "classic-builtin" / f"HGN-s{s}" for s in (1, 2)]
    assert run_cli(["compare", str(runs[0]), str(runs[1]), "--metric", "NDCG@10", "--json", str(tmp_path / "c.json")]) in (0, None)
    text = capsys.readouterr().out
    c = json.loads((tmp_path / "c.json").read_text())["pairs"][0]["metrics"]["NDCG@10"]
    assert "HGN-s2 vs HGN-s1" in text and c["a"] == pytest.approx(j["rows"][1]["test"]["NDCG@10"])
    assert c["b"] == pytest.approx(j["rows"][2]["test"]["NDCG@10"])
    assert run_cli(["compare", str(runs[0]), str(runs[1]), "--metric", "NDCG"]) == 2
    assert "--metric 'NDCG': expected HR@k, NDCG@k or MRR" in capsys.readouterr().err
    assert run_cli(["bench", "classic", "--data", data, "--seeds", "4,x"]) == 2
    assert "--seeds '4,x': expected comma-separated integers" in capsys.readouterr().err


def test_stop_file_ends_the_run_gracefully(tmp_path, tiny):
    out = tmp_path / "run"
    out.mkdir()
    (out / "STOP").touch()
    cfg = load_config(model="hgn", overrides=["threads=1", "train.epochs=50"])
    m = classic.train(cfg, tiny, out)
    assert m["epochs"] == 1 and m["stopped"] == "budget" and "NDCG@10" in m["test"]
    assert m["valid"]["NDCG@10"] == pytest.approx(json.loads((out / "state.json").read_text())["best"])


@pytest.mark.parametrize("positions,consistent", [("start", True), ("end", False)])
def test_sasrec_window_positions_match_inference(positions, consistent, tiny):
    """With positions counted from the window's first item, the hidden state at every position of a
    training window equals the one inference computes from that prefix alone (the causal mask hides
    the rest); counting from the most recent item breaks this."""
    cfg = load_config(model="sasrec", overrides=[f"model.positions={positions}"])
    torch.manual_seed(0)
    model = build_model(cfg, tiny.n_items, tiny.n_users).eval()
    with torch.no_grad():
        for p in model.pos_emb.parameters():
            p.normal_(0, 1.0)  # make positions matter
        window = torch.tensor([[-1, -1, 4, 9, 2, 7, 30], [3, 5, 8, 13, 21, 34, 55]])
        h = model.encode(None, model.to_internal(window))
        for t in range(2, window.shape[1] - 1):  # (the last position agrees either way)
            alone = model.last_hidden(None, window[:, : t + 1])
            same = torch.allclose(h[:, t], alone, atol=1e-5)
            assert same == consistent, (positions, t)


@pytest.mark.parametrize("name", MODELS)
def test_left_padding_does_not_change_scores(name, tiny):
    """Histories are left-padded to different widths in training windows and at test time; the
    number of padding columns must not change a prediction (e.g. GRU4Rec's padding row is zero)."""
    torch.manual_seed(0)
    model = build_model(load_config(model=name), tiny.n_items, tiny.n_users).eval()
    users = torch.tensor([0, 1])
    short = torch.tensor([[-1, 4, 9, 2], [3, 5, 8, 13]])
    padded = torch.cat([torch.full((2, 6), -1), short], 1)
    torch.testing.assert_close(model.scores(users, padded), model.scores(users, short), atol=1e-5, rtol=1e-4)


def test_target_weights_make_every_target_count_the_same():
    from ttds.train.classic import length_batches, target_weights

    seqs = [np.arange(n) for n in [2, 2, 3, 3, 9, 12, 15, 21, 21, 21, 4, 5]]
    _, w = windows(seqs, 21)
    lengths = (w >= 0).sum(1)
    n_terms = lengths - 1
    batches = length_batches(lengths, 3, np.random.default_rng(0))
    scale = target_weights(n_terms, batches)
    per_target = [scale[b] / n_terms[idx].sum() for b, idx in enumerate(batches)]  # mean loss * scale
    assert np.allclose(per_target, per_target[0]) and np.isclose(scale.mean(), 1.0)
    assert scale.max() > 2 * scale.min()  # sorted batches do differ in targets


@pytest.mark.parametrize("name", ["sasrec", "sasrec_bce", "gru4rec", "caser", "hgn"])
def test_no_position_sees_the_items_after_it(name, tiny):
    """Every model trained on all positions of a window (train_mode "all"; FMLP-Rec trains on prefixes,
    BERT4Rec on masked items) predicts position t+1 from items <= t only: changing the later items must
    not change the state at t (a leak would inflate every metric, e.g. HGN's strong Instruments row)."""
    torch.manual_seed(0)
    model = build_model(load_config(model=name), tiny.n_items, tiny.n_users).eval()
    assert model.train_mode == "all"
    users = torch.tensor([0, 1])
    a = torch.tensor([[-1, 4, 9, 2, 7, 30, 11, 5], [3, 5, 8, 13, 21, 34, 55, 60]])
    b = a.clone()
    b[:, 5:] = torch.tensor([[70, 71, 72], [80, 81, 82]])
    with torch.no_grad():
        ha, hb = model.encode(users, model.to_internal(a)), model.encode(users, model.to_internal(b))
    torch.testing.assert_close(ha[:, :5], hb[:, :5], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ha[:, 5:], hb[:, 5:])


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_seen_bias_offsets_exactly_the_history_items(loss, tiny):
    """`model.seen_bias: true`: one learned scalar added to the scores of the items in the history
    (the window's items up to each position in training); it gets a gradient; off by default."""
    torch.manual_seed(0)
    assert build_model(load_config(model="sasrec"), tiny.n_items, tiny.n_users).seen_bias is None
    model = build_model(load_config(model="sasrec", overrides=["model.seen_bias=true", f"model.loss={loss}"]),
                        tiny.n_items, tiny.n_users).eval()
    users, hist = torch.tensor([0, 1]), torch.tensor([[-1, 4, 9, 2], [3, 5, 13, 3]])  # a repeat counts once
    before = model.scores(users, hist)
    with torch.no_grad():
        model.seen_bias.fill_(-2.0 / model.SEEN_BIAS_SCALE)
    diff = model.scores(users, hist) - before
    expect = torch.zeros_like(diff)
    expect[0, [4, 9, 2]] = expect[1, [3, 5, 13]] = -2.0
    torch.testing.assert_close(diff, expect)
    # training: a window's position t sees the items up to t only
    window = torch.tensor([[-1, 4, 9, 2, 7]])
    h = model.encode(users[:1], model.to_internal(window[:, :-1]))[0, 1:]  # positions of 4, 9, 2
    seen = torch.tensor([[4, -1, -1], [4, 9, -1], [4, 9, 2]])
    expect = torch.zeros(3, tiny.n_items)
    expect[0, 4] = expect[1, [4, 9]] = expect[2, [4, 9, 2]] = -2.0
    torch.testing.assert_close(model.logits(h, None, seen) - model.logits(h), expect)
    if loss == "ce":  # (BCE's one random negative rarely is a seen item)
        model.train().loss(users[:1], window).backward()
        assert model.seen_bias.grad is not None and model.seen_bias.grad.abs().item() > 0

def test_sasrec_untied_scores_against_its_own_output_table(tiny):
    """`model.tied: false` scores items against a separate output table: changing it changes scores,
    changing the input table's rows of items not in the history does not (tied: it does)."""
    users, hist = torch.tensor([0]), torch.tensor([[4, 9, 2]])
    for tied in (True, False):
        torch.manual_seed(0)
        model = build_model(load_config(model="sasrec", overrides=[f"model.tied={str(tied).lower()}"]), tiny.n_items,
                            tiny.n_users).eval()
        before = model.scores(users, hist)
        with torch.no_grad():
            model.item_emb.weight[1 + 50] += torch.randn(model.item_emb.weight.shape[1])  # item 50, not in the history: only its input row
        assert torch.allclose(model.scores(users, hist), before) != tied
        if not tied:
            with torch.no_grad():
                model.out_emb.weight[50] += torch.randn(model.out_emb.weight.shape[1])
            assert not torch.allclose(model.scores(users, hist)[:, 50], before[:, 50])


def test_bench_keeps_rows_written_by_a_concurrent_bench(tmp_path, monkeypatch):
    """Two `ttds bench` processes on the same suite and dataset: each merges its row into the rows on
    disk when it writes, so neither loses the other's (reading them only at the start lost rows)."""
    from ttds.bench import harness
    from ttds.io import read_json, write_json

    res = tmp_path / "results"
    path = res / "classic-builtin.json"

    def fake_row(label):
        t = {c: 0.1 for c in harness.COLUMNS}
        return {"label": label, "model": "x", "test": t, "valid": dict(t), "epochs": 1, "stopped": "patience",
                "train_seconds": 1.0, "peak_rss_mb": 1.0}

    def fake_entry(entry, data, run_dir, overrides, drop_short, label=""):
        # meanwhile, another bench process finishes HGN and writes its table
        write_json(path, {"rows": read_json(path)["rows"] + [fake_row("HGN")]} if path.is_file() else {"rows": [fake_row("HGN")]})
        return fake_row(label or entry.label)

    write_json(path, {"rows": [fake_row("Caser")]})
    monkeypatch.setattr(harness, "run_entry", fake_entry)
    harness.run_suite("classic", "builtin:users=60,items=40", tmp_path / "runs", res, [], ["SASRec"])
    labels = [r["label"] for r in read_json(path)["rows"]]
    assert labels == ["SASRec", "Caser", "HGN"]
    assert "| HGN |" in (res / "classic-builtin.md").read_text()


def test_demo_budgets_are_steps_not_minutes():
    """`make demo` must print the same table on a loaded machine: no wall-clock budget in its suite (a 2-minute
    cap stopped TTSS after 13 of 84 steps when the cores were shared); the generative models get 3 epochs."""
    from ttds.bench.suites import SUITES

    for e in SUITES["demo"]:
        assert not any(o.startswith(("train.max_minutes", "index.options.rqvae.max_minutes")) for o in e.overrides), e
    gen = [e for e in SUITES["demo"] if e.model in ("ttss", "ttds")]
    assert gen and all("train.epochs=3" in e.overrides for e in gen)
    assert [e.label for e in SUITES["demo"]] == ["SASRec", "TIGER", "TTSS", "TTDS"]
