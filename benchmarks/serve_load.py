"""Load test of the serving API on loopback: cached path at a fixed rate, online path at batch 1 and batched.

    python benchmarks/serve_load.py --model runs/sasrec-Games --data ../shared/data/Games \
        --store sqlite:///runs/serve/games.db [--rate 200 --seconds 60]

Starts `ttds serve` as a subprocess on 127.0.0.1 (pre-computing the cache first unless --no-precompute),
then, from this process (asyncio, 32 keep-alive HTTP/1.1 connections):
  1. cached path: GET /v1/users/{u}/recommendations?k=10 for random users, open loop at --rate req/s
     for --seconds; latency is measured from each request's *scheduled* send time (no coordinated
     omission), so a stalled server shows up in p99;
  2. online path, batch 1: --online sequential POST /v1/recommendations with real users' histories;
  3. online path, batched: the same requests from --concurrency clients at once (the server batches them);
  4. with --new-items N: N sequential POST /v1/items (a generative model's item tower assigns the IDs).
Every row records the machine's 1-minute load average before and after it (the CPU is shared); the
cached row also gives the share of requests the server itself answered within 5 / 10 ms (its histogram).
Every loop is bounded in count and time; traffic goes to 127.0.0.1 only. Prints a Markdown table and
writes JSON with --out.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000.0, q)) if xs else float("nan")


class Conn:
    """A minimal HTTP/1.1 keep-alive client connection (the load generator must cost far less CPU than
    the server it measures; a general client such as httpx spends milliseconds per request)."""

    def __init__(self, reader, writer):
        self.r, self.w = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Conn":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.w.write(head.encode() + b"\r\n" + body)
        status_line = await self.r.readline()
        if not status_line:
            raise ConnectionResetError("the server closed an idle keep-alive connection")
        length = 0
        while True:
            line = await self.r.readline()
            if line in (b"\r\n", b""):
                break
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return int(status_line.split()[1]), await self.r.readexactly(length)


class Pool:
    def __init__(self, port: int, size: int):
        self.port, self.size = port, size
        self.q: asyncio.Queue[Conn] = asyncio.Queue()

    async def start(self):
        for _ in range(self.size):
            self.q.put_nowait(await Conn.open(self.port))

    async def request(self, method: str, path: str, body: bytes = b"", timeout: float = 60.0) -> tuple[int, bytes]:
        conn = await self.q.get()
        try:
            for attempt in (0, 1):  # one retry on a connection the server closed while it was idle
                try:
                    return await asyncio.wait_for(conn.request(method, path, body), timeout)
                except (ConnectionError, asyncio.IncompleteReadError):
                    conn.w.close()
                    conn = await Conn.open(self.port)
                    if attempt:
                        raise
                except Exception:
                    conn.w.close()
                    conn = await Conn.open(self.port)  # a failed exchange leaves the stream in an unknown state
                    raise
        finally:
            self.q.put_nowait(conn)


async def cached_load(pool: Pool, users: list[int], rate: float, seconds: float, k: int) -> dict:
    n = int(rate * seconds)
    lat, errors, sources = [], 0, {}
    rng = random.Random(0)

    async def one(u: int, scheduled: float):
        nonlocal errors
        try:
            status, body = await pool.request("GET", f"/v1/users/{u}/recommendations?k={k}")
            ok = status == 200
            if ok:
                s = json.loads(body)["source"]
                sources[s] = sources.get(s, 0) + 1
        except Exception:
            ok = False
        lat.append(time.perf_counter() - scheduled)
        errors += not ok

    t0, tasks = time.perf_counter(), []
    for i in range(n):
        target = t0 + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(rng.choice(users), target)))
    await asyncio.wait(tasks, timeout=30)
    wall = time.perf_counter() - t0
    return {"path": f"cached GET, {rate:g} req/s open loop for {seconds:g} s", "requests": n, "errors": errors + sum(not t.done() for t in tasks),
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": pct(lat, 100), "achieved_rps": len(lat) / wall, "sources": sources}


async def online(pool: Pool, histories: list[list[int]], k: int, concurrency: int) -> dict:
    lat, errors, queue = [], 0, list(histories)

    async def worker():
        nonlocal errors
        while queue:
            h = queue.pop()
            t = time.perf_counter()
            try:
                status, _ = await pool.request("POST", "/v1/recommendations", json.dumps({"history": h, "k": k}).encode())
                errors += status != 200
            except Exception:
                errors += 1
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*[worker() for _ in range(concurrency)]), timeout=600)
    wall = time.perf_counter() - t0
    return {"path": f"online POST, {concurrency} client(s)" + (" (batch 1)" if concurrency == 1 else " (micro-batched)"),
            "requests": len(histories), "errors": errors, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": pct(lat, 100),
            "achieved_rps": len(lat) / wall}


async def new_items(pool: Pool, ds, n: int) -> dict:
    """POST /v1/items n times, sequentially, with the text of existing items under a new title (409 = the
    item's disambiguation level is full: counted apart, not as an error)."""
    lat, errors, full, rng = [], 0, 0, random.Random(3)
    for j in range(n):
        i = rng.randrange(ds.n_items)
        body = {f: ds.item_text[f][i] for f in ("description", "brand", "categories")} | {"title": f"{ds.item_text['title'][i]} (new {j})"}
        t = time.perf_counter()
        status, _ = await pool.request("POST", "/v1/items", json.dumps(body).encode())
        lat.append(time.perf_counter() - t)
        full += status == 409
        errors += status not in (201, 409)
    return {"path": f"new item POST /v1/items, 1 client ({full} x 409: level full)", "requests": n, "errors": errors,
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": pct(lat, 100), "achieved_rps": n / max(sum(lat), 1e-9)}


async def with_load(coro) -> dict:
    """A row with the machine's 1-minute load average before and after it (the CPU is shared)."""
    before = os.getloadavg()[0]
    row = await coro
    return row | {"load_before": round(before, 2), "load_after": round(os.getloadavg()[0], 2)}


def server_share(metrics_text: str, route: str, le: str) -> float | None:
    """Share of a route's requests the server itself answered within `le` seconds (its latency histogram)."""
    count = below = None
    for ln in metrics_text.splitlines():
        if f'route="{route}"' not in ln:
            continue
        if ln.startswith("ttds_http_request_duration_seconds_count"):
            count = float(ln.rsplit(" ", 1)[1])
        elif ln.startswith("ttds_http_request_duration_seconds_bucket") and f'le="{le}"' in ln:
            below = float(ln.rsplit(" ", 1)[1])
    return below / count if count and below is not None else None


async def run_load(port: int, args, ds, histories) -> list[dict]:
    n_users = ds.n_users
    pool = Pool(port, 32)
    await pool.start()
    rng = random.Random(1)
    users = [rng.randrange(n_users) for _ in range(5000)]
    if args.seconds > 0:
        for u in users[:50]:  # warm-up
            await pool.request("GET", f"/v1/users/{u}/recommendations?k={args.k}")
    rows = [await with_load(cached_load(pool, users, args.rate, args.seconds, args.k))] if args.seconds > 0 else []
    if args.online > 0:
        await online(pool, histories[:3], args.k, 1)
        rows.append(await with_load(online(pool, histories, args.k, 1)))
        rows.append(await with_load(online(pool, histories * 2, args.k, args.concurrency)))
    if args.new_items > 0:
        rows.append(await with_load(new_items(pool, ds, args.new_items)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--store", default="sqlite:///runs/serve/bench.db")
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=60.0, help="cached-path duration (0: skip the cached path)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--cache-k", type=int, default=50)
    ap.add_argument("--online", type=int, default=100, help="online requests at batch 1 (0: skip the online path)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--new-items", type=int, default=0, help="POST this many new items at the end (generative models)")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--quantize", default="none", help="the server's --quantize (none | int8)")
    ap.add_argument("--keep-seen", action="store_true", help="serve with --keep-seen (seen items may be recommended)")
    ap.add_argument("--no-precompute", action="store_true")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--note", default="", help="a line stored with the figures (what was served, what else ran)")
    args = ap.parse_args()
    if args.rate * args.seconds > 100_000:
        sys.exit("--rate x --seconds: at most 100,000 requests")

    from ttds.data.readers import load_dataset
    from ttds.runtime import machine_info

    py = [sys.executable, "-m", "ttds"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not args.no_precompute:
        t = time.perf_counter()
        subprocess.run(py + ["precompute", "--model", args.model, "--data", args.data, "--k", str(args.cache_k), "--store", args.store],
                       check=True, env=env)
        print(f"precompute: {time.perf_counter() - t:.1f} s (incl. loading)", flush=True)

    ds = load_dataset(args.data)
    rng = random.Random(2)
    histories = [[int(i) for i in ds.sequences[rng.randrange(ds.n_users)][-20:]] for _ in range(args.online)]
    # the dataset is ~10^5 long-lived objects: a full garbage collection of this process (~100+ ms) would
    # stall the load generator and show up as server latency. Keep them out of the collector.
    gc.collect()
    gc.freeze()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(py + ["serve", "--model", args.model, "--data", args.data, "--store", args.store, "--port", str(port),
                               "--threads", str(args.threads), "--quantize", args.quantize] + (["--keep-seen"] if args.keep_seen else []), env=env)
    try:
        import httpx

        deadline = time.time() + 600
        health = None
        while time.time() < deadline and server.poll() is None:
            try:
                health = httpx.get(base + "/healthz", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        if health is None:
            sys.exit("server did not come up")
        rows = asyncio.run(run_load(port, args, ds, histories))
        metrics = httpx.get(base + "/metrics").text
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()

    m = machine_info()
    print(f"\nmodel {health['model_version']} ({ds.n_users} users, {ds.n_items} items), store {args.store}, "
          f"{m['cpu']}, {m['cores']} cores, k={args.k}")
    route = "/v1/users/{user_id}/recommendations"
    for r in rows:
        if r["path"].startswith("cached"):  # what the server itself spent (its histogram), apart from the client
            r["server_share_within_5ms"] = server_share(metrics, route, "0.005")
            r["server_share_within_10ms"] = server_share(metrics, route, "0.01")
    print("\n| path | requests | errors | p50 ms | p99 ms | max ms | req/s | load avg (1 min) before / after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['requests']} | {r['errors']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | "
              f"{r['achieved_rps']:.1f} | {r['load_before']:.2f} / {r['load_after']:.2f} |")
    for r in rows:
        if "server_share_within_10ms" in r and r["server_share_within_10ms"] is not None:
            print(f"server-side, cached GET: {100 * r['server_share_within_5ms']:.2f} % within 5 ms, "
                  f"{100 * r['server_share_within_10ms']:.2f} % within 10 ms")
    batch_lines = [ln for ln in metrics.splitlines() if ln.startswith("ttds_online_batch_size_sum") or ln.startswith("ttds_online_batch_size_count")]
    print("\n" + "\n".join(batch_lines))
    if args.out:
        from ttds.io import write_json

        write_json(args.out, {"model_version": health["model_version"], "data": args.data, "store": args.store, "machine": m,
                              "k": args.k, "threads": args.threads, "quantize": args.quantize, "note": args.note, "rows": rows})


if __name__ == "__main__":
    main()
