"""The online API (FastAPI): cached and online recommendations, new items, health, Prometheus metrics.

    GET  /v1/users/{user_id}/recommendations?k=10   cache first, online generation when not cached
    POST /v1/recommendations                        {"history": [item ids], "k": 10, "user_text": "..."}
    POST /v1/items                                  {"title": "...", "description": "...", ...} -> semantic ID
    GET  /v1/items/{item_id}                        the item's text fields and ID tokens
    GET  /healthz, GET /metrics, GET /openapi.json (schema), GET /docs

Every error is JSON `{"error": message, "field": name or null}` with a 4xx status (bad input) or 503
(the model queue is saturated); user and item ids are the dataset's integer ids (0..n-1).
Model calls run on one worker thread in micro-batches (`ttds.serve.worker`), never interleaved.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from ttds.errors import TTDSError
from ttds.serve.engine import NewItemConflict, NewItemsUnsupported
from ttds.serve.worker import EngineWorker

log = logging.getLogger(__name__)

MAX_K = 100
MAX_HISTORY_ITEMS = 500


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        self.status, self.message, self.field = status, message, field


def _error(status: int, message: str, field: str | None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


# ------------------------------------------------------------------------------------------ schemas


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: list[StrictInt] = Field(..., min_length=1, max_length=MAX_HISTORY_ITEMS, description="Known item ids, oldest first.")
    k: StrictInt = Field(10, ge=1, le=MAX_K)
    user_text: str | None = Field(None, max_length=10_000, description="Optional user text (reviews, a query).")


class NewItemRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(..., min_length=1, max_length=2_000)
    description: str = Field("", max_length=20_000)
    brand: str = Field("", max_length=2_000)
    categories: str = Field("", max_length=2_000)


class RecItem(BaseModel):
    item_id: int
    score: float | None
    title: str


class Recommendations(BaseModel):
    user_id: int | None
    k: int
    source: str = Field(..., description="'cache' or 'online'")
    model_version: str
    created_at: float = Field(..., description="Unix time the list was computed.")
    items: list[RecItem]


class ItemOut(BaseModel):
    item_id: int
    tokens: list[str]
    title: str
    description: str
    brand: str
    categories: str


class ErrorOut(BaseModel):
    error: str
    field: str | None


ERRORS = {s: {"model": ErrorOut} for s in (400, 404, 409, 413, 422, 503)}


# ------------------------------------------------------------------------------------------ metrics


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("ttds_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=r)
        self.latency = Histogram(
            "ttds_http_request_duration_seconds", "Request latency", ["route"], registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.cache = Counter("ttds_cache_lookups_total", "Cache lookups on GET user recommendations", ["result"], registry=r)
        self.hit_ratio = Gauge("ttds_cache_hit_ratio", "Cache hits / lookups since start", registry=r)
        self.hit_ratio.set_function(self._ratio)
        self._hits = self._lookups = 0
        self.batch_size = Histogram("ttds_online_batch_size", "Histories per online model call", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64))
        self.batch_seconds = Histogram("ttds_online_batch_seconds", "Seconds per online model call", registry=r)

    def _ratio(self) -> float:
        return self._hits / self._lookups if self._lookups else 0.0

    def cache_lookup(self, hit: bool) -> None:
        self._lookups += 1
        self._hits += hit
        self.cache.labels("hit" if hit else "miss").inc()

    def on_batch(self, n: int, seconds: float) -> None:
        self.batch_size.observe(n)
        self.batch_seconds.observe(seconds)


class _Guard:
    """Pure ASGI middleware: rejects oversized bodies (413) and records request counts and latency."""

    def __init__(self, app, max_body: int, metrics: Metrics):
        self.app, self.max_body, self.metrics = app, max_body, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def send_wrapper(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                await _error(413, f"request body larger than {self.max_body} bytes", "body")(scope, receive, send_wrapper)
                return
            seen = [0]

            async def receive_limited():
                msg = await receive()
                if msg["type"] == "http.request":
                    seen[0] += len(msg.get("body", b""))
                    if seen[0] > self.max_body:  # a chunked body without Content-Length
                        raise HTTPException(413, f"request body larger than {self.max_body} bytes")
                return msg

            await self.app(scope, receive_limited, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], route, str(status[0] or 500)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


# ------------------------------------------------------------------------------------------ the app


def create_app(engine, store=None, max_body_bytes: int = 64 * 1024, max_batch: int = 32, max_wait_ms: float = 2.0, timeout_s: float = 60.0) -> FastAPI:
    metrics = Metrics()
    worker = EngineWorker(engine, max_batch, max_wait_ms, metrics.on_batch)

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    app = FastAPI(title="ttds", version="1", lifespan=lifespan, description=__doc__)
    app.state.engine, app.state.store, app.state.worker, app.state.metrics = engine, store, worker, metrics
    app.add_middleware(_Guard, max_body=max_body_bytes, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error(e.status, e.message, e.field)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return _error(400, f"malformed JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", "body")
        field = _field(tuple(err.get("loc", ())))
        return _error(422, f"{field}: {err.get('msg')}", field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "body" if e.status_code == 413 else None)

    async def run(fut, what: str):
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(503, f"{what}: the model queue did not answer within {timeout_s:.0f} s", None) from None
        except (NewItemsUnsupported, NewItemConflict) as e:
            raise ApiError(409, str(e), None) from None
        except TTDSError as e:
            raise ApiError(422, str(e), "body") from None

    def check_k(k: int) -> None:
        if k > engine.n_items:
            raise ApiError(422, f"k={k}: at most {engine.n_items} (the number of items)", "k")

    def items_out(recs) -> list[dict]:
        titles = engine.item_titles([i for i, _ in recs])
        return [{"item_id": i, "score": s, "title": t} for (i, s), t in zip(recs, titles)]

    @app.get("/v1/users/{user_id}/recommendations", response_model=Recommendations, responses=ERRORS)
    async def user_recommendations(user_id: int = Path(..., description="Dataset user id (0..n_users-1)"), k: int = Query(10, ge=1, le=MAX_K)):
        """The user's top-k from the pre-computed cache; generated online when the user is not cached."""
        if not 0 <= user_id < engine.n_users:
            raise ApiError(404, f"user_id {user_id}: unknown user (expected 0..{engine.n_users - 1})", "user_id")
        check_k(k)
        entry = None
        if store is not None:
            try:
                entry = await store.aget(user_id)  # SQLite: inline (~50 us); Redis: awaits the socket
            except Exception as e:  # a store outage degrades to online generation, never a 500
                log.warning("store %s: %s", getattr(store, "url", store), e)
        if entry is not None and entry.k >= k:
            metrics.cache_lookup(True)
            recs = list(zip(entry.items[:k], entry.scores[:k]))
            return {"user_id": user_id, "k": k, "source": "cache", "model_version": entry.model_version,
                    "created_at": entry.created_at, "items": items_out(recs)}
        metrics.cache_lookup(False)
        recs = await run(worker.recommend(engine.user_history(user_id), k, None, user_id), "recommendations")
        return {"user_id": user_id, "k": k, "source": "online", "model_version": engine.model_version,
                "created_at": time.time(), "items": items_out(recs)}

    @app.post("/v1/recommendations", response_model=Recommendations, responses=ERRORS)
    async def recommend(req: RecommendRequest):
        """Online generation from a history of known item ids (a new user or a fresh session)."""
        n = engine.n_items
        for j, i in enumerate(req.history):
            if not 0 <= i < n:
                raise ApiError(422, f"history[{j}]: unknown item id {i} (expected 0..{n - 1})", f"history[{j}]")
        check_k(req.k)
        recs = await run(worker.recommend(req.history, req.k, req.user_text, None), "recommendations")
        return {"user_id": None, "k": req.k, "source": "online", "model_version": engine.model_version,
                "created_at": time.time(), "items": items_out(recs)}

    @app.post("/v1/items", response_model=ItemOut, status_code=201, responses=ERRORS)
    async def add_item(req: NewItemRequest):
        """A new item from its text: the model's item tower assigns its semantic ID; it is recommendable at once."""
        fields = {k: v.strip() for k, v in req.model_dump().items()}
        if not fields["title"]:
            raise ApiError(422, "title: must not be blank", "title")
        item, tokens = await run(worker.call(lambda: engine.add_item(fields)), "new item")
        return {"item_id": item, "tokens": tokens, **engine.item_fields(item)}

    @app.get("/v1/items/{item_id}", response_model=ItemOut, responses=ERRORS)
    async def get_item(item_id: int = Path(..., description="Item id (0..n_items-1)")):
        """An item's text fields and semantic ID tokens."""
        if not 0 <= item_id < engine.n_items:
            raise ApiError(404, f"item_id {item_id}: unknown item (expected 0..{engine.n_items - 1})", "item_id")
        return {"item_id": item_id, "tokens": engine.item_tokens(item_id), **engine.item_fields(item_id)}

    @app.get("/healthz")
    async def healthz():
        """Liveness and what is being served."""
        cache: dict = {"store": getattr(store, "url", None), "active": None}
        if store is not None:
            try:
                cache["active"] = await run_in_threadpool(store.active)
            except Exception as e:
                cache["error"] = str(e)
        return {"status": "ok", "model_version": engine.model_version, "n_users": engine.n_users,
                "n_items": engine.n_items, "new_items": engine.supports_new_items, "cache": cache}

    @app.get("/metrics")
    async def prometheus():
        """Prometheus text format: request counts, latency histograms, cache hit ratio, batch sizes."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
