"""SQLite backend of the store: the embedded default, one control-plane process per file.

Writes run in ``BEGIN IMMEDIATE`` transactions, so a commit's compares and writes are atomic
even if another process opens the same file (that process would not see our watch
notifications, though: use the etcd backend for several replicas). The database runs in WAL mode
with ``synchronous=FULL``: a write the API acknowledged survives a power cut or a SIGKILL.

sqlite3 calls block; they run in a dedicated single worker thread so the event loop keeps
serving xDS streams while the disk syncs, and so that every statement on the connection is
serialized.

Failures: a write that fails (disk full, I/O error) raises :class:`StoreError` naming the
cause, is rolled back, and leaves the in-memory revision as it was, so a read after it gives
the state before the write and a later write succeeds once the cause is gone. A commit whose
caller is cancelled after handing it to the writer thread still completes *and notifies the
watchers*: a stored change is always published.

Exclusive use: ``lock=True`` (what ``bluegreen serve`` uses) takes an exclusive ``flock`` on
``<state>.lock`` for as long as the store is open, and refuses to open if another process holds
it, naming that process's pid. It is an option, not the default, because tests (and the
compare-and-set contract) open one file twice in one process to play two writers.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator, Callable, Mapping, TypeVar

from ..errors import RevisionConflict, StoreError
from .base import Entry, Listing, Txn

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    mod_revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta(name, value) VALUES ('revision', 0);
"""


class SQLiteStore:
    """A :class:`~controlplane.store.base.KVStore` kept in one SQLite file (or ``:memory:``)."""

    def __init__(self, path: str | Path, *, lock: bool = False) -> None:
        self._path = str(path)
        self.name = f"sqlite store {self._path}"
        self._lock = lock
        self._lock_fd: int | None = None
        self._commits: set[asyncio.Task[int]] = set()  # in flight; referenced so none is collected
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._conn: sqlite3.Connection | None = None
        self._changed = asyncio.Condition()
        self._revision = 0
        self._closed = False

    async def open(self) -> SQLiteStore:
        """Open (creating if missing). Raises StoreError if the file cannot be opened, or, with
        ``lock=True``, if another process holds it."""

        def _open() -> int:
            if self._path != ":memory:":
                Path(self._path).parent.mkdir(parents=True, exist_ok=True)
                if self._lock:
                    self._lock_fd = _take_lock(self._path)
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(_SCHEMA)
            self._conn = conn
            return int(conn.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0])

        try:
            self._revision = await self._run(_open)
        except BaseException:
            self._release_lock()
            raise
        return self

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise StoreError("store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except sqlite3.Error as exc:
            raise StoreError(f"{_cause(exc)}: sqlite store {self._path}: {exc}") from exc

    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None, "SQLiteStore.open() was not awaited"
        return self._conn

    async def get(self, key: str) -> Entry | None:
        def _get() -> Entry | None:
            row = self._db().execute("SELECT value, mod_revision FROM kv WHERE key=?", (key,)).fetchone()
            return Entry(key, json.loads(row[0]), row[1]) if row else None

        return await self._run(_get)

    async def list(self, prefix: str, *, unchanged: Mapping[str, int] | None = None) -> Listing:
        known = unchanged or {}

        def _list() -> Listing:
            db = self._db()
            db.execute("BEGIN")
            try:
                revision = int(db.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0])
                # Range scan on the primary key; the upper bound is the prefix with its last
                # character incremented, which is what etcd's prefix range does too.
                rows = db.execute(
                    "SELECT key, value, mod_revision FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                    (prefix, _prefix_end(prefix)),
                ).fetchall()
            finally:
                db.execute("COMMIT")
            kept = tuple(k for k, _, r in rows if known.get(k) == r)
            entries = tuple(Entry(k, json.loads(v), r) for k, v, r in rows if known.get(k) != r)
            return Listing(revision, entries, kept)

        return await self._run(_list)

    async def commit(self, txn: Txn) -> int:
        def _commit() -> int:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                for key, expected in txn.compares.items():
                    row = db.execute("SELECT mod_revision FROM kv WHERE key=?", (key,)).fetchone()
                    actual = row[0] if row else 0
                    if actual != expected:
                        raise RevisionConflict(f"{key}: expected revision {expected}, found {actual}")
                revision = int(db.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]) + 1
                for key, value in txn.puts.items():
                    db.execute(
                        "INSERT INTO kv(key, value, mod_revision) VALUES (?, ?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value=excluded.value, mod_revision=excluded.mod_revision",
                        (key, json.dumps(value, sort_keys=True, separators=(",", ":")), revision),
                    )
                for key in txn.deletes:
                    db.execute("DELETE FROM kv WHERE key=?", (key,))
                db.execute("UPDATE meta SET value=? WHERE name='revision'", (revision,))
                db.execute("COMMIT")
                return revision
            except BaseException:
                # SQLite may already have rolled back by itself (it does on some disk-full and
                # I/O errors); a failing ROLLBACK must not hide the error that caused it.
                if db.in_transaction:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise

        async def _commit_and_notify() -> int:
            revision = await self._run(_commit)
            async with self._changed:
                self._revision = max(self._revision, revision)
                self._changed.notify_all()
            return revision

        if not txn.puts and not txn.deletes:
            raise ValueError("empty transaction")
        # Shielded: once the writer thread has the transaction it commits whether or not our
        # caller still waits (an HTTP client that disconnected cancels its handler); the
        # watchers must hear of it all the same, or a stored change would never be published.
        task = asyncio.ensure_future(_commit_and_notify())
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)
        return await asyncio.shield(task)

    async def revision(self) -> int:
        return self._revision

    async def watch(self) -> AsyncIterator[int]:
        seen = self._revision
        yield seen
        while not self._closed:
            async with self._changed:
                await self._changed.wait_for(lambda: self._revision > seen or self._closed)
            if self._closed:
                return
            seen = self._revision
            yield seen

    async def close(self) -> None:
        if self._closed:
            return
        conn = self._conn

        def _close() -> None:
            if conn is not None:
                conn.close()

        if self._commits:  # let shielded commits finish and notify before the connection goes
            await asyncio.gather(*self._commits, return_exceptions=True)
        try:
            await self._run(_close)
        finally:
            self._release_lock()
            self._closed = True
            async with self._changed:
                self._changed.notify_all()
            self._executor.shutdown(wait=False)


def _cause(exc: sqlite3.Error) -> str:
    """What an operator should read first: the cause in plain words (SQLite's own message is
    terse, e.g. 'database or disk is full')."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name == "SQLITE_FULL":
        return "disk full"
    if name == "SQLITE_IOERR_WRITE":  # EFBIG from a file-size limit lands here, not in SQLITE_FULL
        return f"I/O error writing the state file ({name}: the disk may be full or failing, or a file size limit was reached)"
    if name.startswith("SQLITE_IOERR"):
        return f"I/O error ({name})"
    if name.startswith("SQLITE_BUSY"):
        return "database locked by another writer"
    if name.startswith("SQLITE_READONLY") or name.startswith("SQLITE_CANTOPEN"):
        return f"cannot write the state file ({name})"
    if name.startswith("SQLITE_CORRUPT") or name == "SQLITE_NOTADB":
        return f"state file corrupt ({name})"
    return f"store failure ({name or type(exc).__name__})"


def _take_lock(db_path: str) -> int:
    """Take the exclusive per-process lock beside the state file; return its descriptor."""
    lock_path = db_path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot create the lock file {lock_path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StoreError(f"cannot lock {lock_path}: {exc}") from exc
        raise StoreError(
            f"state file {db_path} is in use by another control plane process (pid {holder}, holding {lock_path}); "
            "two processes on one state file would serve diverging configurations. Stop that process, "
            "or give this one its own --state file"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _prefix_end(prefix: str) -> str:
    if not prefix:
        return "\U0010ffff"
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


async def open_sqlite_store(path: str | Path, *, lock: bool = False) -> SQLiteStore:
    return await SQLiteStore(path, lock=lock).open()
