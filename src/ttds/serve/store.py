"""Stores for pre-computed top-K lists: SQLite (embedded default) and Redis, behind one interface.

Layout (both stores): every pre-compute run writes into its own *version* (a table / a hash named by a
tag), one entry per user holding the item ids, their scores, the model version and the time. A version
is invisible to readers until `publish(tag)` flips the single "active" pointer, in one transaction
(SQLite) or one MULTI/EXEC (Redis); a reader resolves pointer and entry in one read transaction (SQLite)
or one server-side script (Redis), so it sees either the old cache or the new one, never a mix.

Resuming: `begin` re-opens an unfinished version with the same tag, `done_users` tells which users are
already written (one entry per user: a primary key / a hash field), and `put_many` writes a whole batch
atomically, so an interrupted run loses nothing and duplicates nothing.

URLs: `sqlite:///relative/or/absolute/path.db` (`sqlite:////abs/path.db` also works) and
`redis://host:port/db[?prefix=ttds:]`.
"""
from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from ttds.errors import TTDSError

_TAG = re.compile(r"^[A-Za-z0-9_]{1,64}$")


@dataclass
class Entry:
    """One user's cached recommendations."""

    user: int
    items: list[int]
    scores: list[float | None]
    model_version: str
    created_at: float  # unix time the entry was computed
    k: int = 0  # how many items were asked for (a list can be shorter: seen items are left out)

    def to_json(self) -> str:
        d = {"i": self.items, "s": self.scores, "m": self.model_version, "t": self.created_at, "k": self.k or len(self.items)}
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, user: int, text: str | bytes) -> "Entry":
        d = json.loads(text)
        return cls(user, d["i"], d["s"], d["m"], d["t"], d.get("k") or len(d["i"]))


@dataclass
class VersionInfo:
    tag: str
    model_version: str
    k: int
    n_users: int  # users this version must hold when complete
    created_at: float
    state: str  # "building" | "published" | "retired"


def check_tag(tag: str) -> str:
    if not _TAG.match(tag):
        raise TTDSError(f"store version tag {tag!r}: expected 1-64 letters, digits or '_'")
    return tag


class Store(ABC):
    """The interface every store implements (see the module docstring)."""

    url: str

    @abstractmethod
    def begin(self, tag: str, model_version: str, k: int, n_users: int) -> VersionInfo:
        """Create version `tag` (state building), or re-open it if it exists with the same settings."""

    @abstractmethod
    def put_many(self, tag: str, entries: list[Entry]) -> None:
        """Write a batch of entries into version `tag`, all or nothing; re-writing a user replaces it."""

    @abstractmethod
    def done_users(self, tag: str) -> set[int]:
        """Users already written into version `tag`."""

    @abstractmethod
    def publish(self, tag: str) -> None:
        """Atomically make `tag` the version readers see; older versions but the previous one are dropped."""

    @abstractmethod
    def get(self, user: int) -> Entry | None:
        """The user's entry in the active version, or None (no active version, or user not cached)."""

    async def aget(self, user: int) -> Entry | None:
        """`get` for the API's event loop (a local store answers inline; a network store awaits its socket)."""
        return self.get(user)

    @abstractmethod
    def versions(self) -> list[VersionInfo]: ...

    @abstractmethod
    def active(self) -> str | None:
        """The active version's tag."""

    @abstractmethod
    def drop(self, tag: str) -> None: ...

    def close(self) -> None:
        pass

    def count(self, tag: str) -> int:
        return len(self.done_users(tag))

    def version(self, tag: str) -> VersionInfo | None:
        return next((v for v in self.versions() if v.tag == tag), None)

    def _check_reopen(self, old: VersionInfo, model_version: str, k: int, n_users: int) -> VersionInfo:
        if (old.model_version, old.k, old.n_users) != (model_version, k, n_users):
            raise TTDSError(
                f"{self.url}: version {old.tag!r} exists with model_version={old.model_version!r}, k={old.k}, "
                f"n_users={old.n_users}; expected {model_version!r}, k={k}, n_users={n_users}"
            )
        return old


def open_store(url: str) -> Store:
    """`sqlite:///path.db` or `redis://host:port/db` -> a Store."""
    if url.startswith("sqlite:///"):
        return SQLiteStore(url)
    if url.startswith("redis://"):
        return RedisStore(url)
    raise TTDSError(f"--store {url!r}: expected sqlite:///path.db or redis://host:port/db")


# ------------------------------------------------------------------------------------------ SQLite


class SQLiteStore(Store):
    """One file, WAL mode; one connection per thread; versions are tables `recs_<tag>`."""

    def __init__(self, url: str):
        self.url = url
        path = url[len("sqlite:///"):]
        if not path:
            raise TTDSError(f"--store {url!r}: expected sqlite:///path.db")
        self.path = Path(path)
        if self.path.is_dir():
            raise TTDSError(f"--store {url!r}: {self.path} is a folder, expected a database file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        with self._tx(write=True) as c:
            c.execute(
                "CREATE TABLE IF NOT EXISTS versions (tag TEXT PRIMARY KEY, model_version TEXT NOT NULL, "
                "k INTEGER NOT NULL, n_users INTEGER NOT NULL, created_at REAL NOT NULL, state TEXT NOT NULL)"
            )
            c.execute("CREATE TABLE IF NOT EXISTS pointer (name TEXT PRIMARY KEY, tag TEXT NOT NULL)")

    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            try:
                c = sqlite3.connect(self.path, isolation_level=None, timeout=30.0, check_same_thread=False)
                # Switching a new file to WAL needs an exclusive lock and SQLite does not call the busy
                # handler for it: when several processes (torchrun ranks) open the store at once, retry.
                deadline = time.monotonic() + 30.0
                while True:
                    try:
                        c.execute("PRAGMA journal_mode=WAL")
                        break
                    except sqlite3.OperationalError as e:
                        if "locked" not in str(e) or time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
            except sqlite3.DatabaseError as e:
                raise TTDSError(f"--store {self.url!r}: cannot open as SQLite database ({e})") from None
            c.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = c
            with self._all_lock:
                self._all.append(c)
        return c

    class _Tx:
        def __init__(self, conn: sqlite3.Connection, write: bool):
            self.c, self.write = conn, write

        def __enter__(self) -> sqlite3.Connection:
            self.c.execute("BEGIN IMMEDIATE" if self.write else "BEGIN")
            return self.c

        def __exit__(self, exc_type, exc, tb):
            self.c.execute("ROLLBACK" if exc_type else "COMMIT")
            return False

    def _tx(self, write: bool = False) -> "_Tx":
        return self._Tx(self._conn(), write)

    @staticmethod
    def _table(tag: str) -> str:
        return f"recs_{check_tag(tag)}"

    def begin(self, tag, model_version, k, n_users):
        with self._tx(write=True) as c:
            row = c.execute("SELECT tag, model_version, k, n_users, created_at, state FROM versions WHERE tag=?", (check_tag(tag),)).fetchone()
            if row:
                return self._check_reopen(VersionInfo(*row), model_version, k, n_users)
            c.execute(
                f"CREATE TABLE IF NOT EXISTS {self._table(tag)} (user INTEGER PRIMARY KEY, entry TEXT NOT NULL)"
            )
            info = VersionInfo(tag, model_version, k, n_users, time.time(), "building")
            c.execute("INSERT INTO versions VALUES (?,?,?,?,?,?)", (info.tag, info.model_version, info.k, info.n_users, info.created_at, info.state))
            return info

    def put_many(self, tag, entries):
        table = self._table(tag)
        with self._tx(write=True) as c:
            c.executemany(f"INSERT OR REPLACE INTO {table} (user, entry) VALUES (?, ?)", [(e.user, e.to_json()) for e in entries])

    def done_users(self, tag):
        with self._tx() as c:
            return {u for (u,) in c.execute(f"SELECT user FROM {self._table(tag)}")}

    def count(self, tag):
        with self._tx() as c:
            return int(c.execute(f"SELECT COUNT(*) FROM {self._table(tag)}").fetchone()[0])

    def publish(self, tag):
        with self._tx(write=True) as c:
            if not c.execute("SELECT 1 FROM versions WHERE tag=?", (check_tag(tag),)).fetchone():
                raise TTDSError(f"{self.url}: no version {tag!r} to publish")
            prev = c.execute("SELECT tag FROM pointer WHERE name='active'").fetchone()
            c.execute("INSERT OR REPLACE INTO pointer (name, tag) VALUES ('active', ?)", (tag,))
            c.execute("UPDATE versions SET state='published' WHERE tag=?", (tag,))
            keep = {tag} | ({prev[0]} if prev else set())
            if prev and prev[0] != tag:
                c.execute("UPDATE versions SET state='retired' WHERE tag=?", (prev[0],))
            for (old,) in c.execute("SELECT tag FROM versions WHERE state != 'building'").fetchall():
                if old not in keep:
                    c.execute(f"DROP TABLE IF EXISTS {self._table(old)}")
                    c.execute("DELETE FROM versions WHERE tag=?", (old,))

    def get(self, user):
        with self._tx() as c:  # one read transaction: the pointer and the entry come from one snapshot
            row = c.execute("SELECT tag FROM pointer WHERE name='active'").fetchone()
            if not row:
                return None
            hit = c.execute(f"SELECT entry FROM {self._table(row[0])} WHERE user=?", (int(user),)).fetchone()
        return Entry.from_json(int(user), hit[0]) if hit else None

    def versions(self):
        with self._tx() as c:
            return [VersionInfo(*r) for r in c.execute("SELECT tag, model_version, k, n_users, created_at, state FROM versions ORDER BY created_at")]

    def active(self):
        with self._tx() as c:
            row = c.execute("SELECT tag FROM pointer WHERE name='active'").fetchone()
        return row[0] if row else None

    def drop(self, tag):
        with self._tx(write=True) as c:
            if c.execute("SELECT 1 FROM pointer WHERE name='active' AND tag=?", (check_tag(tag),)).fetchone():
                raise TTDSError(f"{self.url}: version {tag!r} is active; publish another one first")
            c.execute(f"DROP TABLE IF EXISTS {self._table(tag)}")
            c.execute("DELETE FROM versions WHERE tag=?", (tag,))

    def close(self):
        with self._all_lock:
            for c in self._all:
                c.close()
            self._all.clear()
        self._local = threading.local()


# ------------------------------------------------------------------------------------------- Redis

# Resolve the active pointer and read the entry in one atomic server-side step.
_GET_SCRIPT = """
local tag = redis.call('GET', KEYS[1])
if not tag then return false end
return redis.call('HGET', ARGV[1] .. tag, ARGV[2])
"""


class RedisStore(Store):
    """Keys (prefix default `ttds:`): `active` -> tag, `versions` hash tag -> JSON, `recs:<tag>` hash user -> entry."""

    def __init__(self, url: str):
        import redis

        self.url = url
        u = urlparse(url)
        self.prefix = parse_qs(u.query).get("prefix", ["ttds:"])[0]
        try:
            self.r = redis.Redis.from_url(url.split("?")[0], socket_timeout=5, socket_connect_timeout=5)
            self.r.ping()
        except (redis.RedisError, ValueError) as e:
            raise TTDSError(f"--store {url!r}: cannot reach Redis ({e})") from None
        self._get = self.r.register_script(_GET_SCRIPT)
        self._async = None  # (event loop, asyncio client, script) for `aget`

    def _k(self, name: str) -> str:
        return self.prefix + name

    def _recs(self, tag: str) -> str:
        return self._k("recs:" + check_tag(tag))

    def begin(self, tag, model_version, k, n_users):
        raw = self.r.hget(self._k("versions"), check_tag(tag))
        if raw:
            return self._check_reopen(VersionInfo(**json.loads(raw)), model_version, k, n_users)
        info = VersionInfo(tag, model_version, k, n_users, time.time(), "building")
        self.r.hset(self._k("versions"), tag, json.dumps(info.__dict__))
        return info

    def put_many(self, tag, entries):
        if entries:  # one HSET with every field: applied atomically by the server
            self.r.hset(self._recs(tag), mapping={str(e.user): e.to_json() for e in entries})

    def done_users(self, tag):
        return {int(u) for u in self.r.hkeys(self._recs(tag))}

    def count(self, tag):
        return int(self.r.hlen(self._recs(tag)))

    def _set_state(self, pipe, tag: str, state: str) -> None:
        raw = self.r.hget(self._k("versions"), tag)
        if raw:
            d = json.loads(raw)
            d["state"] = state
            pipe.hset(self._k("versions"), tag, json.dumps(d))

    def publish(self, tag):
        if not self.r.hexists(self._k("versions"), check_tag(tag)):
            raise TTDSError(f"{self.url}: no version {tag!r} to publish")
        prev = self.r.get(self._k("active"))
        prev = prev.decode() if prev else None
        keep = {tag, prev}
        old = [v.tag for v in self.versions() if v.state != "building" and v.tag not in keep]
        pipe = self.r.pipeline(transaction=True)  # MULTI ... EXEC
        pipe.set(self._k("active"), tag)
        self._set_state(pipe, tag, "published")
        if prev and prev != tag:
            self._set_state(pipe, prev, "retired")
        for t in old:
            pipe.delete(self._recs(t))
            pipe.hdel(self._k("versions"), t)
        pipe.execute()

    def get(self, user):
        raw = self._get(keys=[self._k("active")], args=[self._k("recs:"), int(user)])
        return Entry.from_json(int(user), raw) if raw else None

    async def aget(self, user):
        import asyncio

        import redis.asyncio as aredis

        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:  # an asyncio client belongs to one loop
            client = aredis.Redis.from_url(self.url.split("?")[0], socket_timeout=5, socket_connect_timeout=5)
            self._async = (loop, client, client.register_script(_GET_SCRIPT))
        raw = await self._async[2](keys=[self._k("active")], args=[self._k("recs:"), int(user)])
        return Entry.from_json(int(user), raw) if raw else None

    def versions(self):
        out = [VersionInfo(**json.loads(v)) for v in self.r.hvals(self._k("versions"))]
        return sorted(out, key=lambda v: v.created_at)

    def active(self):
        t = self.r.get(self._k("active"))
        return t.decode() if t else None

    def drop(self, tag):
        if self.active() == check_tag(tag):
            raise TTDSError(f"{self.url}: version {tag!r} is active; publish another one first")
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self._recs(tag))
        pipe.hdel(self._k("versions"), tag)
        pipe.execute()

    def close(self):
        self.r.close()
