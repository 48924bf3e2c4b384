"""Serving: stores (SQLite, Redis), resumable pre-compute, the API (TestClient and a real uvicorn).

The model served here is a tiny real content-based recommender defined below (hashed bag-of-words item
vectors, semantic IDs from random hyperplanes + TTDS disambiguation), so that new items can be added
online; the CLI tests serve a real SASRec trained for two epochs.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from ttds.data.dataset import TEXT_FIELDS
from ttds.data.readers import load_dataset
from ttds.index.base import SemanticIndex
from ttds.index.collisions import assign_new_id
from ttds.serve.engine import RecommenderEngine

from fastapi.testclient import TestClient
from ttds.serve.app import create_app
from ttds.serve.precompute import precompute, version_tag
from ttds.serve.store import Entry, open_store

DATA = "builtin:users=60,items=80,seed=3"


class TinyTextModel:
    """Items = L2-normalised hashed bag-of-words of their text; a user = the sum of their history's vectors;
    score = dot product. Semantic ID = 2 levels x 3 sign bits of random projections + a disambiguation code."""

    def __init__(self, item_text: dict[str, list[str]], dim: int = 48, seed: int = 0):
        self.dim = dim
        self.planes = torch.randn(dim, 6, generator=torch.Generator().manual_seed(seed))
        n = len(item_text["title"])
        self.vecs = torch.stack([self.embed({f: item_text[f][i] for f in TEXT_FIELDS}) for i in range(n)])
        index = SemanticIndex(np.zeros((0, 3), np.int64), [8, 8, 1], ["a", "b", "p"])
        for v in self.vecs:  # the same collision rule for the initial catalogue as for new items
            codes, sizes = assign_new_id(index, self.base_codes(v))
            index = SemanticIndex(codes, sizes, index.prefixes)
        self.index = index
        self.n_items = n

    def embed(self, fields: dict[str, str]) -> torch.Tensor:
        v = torch.zeros(self.dim)
        for w in " ".join(fields[f] for f in TEXT_FIELDS).lower().split():
            v[zlib.crc32(w.encode()) % self.dim] += 1.0
        return v / v.norm().clamp(min=1e-6)

    def base_codes(self, v: torch.Tensor) -> list[int]:
        bits = (v @ self.planes > 0).long().tolist()
        return [bits[0] * 4 + bits[1] * 2 + bits[2], bits[3] * 4 + bits[4] * 2 + bits[5]]

    def scores(self, users, history):
        h = self.vecs[history.clamp(min=0)] * (history >= 0).unsqueeze(-1)
        return h.sum(1) @ self.vecs.t()

    def add_item(self, fields: dict[str, str]) -> int:
        v = self.embed(fields)
        codes, sizes = assign_new_id(self.index, self.base_codes(v))
        self.index = SemanticIndex(codes, sizes, self.index.prefixes)
        self.vecs = torch.cat([self.vecs, v[None]])
        self.n_items += 1
        return self.n_items - 1


class RankOnly:
    """The same model seen through `recommend` only (the generative models' interface)."""

    def __init__(self, inner):
        self.inner = inner
        self.n_items = inner.n_items

    def recommend(self, users, history, k):
        return torch.topk(self.inner.scores(users, history), k, dim=1).indices


@pytest.fixture(scope="module")
def ds():
    return load_dataset(DATA)


def make_engine(ds, version="tiny-1", **kw):
    return RecommenderEngine(TinyTextModel(ds.item_text), ds, version, max_history=20, **kw)


def exhaustive_top(engine, history, k):
    """Reference ranking computed here directly from the model's vectors."""
    m = engine.model
    s = (m.vecs[history[-engine.max_history:]].sum(0) @ m.vecs.t()).clone()  # the model sees the last N items
    s[history] = float("-inf")  # seen items are not recommended (fewer than k when few are left)
    top = torch.topk(s, k)
    return [int(i) for i, v in zip(top.indices, top.values) if v > float("-inf")]


# ------------------------------------------------------------------------------------------ redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url():
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    pytest.importorskip("redis")
    import redis

    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = redis.Redis(port=port)
    for _ in range(100):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(5)


_n = [0]


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        st = open_store(f"sqlite:///{tmp_path}/cache.db")
    else:
        _n[0] += 1
        st = open_store(request.getfixturevalue("redis_url") + f"?prefix=t{_n[0]}:")
    yield st
    st.close()


# ------------------------------------------------------------------------------------------ engine


def test_engine_matches_exhaustive_scoring_both_interfaces(ds):
    eng = make_engine(ds)
    rank = RecommenderEngine(RankOnly(eng.model), ds, "tiny-1")
    hists = [eng.user_history(u) for u in range(8)]
    a = eng.recommend_histories(hists, 7)
    b = rank.recommend_histories(hists, 7)
    for h, ra, rb in zip(hists, a, b):
        ref = exhaustive_top(eng, h, 7)
        assert [i for i, _ in ra] == ref
        assert [i for i, _ in rb] == ref  # recommend() path: history filtered, still k items
        assert all(s is None for _, s in rb) and all(isinstance(s, float) for _, s in ra)
        assert not set(ref) & set(h)


def test_short_rows_search_again_with_a_doubled_beam(ds):
    """A row that the seen-item filter leaves short of k is searched again with twice the beam, up to k + |seen|,
    not with k + |seen| at once (a long history would make every short row of the batch pay for it)."""
    eng = make_engine(ds)
    wants = []

    class Recorder(RankOnly):
        def recommend(self, users, history, k):
            wants.append(k)
            return super().recommend(users, history, k)

    rank = RecommenderEngine(Recorder(eng.model), ds, "tiny-1")
    h = eng.user_history(0)
    long_history = (h + [i for i in range(ds.n_items) if i not in h])[:40]  # 40 seen items
    got = rank.recommend_histories([long_history], 3)[0]
    assert [i for i, _ in got] == exhaustive_top(eng, long_history, 3)
    assert wants[0] == 3 and len(wants) > 1, wants
    assert all(b == min(2 * a, 3 + 40) for a, b in zip(wants, wants[1:])), wants


def test_assign_new_id_collisions():
    idx = SemanticIndex(np.array([[1, 2, 0], [1, 2, 1], [3, 0, 0]]), [4, 4, 2], ["a", "b", "p"])
    codes, sizes = assign_new_id(idx, [1, 2])
    assert codes[-1].tolist() == [1, 2, 2] and sizes == [4, 4, 3]
    codes, sizes = assign_new_id(idx, [0, 5])
    assert codes[-1].tolist() == [0, 5, 0] and sizes == [4, 6, 2]
    new = SemanticIndex(codes, sizes, idx.prefixes)
    assert new.is_unique()


# ------------------------------------------------------------------------------------------ stores


def test_store_versions_and_atomic_swap(store):
    e = lambda u, v: Entry(u, [u, u + 1], [1.0, 0.5], v, 100.0 + u)  # noqa: E731
    assert store.get(0) is None and store.active() is None
    store.begin("v1", "m1", 2, 4)
    store.put_many("v1", [e(u, "m1") for u in range(4)])
    assert store.get(0) is None  # not visible before publish
    store.publish("v1")
    got = store.get(3)
    assert (got.items, got.scores, got.model_version, got.created_at, got.k) == ([3, 4], [1.0, 0.5], "m1", 103.0, 2)
    # a second version being built is invisible until its pointer flip
    store.begin("v2", "m2", 2, 4)
    store.put_many("v2", [e(u, "m2") for u in range(2)])
    assert {store.get(u).model_version for u in range(4)} == {"m1"}
    store.put_many("v2", [e(u, "m2") for u in range(2, 4)])
    store.publish("v2")
    assert {store.get(u).model_version for u in range(4)} == {"m2"}
    assert store.get(99) is None
    # the previous version is kept for rollback, older ones are dropped
    store.begin("v3", "m3", 2, 4)
    store.put_many("v3", [e(u, "m3") for u in range(4)])
    store.publish("v3")
    assert {v.tag: v.state for v in store.versions()} == {"v2": "retired", "v3": "published"}
    with pytest.raises(Exception, match="active"):
        store.drop("v3")
    # re-opening with other settings is refused
    with pytest.raises(Exception, match="model_version"):
        store.begin("v3", "other", 2, 4)


def test_store_readers_never_see_a_mix(store):
    """Readers hammer the store while versions are built and swapped: every read is one whole version,
    and once a reader has seen version n it never sees an older one."""
    users = 20
    for v in range(1, 3):
        store.begin(f"v{v}", f"m{v}", 3, users)
        store.put_many(f"v{v}", [Entry(u, [v] * 3, [float(v)] * 3, f"m{v}", 0.0) for u in range(users)])
    store.publish("v1")
    stop, bad = threading.Event(), []

    def reader():
        last = 1
        while not stop.is_set():
            for u in range(users):
                got = store.get(u)
                ver = int(got.model_version[1:])
                if got.items != [ver] * 3 or ver < last:
                    bad.append((u, got))
                last = ver

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for v in range(3, 7):
        store.begin(f"v{v}", f"m{v}", 3, users)
        store.put_many(f"v{v}", [Entry(u, [v] * 3, [float(v)] * 3, f"m{v}", 0.0) for u in range(users)])
        store.publish(f"v{v}")
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join()
    assert not bad
    assert store.get(0).model_version == "m6"


def test_bad_store_urls(tmp_path):
    from ttds.errors import TTDSError

    for url in ("postgres://x", "sqlite:///", "redis://127.0.0.1:1/0"):
        with pytest.raises(TTDSError):
            open_store(url)
    with pytest.raises(TTDSError):
        open_store(f"sqlite:///{tmp_path}")  # a folder


# ------------------------------------------------------------------------------------------ pre-compute


def test_precompute_interrupted_then_resumed(ds, store):
    eng = make_engine(ds)
    calls = []

    def crash(n_done):
        calls.append(n_done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        precompute(eng, store, k=5, batch_size=8, progress=False, on_batch=crash)
    tag = version_tag(eng, 5)
    assert store.count(tag) == 24 and store.active() is None  # 3 batches committed, nothing published
    before = {u: store.version(tag) and None for u in range(0)}
    first = store.done_users(tag)
    # the entries written before the crash are kept as they are (not recomputed)
    stamps = {}
    store.publish(tag)
    for u in first:
        stamps[u] = store.get(u).created_at
    time.sleep(0.01)
    out = precompute(eng, store, k=5, batch_size=8, progress=False)
    assert out["written"] == ds.n_users - 24 and out["users"] == ds.n_users
    assert store.active() == tag and store.done_users(tag) == set(range(ds.n_users))
    for u in range(ds.n_users):
        got = store.get(u)
        assert got.items == exhaustive_top(eng, eng.user_history(u), 5)
        assert got.model_version == "tiny-1"
        if u in stamps:
            assert got.created_at == stamps[u]
    # a finished version: re-running writes nothing
    assert precompute(eng, store, k=5, batch_size=8, progress=False)["written"] == 0


def test_precompute_calls_the_model_on_users_of_similar_history_length(ds, tmp_path):
    """Users go longest (model-visible) history first, so each model call holds prompts of about one length;
    every user exactly once."""
    eng = make_engine(ds)
    eng.max_history = 12  # the built-in users have 6 to 36 items: capped at 12, mixed in id order
    calls = []
    inner = eng.recommend_histories

    def spy(histories, k, user_texts=None, users=None):
        calls.append((list(users), [min(len(h), eng.max_history) for h in histories]))
        return inner(histories, k, user_texts, users)

    eng.recommend_histories = spy
    st = open_store(f"sqlite:///{tmp_path}/c.db")
    precompute(eng, st, k=4, batch_size=8, progress=False)
    assert sorted(u for users, _ in calls for u in users) == list(range(ds.n_users))
    lengths = [n for _, ns in calls for n in ns]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]
    for u in range(ds.n_users):  # the order does not change anyone's list
        assert st.get(u).items == exhaustive_top(eng, eng.user_history(u), 4)


def test_precompute_new_model_swaps_atomically(ds, tmp_path):
    st = open_store(f"sqlite:///{tmp_path}/c.db")
    precompute(make_engine(ds, "tiny-1"), st, k=4, progress=False)
    other = make_engine(ds, "tiny-2")
    other.model.vecs = torch.roll(other.model.vecs, 1, dims=0)  # a different model
    seen = []
    precompute(other, st, k=4, batch_size=16, progress=False, on_batch=lambda n: seen.append(st.get(0).model_version))
    assert seen and set(seen) == {"tiny-1"}  # while the new cache is built, readers get the old one
    assert st.get(0).model_version == "tiny-2"


# ------------------------------------------------------------------------------------------ API


@pytest.fixture
def api(ds, tmp_path):
    eng = make_engine(ds)
    st = open_store(f"sqlite:///{tmp_path}/api.db")
    eng_users = list(range(ds.n_users))
    precompute(eng, st, k=10, progress=False)
    # drop two users from the cache to exercise the online fallback
    tag = st.active()
    with st._tx(write=True) as c:
        c.execute(f"DELETE FROM recs_{tag} WHERE user IN (5, 6)")
    client = TestClient(create_app(eng, st), raise_server_exceptions=False)
    yield client, eng, st, eng_users
    client.close()
    st.close()


def test_api_user_recommendations_cache_and_fallback(api):
    client, eng, st, _ = api
    r = client.get("/v1/users/3/recommendations?k=4")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source"] == "cache" and body["model_version"] == "tiny-1" and body["user_id"] == 3
    assert [x["item_id"] for x in body["items"]] == exhaustive_top(eng, eng.user_history(3), 4)
    assert body["items"][0]["title"] == eng.item_fields(body["items"][0]["item_id"])["title"]
    r = client.get("/v1/users/5/recommendations")  # not cached
    assert r.status_code == 200 and r.json()["source"] == "online"
    assert [x["item_id"] for x in r.json()["items"]] == exhaustive_top(eng, eng.user_history(5), 10)
    r = client.get("/v1/users/3/recommendations?k=25")  # more than cached: online
    assert r.json()["source"] == "online" and len(r.json()["items"]) == 25
    m = client.get("/metrics").text
    assert 'ttds_cache_lookups_total{result="hit"} 1.0' in m
    assert 'ttds_cache_lookups_total{result="miss"} 2.0' in m
    assert "ttds_cache_hit_ratio 0.333" in m
    assert 'ttds_http_request_duration_seconds_bucket{le="0.005",route="/v1/users/{user_id}/recommendations"}' in m
    assert 'ttds_http_requests_total{method="GET",route="/v1/users/{user_id}/recommendations",status="200"} 3.0' in m


def test_api_online_and_new_items(api):
    client, eng, _, _ = api
    hist = [1, 2, 3]
    r = client.post("/v1/recommendations", json={"history": hist, "k": 5, "user_text": "likes games"})
    assert r.status_code == 200, r.text
    assert [x["item_id"] for x in r.json()["items"]] == exhaustive_top(eng, hist, 5)
    assert r.json()["user_id"] is None and r.json()["source"] == "online"
    # a new item whose text repeats the history's items is recommended first, at once
    n = eng.n_items
    text = " ".join(eng.item_fields(i)["title"] for i in hist)
    r = client.post("/v1/items", json={"title": text, "brand": "Acme"})
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["item_id"] == n and new["brand"] == "Acme" and len(new["tokens"]) == 3
    assert all(t.startswith(p) for t, p in zip(new["tokens"], ("<a_", "<b_", "<p_")))
    assert eng.model.index.is_unique()
    got = client.get(f"/v1/items/{n}").json()
    assert got["tokens"] == new["tokens"] and got["title"] == text
    r = client.post("/v1/recommendations", json={"history": hist, "k": 5})
    assert r.json()["items"][0]["item_id"] == n
    # the same text twice collides on its base codes and gets the next disambiguation code
    again = client.post("/v1/items", json={"title": text}).json()
    assert again["tokens"][:2] == new["tokens"][:2] and again["tokens"][2] != new["tokens"][2]
    r = client.post("/v1/recommendations", json={"history": [n], "k": 3})
    assert r.status_code == 200 and r.json()["items"][0]["item_id"] == n + 1
    assert client.get("/v1/items/0").json()["tokens"] == eng.model.index.tokens(0)


def test_api_health_schema_and_fixed_vocabulary(api, ds):
    client, eng, st, _ = api
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["n_items"] == eng.n_items and h["cache"]["active"] == st.active()
    schema = client.get("/openapi.json").json()
    assert {"/v1/users/{user_id}/recommendations", "/v1/recommendations", "/v1/items", "/v1/items/{item_id}", "/healthz", "/metrics"} <= set(schema["paths"])
    fixed = TestClient(create_app(RecommenderEngine(RankOnly(TinyTextModel(ds.item_text)), ds, "rank"), None))
    r = fixed.post("/v1/items", json={"title": "x"})
    assert r.status_code == 409 and "fixed item vocabulary" in r.json()["error"]
    assert fixed.get("/v1/users/1/recommendations?k=3").json()["source"] == "online"  # no store at all


@pytest.mark.parametrize("method,url,body,status,field", [
    ("get", "/v1/users/999/recommendations", None, 404, "user_id"),
    ("get", "/v1/users/-1/recommendations", None, 404, "user_id"),
    ("get", "/v1/users/abc/recommendations", None, 422, "user_id"),
    ("get", "/v1/users/1/recommendations?k=0", None, 422, "k"),
    ("get", "/v1/users/1/recommendations?k=101", None, 422, "k"),
    ("get", "/v1/users/1/recommendations?k=90", None, 422, "k"),  # more than the 80 items
    ("get", "/v1/users/1/recommendations?k=x", None, 422, "k"),
    ("get", "/v1/items/80", None, 404, "item_id"),
    ("get", "/v1/items/1.5", None, 422, "item_id"),
    ("post", "/v1/recommendations", b"{not json", 400, "body"),
    ("post", "/v1/recommendations", b"", 422, "body"),
    ("post", "/v1/recommendations", {"history": []}, 422, "history"),
    ("post", "/v1/recommendations", {"history": [1, 80]}, 422, "history[1]"),
    ("post", "/v1/recommendations", {"history": [1, -1]}, 422, "history[1]"),
    ("post", "/v1/recommendations", {"history": [1, "2"]}, 422, "history[1]"),
    ("post", "/v1/recommendations", {"history": [1], "k": 0}, 422, "k"),
    ("post", "/v1/recommendations", {"history": [1], "k": 1000}, 422, "k"),
    ("post", "/v1/recommendations", {"history": [1], "extra": 1}, 422, "extra"),
    ("post", "/v1/recommendations", [1, 2], 422, "body"),
    ("post", "/v1/recommendations", {"history": list(range(20000))}, 413, "body"),
    ("post", "/v1/items", {"title": "   "}, 422, "title"),
    ("post", "/v1/items", {"description": "no title"}, 422, "title"),
    ("post", "/v1/items", {"title": 5}, 422, "title"),
])
def test_api_bad_input(api, method, url, body, status, field):
    client = api[0]
    kw = {} if body is None else ({"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body})
    r = getattr(client, method)(url, **kw)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and r.json()["error"]


def test_api_oversized_chunked_body(api):
    client = api[0]

    def chunks():
        yield b'{"history": ['
        for _ in range(40):
            yield b"1," * 1000
        yield b"1]}"

    r = client.post("/v1/recommendations", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"
    assert client.get("/nope").status_code == 404 and client.delete("/healthz").status_code == 405


# ------------------------------------------------------------------------------------------ a real uvicorn


def test_real_uvicorn_concurrent_requests(ds, redis_url):
    import httpx
    import uvicorn

    eng = make_engine(ds)
    st = open_store(redis_url + "?prefix=uv:")
    precompute(eng, st, k=10, progress=False)
    app = create_app(eng, st, max_wait_ms=5.0)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.02)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as c:
            assert c.get("/healthz").json()["cache"]["store"].startswith("redis://")
            r = c.get("/v1/users/7/recommendations?k=5").json()
            assert r["source"] == "cache" and [x["item_id"] for x in r["items"]] == exhaustive_top(eng, eng.user_history(7), 5)
            hists = [eng.user_history(u)[:3] for u in range(24)]

            def ask(h):
                return c.post("/v1/recommendations", json={"history": h, "k": 6})

            with ThreadPoolExecutor(8) as pool:  # concurrent online requests, batched on one model thread
                results = list(pool.map(ask, hists))
            for h, r in zip(hists, results):
                assert r.status_code == 200
                assert [x["item_id"] for x in r.json()["items"]] == exhaustive_top(eng, h, 6)
            new = c.post("/v1/items", json={"title": "brand new thing"}).json()
            assert c.get(f"/v1/items/{new['item_id']}").status_code == 200
            assert c.post("/v1/recommendations", content=b"[", headers={"content-type": "application/json"}).status_code == 400
            m = c.get("/metrics").text
            assert "ttds_online_batch_size_count" in m
    finally:
        server.should_exit = True
        th.join(10)
        st.close()


# ------------------------------------------------------------------------------------------ CLI with a real SASRec


@pytest.fixture(scope="module")
def sasrec_dir(tmp_path_factory):
    pytest.importorskip("ttds.recipes")
    from typer.testing import CliRunner

    from ttds.cli import app

    out = tmp_path_factory.mktemp("sasrec")
    r = CliRunner().invoke(app, ["train", "--model", "sasrec", "--data", DATA, "--out", str(out), "--set", "train.epochs=2"])
    assert r.exit_code == 0, r.output
    return out


def test_cli_precompute_and_serve_engine_with_sasrec(sasrec_dir, tmp_path, ds):
    from typer.testing import CliRunner

    from ttds.cli import app
    from ttds.serve.engine import load_engine

    url = f"sqlite:///{tmp_path}/s.db"
    r = CliRunner().invoke(app, ["precompute", "--model", str(sasrec_dir), "--data", DATA, "--k", "7", "--store", url, "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["users"] == ds.n_users
    eng = load_engine(sasrec_dir, DATA)
    st = open_store(url)
    got = st.get(4)
    assert got.model_version == eng.model_version and len(got.items) == 7
    assert [i for i, _ in eng.recommend_histories([eng.user_history(4)], 7)[0]] == got.items
    client = TestClient(create_app(eng, st))
    assert client.get("/v1/users/4/recommendations?k=7").json()["source"] == "cache"
    assert client.post("/v1/items", json={"title": "x"}).status_code == 409  # SASRec: fixed item vocabulary
    st.close()
    r = CliRunner().invoke(app, ["precompute", "--model", str(tmp_path / "none"), "--data", DATA, "--store", url])
    assert r.exit_code != 0


def test_cli_precompute_killed_then_resumed(sasrec_dir, tmp_path):
    """SIGKILL a real `ttds precompute` mid-run; the re-run keeps every committed user, loses and
    duplicates none, and publishes only when complete."""
    import os
    import signal
    import sqlite3
    import sys

    data = "builtin:users=1000,items=80,seed=3"  # same catalogue as the model, more users
    db = tmp_path / "kill.db"
    cmd = [sys.executable, "-m", "ttds", "precompute", "--model", str(sasrec_dir), "--data", data, "--k", "5",
           "--store", f"sqlite:///{db}", "--batch-size", "1", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def written() -> tuple[int, str | None]:
        try:
            with sqlite3.connect(db, timeout=5) as c:
                tables = [t for (t,) in c.execute("SELECT name FROM sqlite_master WHERE name LIKE 'recs_%'")]
                active = c.execute("SELECT tag FROM pointer").fetchone()
                return (c.execute(f"SELECT COUNT(*) FROM {tables[0]}").fetchone()[0] if tables else 0), active
        except sqlite3.Error:
            return 0, None

    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and written()[0] < 100:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    n_first, active = written()
    assert 100 <= n_first < 1000 and active is None, (n_first, active)
    st = open_store(f"sqlite:///{db}")
    tag = st.versions()[0].tag
    with st._tx() as c:
        before = dict(c.execute(f"SELECT user, entry FROM recs_{tag}"))
    cmd[cmd.index("--batch-size") + 1] = "64"  # the batch size may change between runs
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["users"] == 1000 and res["written"] == 1000 - len(before)
    assert st.active() == tag and st.done_users(tag) == set(range(1000))
    with st._tx() as c:
        after = dict(c.execute(f"SELECT user, entry FROM recs_{tag}"))
    assert all(after[u] == e for u, e in before.items())  # committed users were not recomputed
    st.close()
