"""Applying one phase (expand or contract) of a migration set to PostgreSQL (psycopg 3, sync).

:func:`apply_phase` is the only writer. What it guarantees:

* **Serialized.** It holds a PostgreSQL advisory lock (:data:`ADVISORY_LOCK_KEY`) for the whole
  run, so two runs against the same database (two control planes, a retry racing the original, an
  operator's ``bluegreen migrate``) never interleave: the second waits, then finds the files
  recorded and skips them. The lock is *session-level* (``pg_advisory_lock``), not transaction-
  level (``pg_advisory_xact_lock``): a run spans several transactions (one per file), and files
  with ``CONCURRENTLY`` must run outside any transaction block, where a transaction-level lock
  could not be held at all. The lock goes away with the connection if the process dies.
  Waiting for it is bounded by ``lock_wait_timeout`` (default 15min): past it the run fails with
  :class:`MigrationError` naming the lock key and the pid (and application) holding it.
* **Cancellable.** A :class:`Cancellation` passed in (see :func:`run_cancellable`, which the
  driver uses so shutdown does not wait for a migration) stops the run between files and
  cancels the statement in progress on the server (the lock wait or a file's statement); the
  file's transaction rolls back, as on any failure.
* **Recorded.** Each applied file gets a row in ``bluegreen_schema_migrations`` (created if
  missing, in the connection's current schema, normally ``public``): file name (the key),
  phase, sha256 checksum, the deployment that applied it and when.
* **Atomic per file.** A file runs in one transaction together with the insert of its record:
  a failure leaves neither the change nor the record, and raises :class:`MigrationError` naming
  the file and PostgreSQL's message. Files applied before it stay applied and recorded; a re-run
  resumes at the failed file. Exception: see *CONCURRENTLY* below.
* **Idempotent.** Recorded files are skipped (:attr:`ApplyReport.skipped`).
* **Tamper-evident.** If any recorded file of the set (either phase) no longer has the checksum
  it was applied with, the run is refused before anything is applied, naming the file and both
  checksums: an applied migration must never be edited; add a new file instead.
* **Bounded.** ``lock_timeout`` (default 5s: a DDL statement queued behind a long transaction
  blocks every later query on that table, so give up quickly and retry rather than cause an
  outage) and ``statement_timeout`` (default 15min) are set for the session and re-set before
  every file, after a ``RESET ALL``, so a plain ``SET`` in one file does not leak into the next.
  A file may still tighten or loosen them for itself (``SET LOCAL lock_timeout = '2s'``).
* **Refused up front** (nothing applied): a pending file with transaction control of its own
  (``BEGIN``/``COMMIT``/``ROLLBACK``/...; the runner owns the transaction), and a contract run
  while an expand file numbered below a pending contract file is not applied yet.

*CONCURRENTLY* files. ``CREATE INDEX CONCURRENTLY`` and friends (also ``VACUUM``) cannot run in
a transaction block, nor inside a multi-statement query string. A file whose SQL contains the
word ``CONCURRENTLY`` (outside comments and string literals) or a ``VACUUM`` statement is therefore
split into statements, each run on its own in autocommit mode, and recorded right after the
last one succeeded. The trade-off: such a file is not atomic. If statement 2 of 3 fails, or the
process dies between the last statement and the record, the database has part (or all) of the
file without a record, and the run must be repeated. Write these files to be re-runnable: one
statement per file where possible, and ``CREATE INDEX CONCURRENTLY IF NOT EXISTS`` /
``DROP INDEX CONCURRENTLY IF EXISTS``. Note that a *failed* ``CREATE INDEX CONCURRENTLY`` leaves
an INVALID index behind, which ``IF NOT EXISTS`` would then silently keep: drop it first (the
error message lists invalid indexes it finds after such a failure).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from ..errors import MigrationError, ValidationError
from .files import MigrationFile, MigrationSet, Phase

RECORD_TABLE = "bluegreen_schema_migrations"

T = TypeVar("T")

#: Default key of the session-level advisory lock that serializes runs: the first 8 bytes of
#: ``sha256(b"bluegreen_schema_migrations")`` read as a big-endian signed 64-bit integer, i.e.
#: 8788406249354589021. Fixed so that every version of the control plane (and an operator's
#: ``SELECT pg_advisory_lock(8788406249354589021)`` to hold migrations off by hand) agree.
ADVISORY_LOCK_KEY = int.from_bytes(hashlib.sha256(RECORD_TABLE.encode()).digest()[:8], "big", signed=True)
assert ADVISORY_LOCK_KEY == 8788406249354589021

APPLICATION_NAME = "bluegreen-migrations"

# PostgreSQL's syntax for time-valued settings: a number, optionally a unit (bare = milliseconds).
_INTERVAL = re.compile(r"^\s*[0-9]+(\.[0-9]+)?\s*(us|ms|s|min|h|d)?\s*$")

_TX_CONTROL = frozenset({"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT"})


@dataclass(frozen=True)
class ApplyReport:
    applied: list[str]  # file names applied by this run, in order
    skipped: list[str]  # file names of the phase already recorded before this run
    phase: Phase
    seconds: float


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, for messages and logs.

    Handles URLs (``postgresql://user:secret@host/db``, ``...?password=secret``) and libpq
    key/value strings (``host=h password=secret``). Anything unparsable is returned with every
    ``password=...`` masked.
    """
    masked = re.sub(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)", r"\1***", url)
    if "://" not in masked:
        return masked
    try:
        parts = urlsplit(masked)
    except ValueError:
        return masked
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{hostinfo}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _check_interval(name: str, value: str) -> str:
    if not isinstance(value, str) or not _INTERVAL.match(value):
        raise ValidationError(
            f"invalid {name} {value!r}: expected a PostgreSQL time value such as '5s', '200ms', '15min' "
            "(units us, ms, s, min, h, d; a bare number means milliseconds; 0 disables)"
        )
    return value.strip()


def _line_of(text: str, position: int) -> int:
    """1-based line of the 1-based character ``position`` in ``text``."""
    return text.count("\n", 0, max(position - 1, 0)) + 1


# --------------------------------------------------------------------------------------------
# Splitting SQL into statements (for files that must run outside a transaction)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    text: str  # the original text, comments included, without the trailing semicolon
    offset: int  # index of text[0] in the file
    words: tuple[str, ...]  # upper-cased keywords/identifiers outside comments, strings, quotes


_DOLLAR_TAG = re.compile(r"\$([A-Za-z_\x80-\uffff][A-Za-z0-9_\x80-\uffff]*)?\$")


def _is_ident_char(ch: str) -> bool:
    return ch.isalnum() or ch in "_$" or ord(ch) >= 0x80


def split_statements(text: str) -> list[Statement]:
    """Split SQL at top-level semicolons, as psql does.

    Understands ``--`` and nested ``/* */`` comments, ``'...'`` (with ``''``) and ``E'...'``
    (backslash escapes) strings, ``"..."`` identifiers, ``$tag$...$tag$`` bodies, and SQL-standard
    routine bodies (``CREATE FUNCTION ... BEGIN ATOMIC ... END``). Statements consisting only of
    comments and whitespace are dropped.
    """
    statements: list[Statement] = []
    n = len(text)
    i = 0
    start = 0
    words: list[str] = []
    depth = 0  # BEGIN ATOMIC / CASE nesting inside CREATE FUNCTION|PROCEDURE, as psql counts it

    def finish(end: int) -> None:
        nonlocal words, depth
        if words or _has_code(text[start:end]):
            raw = text[start:end]
            lead = len(raw) - len(raw.lstrip())
            statements.append(Statement(raw.strip(), start + lead, tuple(words)))
        words = []
        depth = 0

    while i < n:
        ch = text[i]
        if ch == "-" and text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif ch == "/" and text.startswith("/*", i):
            level, i = 1, i + 2
            while i < n and level:
                if text.startswith("/*", i):
                    level, i = level + 1, i + 2
                elif text.startswith("*/", i):
                    level, i = level - 1, i + 2
                else:
                    i += 1
        elif ch == "'":
            escapes = i > 0 and text[i - 1] in "eE" and (i < 2 or not _is_ident_char(text[i - 2]))
            i += 1
            while i < n:
                if escapes and text[i] == "\\":
                    i += 2
                elif text[i] == "'":
                    if text.startswith("''", i):
                        i += 2
                    else:
                        i += 1
                        break
                else:
                    i += 1
        elif ch == '"':
            i += 1
            while i < n:
                if text.startswith('""', i):
                    i += 2
                elif text[i] == '"':
                    i += 1
                    break
                else:
                    i += 1
        elif ch == "$" and (i == 0 or not _is_ident_char(text[i - 1])) and (m := _DOLLAR_TAG.match(text, i)):
            tag = m.group(0)
            j = text.find(tag, m.end())
            i = n if j < 0 else j + len(tag)
        elif ch.isalpha() or ch == "_" or ord(ch) >= 0x80:
            j = i + 1
            while j < n and _is_ident_char(text[j]):
                j += 1
            word = text[i:j].upper()
            # The E of E'...' is a prefix, not a word.
            if not (word == "E" and j < n and text[j] == "'"):
                words.append(word)
                if word in ("BEGIN", "CASE") and _is_routine(words):
                    depth += 1
                elif word == "END" and depth > 0:
                    depth -= 1
            i = j
        elif ch == ";" and depth == 0:
            finish(i)
            i += 1
            start = i
        else:
            i += 1
    finish(n)
    return statements


def _has_code(fragment: str) -> bool:
    """True if ``fragment`` has anything but whitespace, comments and semicolons (e.g. ``SELECT 1``
    has words, but ``(1)`` alone has none; count it as code)."""
    stripped = re.sub(r"--[^\n]*|/\*.*?\*/", "", fragment, flags=re.S)
    return bool(stripped.strip(" \t\r\n;"))


def _is_routine(words: Sequence[str]) -> bool:
    if len(words) >= 2 and words[0] == "CREATE" and words[1] in ("FUNCTION", "PROCEDURE"):
        return True
    return len(words) >= 4 and words[:3] == ["CREATE", "OR", "REPLACE"] and words[3] in ("FUNCTION", "PROCEDURE")


def needs_autocommit(statements: Sequence[Statement]) -> bool:
    """True if the file must run outside a transaction block (``CONCURRENTLY``, ``VACUUM``)."""
    return any("CONCURRENTLY" in s.words or (s.words[:1] == ("VACUUM",)) for s in statements)


def _transaction_control(statements: Sequence[Statement]) -> Statement | None:
    for statement in statements:
        if statement.words[:1] and statement.words[0] in _TX_CONTROL:
            if statement.words[0] == "START" and statement.words[1:2] != ("TRANSACTION",):
                continue
            return statement
    return None


# --------------------------------------------------------------------------------------------
# Applying
# --------------------------------------------------------------------------------------------


def _connect(database_url: str) -> psycopg.Connection[Any]:
    kwargs: dict[str, Any] = {"autocommit": True}
    try:
        given = psycopg.conninfo.conninfo_to_dict(database_url)
    except psycopg.Error as exc:
        raise ValidationError(f"invalid database URL {redact(database_url)}: {exc}") from None
    if "connect_timeout" not in given:
        kwargs["connect_timeout"] = 10
    if "application_name" not in given:
        kwargs["application_name"] = APPLICATION_NAME
    try:
        return psycopg.connect(database_url, **kwargs)
    except psycopg.Error as exc:
        raise MigrationError(f"cannot connect to {redact(database_url)}: {str(exc).strip()}") from exc


def _session_settings(conn: psycopg.Connection[Any], lock_timeout: str, statement_timeout: str) -> None:
    conn.execute("RESET ALL")
    conn.execute(
        "SELECT set_config('lock_timeout', %s, false), set_config('statement_timeout', %s, false)",
        (lock_timeout, statement_timeout),
    )


def _describe(file: MigrationFile, exc: psycopg.Error, statement_offset: int = 0) -> str:
    diag = exc.diag
    text = str(exc).strip()
    primary = diag.message_primary or (text.splitlines()[0] if text else type(exc).__name__)
    where = ""
    if diag.statement_position:
        try:
            position = int(diag.statement_position) + statement_offset
            where = f", line {_line_of(file.sql, position)}"
        except ValueError:
            pass
    parts = [f"{file.name}: {primary} (SQLSTATE {exc.sqlstate or '?'}{where})"]
    if diag.message_detail:
        parts.append(f"DETAIL: {diag.message_detail}")
    if diag.message_hint:
        parts.append(f"HINT: {diag.message_hint}")
    return "; ".join(parts)


class Cancellation:
    """Stops a running :func:`apply_phase` from another thread: it is checked between files, and
    :meth:`cancel` also sends PostgreSQL's cancel request for the statement in progress."""

    def __init__(self) -> None:
        self._requested = threading.Event()
        self._guard = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    def cancel(self) -> None:
        """Request cancellation; safe to call repeatedly (a cancel request that arrives between
        two statements cancels nothing, so callers repeat it until the run has ended)."""
        self._requested.set()
        with self._guard:
            conn = self._conn
        if conn is not None and not conn.closed:
            try:
                conn.cancel_safe(timeout=5)
            except (psycopg.Error, OSError):
                pass

    def attach(self, conn: psycopg.Connection[Any] | None) -> None:
        with self._guard:
            self._conn = conn

    def check(self) -> None:
        if self.requested:
            raise MigrationError("migration run cancelled (the control plane is stopping); "
                                 "files applied before it stay applied and recorded, a re-run resumes")


async def run_cancellable(run: Callable[[Cancellation], T], *, repeat_cancel_every: float = 1.0) -> T:
    """Run ``run(cancellation)`` (a blocking migration call) in a thread. If the awaiting task is
    cancelled (shutdown), cancel the migration and wait until its thread has ended, so the
    connection and its advisory lock are gone when this returns; then re-raise CancelledError."""
    cancellation = Cancellation()
    future = asyncio.ensure_future(asyncio.to_thread(run, cancellation))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            cancellation.cancel()
            await asyncio.wait({future}, timeout=repeat_cancel_every)
        if not future.cancelled():
            future.exception()  # retrieved: the thread's error is the expected consequence
        raise


def apply_phase(
    migration_set: MigrationSet,
    phase: Phase | str,
    database_url: str,
    *,
    deployment_id: str | None = None,
    lock_timeout: str = "5s",
    statement_timeout: str = "15min",
    advisory_lock_key: int = ADVISORY_LOCK_KEY,
    lock_wait_timeout: str = "15min",
    cancellation: Cancellation | None = None,
) -> ApplyReport:
    """Apply the files of ``phase`` not yet recorded, in order; see the module docstring.

    Raises :class:`ValidationError` for a bad argument (nothing touched) and
    :class:`MigrationError` if the database cannot be reached, a recorded file changed, a file
    is refused up front, or a file fails (earlier files stay applied and recorded).
    """
    began = time.monotonic()
    try:
        phase = Phase(phase)
    except ValueError:
        raise ValidationError(f"invalid phase {phase!r}: expected 'expand' or 'contract'") from None
    lock_timeout = _check_interval("lock_timeout", lock_timeout)
    statement_timeout = _check_interval("statement_timeout", statement_timeout)
    lock_wait_timeout = _check_interval("lock_wait_timeout", lock_wait_timeout)
    if not isinstance(advisory_lock_key, int) or not -(2**63) <= advisory_lock_key < 2**63:
        raise ValidationError(f"invalid advisory_lock_key {advisory_lock_key!r}: must be a signed 64-bit integer")

    phase_files = [(f, split_statements(f.sql)) for f in migration_set.phase(phase)]
    cancel = cancellation or Cancellation()
    cancel.check()
    with _connect(database_url) as conn:
        cancel.attach(conn)
        try:
            _take_advisory_lock(conn, advisory_lock_key, lock_wait_timeout, database_url, cancel)
            return _apply_locked(
                conn, migration_set, phase, phase_files, deployment_id, lock_timeout, statement_timeout, began, cancel
            )
        finally:
            cancel.attach(None)
            # Closing the connection releases the lock too; unlock explicitly so a pooled or
            # slow-closing connection does not hold it. Harmless if the connection is broken.
            if not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                try:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (advisory_lock_key,))
                except psycopg.Error:
                    pass


def _take_advisory_lock(conn: psycopg.Connection[Any], key: int, wait: str, database_url: str, cancel: Cancellation) -> None:
    """Wait at most ``wait`` for the session-level advisory lock (lock_timeout bounds advisory
    lock waits too). On timeout, name who holds it."""
    try:
        # Only the wait is bounded: no statement_timeout, the lock wait is the whole statement.
        conn.execute("SELECT set_config('lock_timeout', %s, false), set_config('statement_timeout', '0', false)", (wait,))
        cancel.check()
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
    except psycopg.errors.LockNotAvailable:
        raise MigrationError(
            f"timed out after {wait} waiting for the migration lock (advisory lock key {key}) on "
            f"{redact(database_url)}: held by {_lock_holder(conn, key)}. Another migration run is in progress, "
            f"or a session holds the lock by hand; try again later, or end that session"
        ) from None
    except psycopg.errors.QueryCanceled as exc:
        cancel.check()
        raise MigrationError(f"waiting for the migration lock on {redact(database_url)} was cancelled: {exc}") from exc
    except psycopg.Error as exc:
        raise MigrationError(f"cannot take the migration lock on {redact(database_url)}: {exc}") from exc


def _lock_holder(conn: psycopg.Connection[Any], key: int) -> str:
    """'pid N (application X, client Y)' for the session holding advisory lock ``key``."""
    try:
        row = conn.execute(
            "SELECT l.pid, a.application_name, a.client_addr FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.objsubid = 1 AND ((l.classid::bigint << 32) | l.objid::bigint) = %s",
            (key,),
        ).fetchone()
    except psycopg.Error:
        return "an unknown session (pg_locks could not be read)"
    if row is None:
        return "an unknown session (it released the lock meanwhile)"
    pid, application, client = row
    return f"pid {pid} (application {application or '?'}, client {client or 'local socket'})"


def _apply_locked(
    conn: psycopg.Connection[Any],
    migration_set: MigrationSet,
    phase: Phase,
    phase_files: list[tuple[MigrationFile, list[Statement]]],
    deployment_id: str | None,
    lock_timeout: str,
    statement_timeout: str,
    began: float,
    cancel: Cancellation,
) -> ApplyReport:
    try:
        _session_settings(conn, lock_timeout, statement_timeout)
    except psycopg.Error as exc:
        # The values passed our syntax check but the server refused them (e.g. out of range).
        raise ValidationError(f"invalid lock_timeout/statement_timeout: {exc}") from exc
    try:
        schema = conn.execute("SELECT current_schema()").fetchone()
        if schema is None or schema[0] is None:
            raise MigrationError("no schema to create the record table in: the search_path names no existing schema")
        table = sql.Identifier(schema[0], RECORD_TABLE)
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " name text PRIMARY KEY,"
                " phase text NOT NULL,"
                " checksum text NOT NULL,"
                " deployment_id text,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(table)
        )
        recorded = {name: checksum for name, checksum in conn.execute(sql.SQL("SELECT name, checksum FROM {}").format(table))}
    except psycopg.Error as exc:
        raise MigrationError(f"cannot prepare the record table {RECORD_TABLE}: {str(exc).strip()}") from exc

    # Refusals, before anything is applied.
    for file in migration_set.files:
        if file.name in recorded and recorded[file.name] != file.checksum:
            raise MigrationError(
                f"{file.name} was changed after it was applied: recorded checksum {recorded[file.name]}, "
                f"file now has {file.checksum}. Applied migrations must not be edited; restore the file "
                "and put the change in a new file. Nothing was applied."
            )
    pending = [(f, stmts) for f, stmts in phase_files if f.name not in recorded]
    for file, statements in pending:
        bad = _transaction_control(statements)
        if bad is not None:
            raise MigrationError(
                f"{file.name}: contains transaction control ({bad.words[0]}, line {_line_of(file.sql, bad.offset + 1)}); "
                "each file already runs in its own transaction. Remove it. Nothing was applied."
            )
    if phase is Phase.CONTRACT and pending:
        highest = max(f.number for f, _ in pending)
        missing = [f.name for f in migration_set.phase(Phase.EXPAND) if f.number < highest and f.name not in recorded]
        if missing:
            raise MigrationError(
                f"contract refused: expand file(s) {', '.join(missing)} not applied yet; apply the expand "
                "phase first. Nothing was applied."
            )

    applied: list[str] = []
    skipped = [f.name for f, _ in phase_files if f.name in recorded]
    record = sql.SQL("INSERT INTO {} (name, phase, checksum, deployment_id) VALUES (%s, %s, %s, %s)").format(table)
    for file, statements in pending:
        cancel.check()
        values = (file.name, file.phase.value, file.checksum, deployment_id)
        try:
            _session_settings(conn, lock_timeout, statement_timeout)
        except psycopg.Error as exc:
            raise MigrationError(f"{file.name}: cannot prepare the session: {str(exc).strip()}") from exc
        if needs_autocommit(statements):
            _apply_autocommit(conn, file, statements, record, values)
        else:
            try:
                with conn.transaction():
                    conn.execute(file.sql.encode("utf-8"))
                    conn.execute(record, values)
            except psycopg.Error as exc:
                raise MigrationError(_describe(file, exc)) from exc
        applied.append(file.name)
    return ApplyReport(applied=applied, skipped=skipped, phase=phase, seconds=time.monotonic() - began)


def _apply_autocommit(
    conn: psycopg.Connection[Any],
    file: MigrationFile,
    statements: list[Statement],
    record: sql.Composed,
    values: tuple[Any, ...],
) -> None:
    done = 0
    for statement in statements:
        try:
            conn.execute(statement.text.encode("utf-8"))
        except psycopg.Error as exc:
            message = _describe(file, exc, statement.offset)
            if done:
                message += f"; statements 1-{done} of {len(statements)} of this file were applied (not atomic: CONCURRENTLY)"
            invalid = _invalid_indexes(conn)
            if invalid:
                message += f"; invalid indexes left behind, drop them before re-running: {', '.join(invalid)}"
            raise MigrationError(message) from exc
        done += 1
    try:
        conn.execute(record, values)
    except psycopg.Error as exc:
        raise MigrationError(
            f"{file.name}: applied (outside a transaction: CONCURRENTLY) but could not be recorded: "
            f"{str(exc).strip()}; re-run to record it (make the file re-runnable: IF NOT EXISTS)"
        ) from exc


def _invalid_indexes(conn: psycopg.Connection[Any]) -> list[str]:
    try:
        rows = conn.execute(
            "SELECT i.indexrelid::regclass::text FROM pg_index i WHERE NOT i.indisvalid ORDER BY 1"
        ).fetchall()
    except psycopg.Error:
        return []
    return [row[0] for row in rows]


def applied(database_url: str) -> list[dict[str, Any]]:
    """The records of applied files, ordered by name (hence by number): dicts with ``name``,
    ``phase``, ``checksum``, ``deployment_id`` and ``applied_at`` (aware datetime). Empty if the
    record table does not exist yet (nothing was ever applied)."""
    with _connect(database_url) as conn:
        try:
            found = conn.execute("SELECT to_regclass(%s)", (RECORD_TABLE,)).fetchone()
            if found is None or found[0] is None:
                return []
            with conn.cursor(row_factory=dict_row) as cur:
                cur.execute(
                    sql.SQL(
                        "SELECT name, phase, checksum, deployment_id, applied_at FROM {} ORDER BY name"
                    ).format(sql.Identifier(RECORD_TABLE))
                )
                return list(cur.fetchall())
        except psycopg.Error as exc:
            raise MigrationError(f"cannot read {RECORD_TABLE} on {redact(database_url)}: {str(exc).strip()}") from exc
