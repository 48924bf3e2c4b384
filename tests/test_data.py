"""Data layer: built-in generator, readers, leave-one-out split, no-leak profile text, stats."""
import gzip
import json

import numpy as np
import pytest

from ttds.data.builtin import BuiltinConfig, generate
from ttds.data.dataset import PAD, leave_one_out, profile_text, training_user_text, user_texts
from ttds.data.readers import load_dataset, read_lcrec, write_lcrec
from ttds.data.stats import dataset_stats

SMALL = "builtin:users=120,items=80,seed=3"


def _same(a, b):
    assert a.n_users == b.n_users and a.n_items == b.n_items
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences))
    assert a.item_text == b.item_text
    assert a.user_ids == b.user_ids and a.item_ids == b.item_ids


def test_generator_is_deterministic_and_configurable():
    a, b = load_dataset(SMALL), load_dataset(SMALL)
    _same(a, b)
    assert [[(t.text, t.item) for t in u] for u in a.user_text] == [[(t.text, t.item) for t in u] for u in b.user_text]
    c = load_dataset("builtin:users=120,items=80,seed=4")
    assert any(not np.array_equal(x, y) for x, y in zip(a.sequences, c.sequences))
    assert (a.n_users, a.n_items) == (120, 80)


def test_generator_defaults_and_structure():
    ds = generate(BuiltinConfig(users=300, items=200))
    assert all(len(s) >= 5 for s in ds.sequences)
    assert all(len(set(s.tolist())) == len(s) for s in ds.sequences), "no repeats inside a sequence"
    assert all(ds.item_text[f][i] for f in ("title", "description", "brand", "categories") for i in range(ds.n_items))
    # every interaction has a review naming its item
    assert all([t.item for t in ds.user_text[u]] == ds.sequences[u].tolist() for u in range(ds.n_users))
    # text carries signal: consecutive items share a category far more often than random pairs
    cat = np.array([hash(c) for c in ds.item_text["categories"]])
    consecutive = np.mean([cat[s[i]] == cat[s[i + 1]] for s in ds.sequences for i in range(len(s) - 1)])
    rng = np.random.default_rng(0)
    random_pairs = np.mean(cat[rng.integers(ds.n_items, size=5000)] == cat[rng.integers(ds.n_items, size=5000)])
    assert consecutive > 3 * random_pairs


def test_leave_one_out_split():
    ds = load_dataset(SMALL)
    sp = leave_one_out(ds, max_history=4)
    for u, s in enumerate(ds.sequences):
        assert np.array_equal(sp.train[u], s[:-2])
        assert sp.valid.target[u] == s[-2] and sp.test.target[u] == s[-1]
        hist_v = sp.valid.history[u][sp.valid.history[u] != PAD]
        hist_t = sp.test.history[u][sp.test.history[u] != PAD]
        assert np.array_equal(hist_v, s[:-2][-4:]) and np.array_equal(hist_t, s[:-1][-4:])
        assert s[-2] not in hist_v and s[-1] not in hist_t
    assert sp.valid.history.shape == (ds.n_users, 4)


def test_profile_text_never_leaks_valid_or_test_items():
    ds = load_dataset(SMALL)
    # make every title unique so a leak is detectable
    ds.item_text["title"] = [f"title-{i:04d}" for i in range(ds.n_items)]
    ds.user_text = None
    for u, s in enumerate(ds.sequences):
        prof = profile_text(ds, u)
        assert f"title-{s[-1]:04d}" not in prof and f"title-{s[-2]:04d}" not in prof
        assert f"title-{s[-3]:04d}" in prof
        assert user_texts(ds, u) == [prof]


def test_training_user_text_drops_held_out_reviews():
    ds = load_dataset(SMALL)
    for u, s in enumerate(ds.sequences):
        kept = training_user_text(ds, u)
        assert {t.item for t in kept}.isdisjoint({int(s[-1]), int(s[-2])})
        assert len(kept) == len(s) - 2


def test_lcrec_round_trip(tmp_path):
    ds = load_dataset(SMALL)
    ds.index = {i: [f"<a_{i % 7}>", f"<b_{i}>"] for i in range(ds.n_items)}
    write_lcrec(ds, tmp_path / "small")
    back = read_lcrec(tmp_path / "small")
    _same(ds, back)
    assert back.index == ds.index
    assert [[(t.text, t.item) for t in u] for u in back.user_text] == [[(t.text, t.item) for t in u] for u in ds.user_text]
    assert not list((tmp_path / "small").glob("*.tmp")), "atomic writes leave no temp files"


def test_table_reader_csv_and_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    rows = [("u1", "i1", 3, "nice"), ("u1", "i2", 1, ""), ("u1", "i3", 2, "ok"), ("u2", "i3", 5, ""),
            ("u2", "i1", 4, ""), ("u2", "i2", 6, "meh")]
    inter = pd.DataFrame(rows, columns=["user", "item", "timestamp", "text"])
    items = pd.DataFrame({"item": ["i1", "i2", "i3"], "title": ["A", "B", "C"], "brand": ["x", "y", "z"]})
    (tmp_path / "csv").mkdir()
    inter.to_csv(tmp_path / "csv" / "interactions.csv", index=False)
    items.to_csv(tmp_path / "csv" / "items.csv", index=False)
    ds = load_dataset(tmp_path / "csv")
    assert ds.user_ids == ["u1", "u2"]
    assert [ds.item_ids[i] for i in ds.sequences[0]] == ["i2", "i3", "i1"]  # chronological
    assert [ds.item_ids[i] for i in ds.sequences[1]] == ["i1", "i3", "i2"]
    assert ds.item_text["title"] == ["A", "B", "C"] and ds.item_text["description"] == ["", "", ""]
    assert [(t.text, ds.item_ids[t.item]) for t in ds.user_text[0]] == [("ok", "i3"), ("nice", "i1")]
    pytest.importorskip("pyarrow")
    (tmp_path / "pq").mkdir()
    inter.to_parquet(tmp_path / "pq" / "interactions.parquet")
    items.to_parquet(tmp_path / "pq" / "items.parquet")
    ds2 = load_dataset(tmp_path / "pq")
    assert all(np.array_equal(a, b) for a, b in zip(ds.sequences, ds2.sequences))


def _write_amazon(folder, gz=True):
    rng = np.random.default_rng(0)
    reviews = []
    # 8 users x 6 items, everyone reviews 5-6 items -> survives 5-core; plus noise that must be filtered
    for u in range(8):
        for j, i in enumerate(rng.permutation(6)[: 5 + (u % 2)]):
            reviews.append({"reviewerID": f"R{u}", "asin": f"B{i:03d}", "unixReviewTime": 1000 + 10 * j + u,
                            "summary": "Good &amp; cheap", "reviewText": f"review {u}-{i}\nline"})
    reviews.append({"reviewerID": "R0", "asin": "B000", "unixReviewTime": 5, "summary": "dup earlier"})
    reviews.append({"reviewerID": "RX", "asin": "BRARE", "unixReviewTime": 1, "summary": "filtered"})
    meta = [{"asin": f"B{i:03d}", "title": f"Item &quot;{i}&quot;...", "description": ["Line one.", "Two"],
             "brand": "Acme", "category": ["Games", "Retro"]} for i in range(6)]
    meta.append({"asin": "BRARE", "title": "rare"})
    open_ = gzip.open if gz else open
    rp = folder / ("reviews.json.gz" if gz else "reviews.json")
    mp = folder / "meta.json"
    with open_(rp, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in reviews) + "\n")
    mp.write_text("\n".join(json.dumps(m) for m in meta) + "\n", encoding="utf-8")
    return rp, mp


def test_prepare_amazon(tmp_path, run_cli):
    rp, mp = _write_amazon(tmp_path)
    code, out, err = run_cli("data", "prepare-amazon", "--reviews", rp, "--meta", mp, "--out", tmp_path / "Toy")
    assert code == 0, err
    ds = read_lcrec(tmp_path / "Toy")
    assert ds.name == "Toy" and ds.n_items == 6 and ds.n_users == 8
    assert "BRARE" not in ds.item_ids and "RX" not in ds.user_ids
    assert ds.item_text["title"][0] == "Item 0."
    assert ds.item_text["description"][0] == "Line one. Two"
    assert ds.item_text["categories"][0] == "Games,Retro"
    u0 = ds.user_ids.index("R0")
    assert ds.item_ids[ds.sequences[u0][0]] == "B000", "the earliest duplicate review wins and sorts first"
    for u in range(ds.n_users):
        assert len(ds.user_text[u]) == len(ds.sequences[u])
    assert "Good & cheap" in ds.user_text[1][0].text


def test_stats_builtin_and_profile_note():
    ds = load_dataset(SMALL)
    st = dataset_stats(ds)
    assert (st["users"], st["items"], st["interactions"]) == (120, 80, ds.n_interactions)
    assert st["users_with_text"] == 1.0
    ds.user_text = None
    st = dataset_stats(ds)
    assert st["users_with_text"] == 0.0 and "profile" in st["user_text_source"]


def test_cli_stats(run_cli):
    code, out, err = run_cli("data", "stats", SMALL)
    assert code == 0, err
    assert "users" in out and "120" in out and "interactions" in out
    code, out, _ = run_cli("data", "stats", SMALL, "--json")
    assert json.loads(out)["items"] == 80


def test_cli_builtin_writes_lcrec(tmp_path, run_cli):
    code, out, err = run_cli("data", "builtin", "--out", tmp_path / "b", "--spec", SMALL)
    assert code == 0, err
    _same(read_lcrec(tmp_path / "b"), load_dataset(SMALL))
