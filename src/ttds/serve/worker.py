"""One thread owns the model: online requests are queued and run in micro-batches, never interleaved.

A request waits at most `max_wait_ms` for others to join its batch (up to `max_batch` histories);
the batch runs as one `recommend_histories` call with the largest k asked, and each caller gets its
own slice. Item insertion runs on the same thread, between batches, so it never overlaps generation.
The thread holds the model's inference region (`ttds.models.base.inference_region`) for its lifetime.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from ttds.errors import TTDSError
from ttds.models.base import inference_region

log = logging.getLogger(__name__)


@dataclass
class _Job:
    future: Future = field(default_factory=Future)
    history: list[int] | None = None  # a recommendation job ...
    k: int = 0
    user_text: str | None = None
    user: int | None = None
    call: object = None  # ... or any other engine call (a zero-argument function)


class EngineWorker:
    def __init__(self, engine, max_batch: int = 32, max_wait_ms: float = 2.0, on_batch=None):
        self.engine, self.max_batch, self.max_wait = engine, max_batch, max_wait_ms / 1000.0
        self.on_batch = on_batch  # callback(batch_size, seconds) for metrics
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ttds-engine", daemon=True)
        self._thread.start()

    def recommend(self, history: list[int], k: int, user_text: str | None = None, user: int | None = None) -> Future:
        job = _Job(history=list(history), k=k, user_text=user_text, user=user)
        self._q.put(job)
        return job.future

    def call(self, fn) -> Future:
        job = _Job(call=fn)
        self._q.put(job)
        return job.future

    def close(self, timeout: float = 5.0) -> None:
        self._q.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        # the thread's whole life is one inference region: a bf16 model casts its weights once, not per request
        with inference_region(getattr(self.engine, "model", None)):
            self._loop()

    def _loop(self) -> None:
        pending: _Job | None = None
        while True:
            job = pending or self._q.get()
            pending = None
            if job is None:
                return
            if job.call is not None:
                self._finish([job], lambda: [job.call()])
                continue
            batch, deadline = [job], time.perf_counter() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    nxt = self._q.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is None or nxt.call is not None:
                    pending = nxt  # an engine call or the stop signal: handled after this batch
                    if nxt is None:
                        self._q.put(None)
                        pending = None
                    break
                batch.append(nxt)
            self._finish(batch, lambda: self._recommend(batch))

    def _recommend(self, batch: list[_Job]) -> list:
        k = max(j.k for j in batch)
        texts = [j.user_text for j in batch]
        t0 = time.perf_counter()
        out = self.engine.recommend_histories(
            [j.history for j in batch], k, texts if any(texts) else None, [j.user for j in batch]
        )
        if self.on_batch:
            self.on_batch(len(batch), time.perf_counter() - t0)
        return [row[: j.k] for row, j in zip(out, batch)]

    @staticmethod
    def _finish(batch: list[_Job], fn) -> None:
        try:
            results = fn()
        except Exception as e:  # handed to the waiting requests, which map it to a status
            if not isinstance(e, TTDSError):
                log.exception("engine call failed")
            for j in batch:
                j.future.set_exception(e)
            return
        for j, r in zip(batch, results):
            j.future.set_result(r)
