"""Hypothesis-driven fuzz of the serving API: arbitrary paths, queries and bodies never give a 5xx,
every error is JSON naming a field, and every 200 answer is a valid recommendation list."""
from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_serve import DATA, make_engine
from ttds.data.readers import load_dataset
from ttds.serve.app import create_app
from ttds.serve.precompute import precompute
from ttds.serve.store import open_store

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c, max_size=5),
    max_leaves=15,
)
ids = st.integers(-3, 90) | st.integers(-(2**70), 2**70) | st.text(max_size=4) | st.floats(allow_nan=False) | st.booleans()
rec_bodies = st.fixed_dictionaries(
    {"history": st.lists(ids, max_size=8)},
    optional={"k": ids, "user_text": st.none() | st.text(max_size=30), "extra": json_values},
)
item_bodies = st.fixed_dictionaries(
    {}, optional={"title": st.text(max_size=30) | json_values, "description": st.text(max_size=30), "brand": json_values}
)
segments = st.integers(-(2**70), 2**70).map(str) | st.text(max_size=12)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    ds = load_dataset(DATA)
    eng = make_engine(ds)
    st_ = open_store(f"sqlite:///{tmp_path_factory.mktemp('fuzz')}/c.db")
    precompute(eng, st_, k=10, progress=False)
    with TestClient(create_app(eng, st_), raise_server_exceptions=False) as c:
        yield c, eng
    st_.close()


def check(r, eng, history=None):
    assert r.status_code < 500, (r.status_code, r.text)
    body = r.json()
    if r.status_code >= 400:
        assert set(body) == {"error", "field"} and isinstance(body["error"], str) and body["error"]
    elif "items" in body:
        got = [x["item_id"] for x in body["items"]]
        assert len(got) == len(set(got)) <= body["k"]
        assert all(0 <= i < eng.n_items for i in got)
        assert not set(got) & set(history or [])


@FUZZ
@given(user=segments, k=segments | st.integers(-5, 120).map(str))
def test_fuzz_get_user(client, user, k):
    c, eng = client
    r = c.get(f"/v1/users/{quote(user, safe='')}/recommendations", params={"k": k})
    hist = eng.user_history(int(user)) if r.status_code == 200 else None
    check(r, eng, hist)


@FUZZ
@given(body=rec_bodies | json_values)
def test_fuzz_post_recommendations(client, body):
    c, eng = client
    r = c.post("/v1/recommendations", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    check(r, eng, body.get("history") if r.status_code == 200 else None)


@FUZZ
@given(raw=st.binary(max_size=64), path=st.sampled_from(["/v1/recommendations", "/v1/items"]))
def test_fuzz_raw_bodies(client, raw, path):
    c, eng = client
    check(c.post(path, content=raw, headers={"content-type": "application/json"}), eng)


@FUZZ
@given(body=item_bodies, item=segments)
def test_fuzz_items(client, body, item):
    c, eng = client
    r = c.post("/v1/items", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    check(r, eng)
    if r.status_code == 201:
        assert c.get(f"/v1/items/{r.json()['item_id']}").json()["tokens"] == r.json()["tokens"]
    check(c.get(f"/v1/items/{quote(item, safe='')}"), eng)
