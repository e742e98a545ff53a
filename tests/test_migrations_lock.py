"""The migration lock under bad conditions: a bounded wait naming the holder, and cancellation at
shutdown. Real PostgreSQL (tests/pg.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from controlplane.errors import MigrationError
from controlplane.migrations import apply as apply_module
from controlplane.migrations.apply import ADVISORY_LOCK_KEY, RECORD_TABLE, apply_phase
from controlplane.migrations.files import Phase
from tests.harness import wait_for
from tests.pg import pg_url, postgres_server  # noqa: F401 - fixtures
from tests.test_migrations_apply import RENAME_EMAIL, connect, make_set


def _waiting_for_advisory_lock(url: str) -> int:
    with connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchone()
        return int(row[0]) if row else 0


def _record_table_rows(url: str) -> int:
    with connect(url) as conn:
        exists = conn.execute("SELECT to_regclass(%s)", (RECORD_TABLE,)).fetchone()
        if exists is None or exists[0] is None:
            return 0
        row = conn.execute(f"SELECT count(*) FROM {RECORD_TABLE}").fetchone()
        return int(row[0]) if row else 0


def test_lock_wait_times_out_naming_the_holder(pg_url: str, tmp_path: Path) -> None:
    migration_set = make_set(tmp_path / "set", {}, copy_from=RENAME_EMAIL, names=("0001_create_users.expand.sql",))
    with connect(pg_url) as holder:
        holder.execute("SET application_name = 'by-hand'")
        holder.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        with pytest.raises(MigrationError) as info:
            apply_phase(migration_set, Phase.EXPAND, pg_url, lock_wait_timeout="300ms")
        message = str(info.value)
        assert "timed out after 300ms waiting for the migration lock" in message
        assert f"advisory lock key {ADVISORY_LOCK_KEY}" in message
        assert f"held by pid {holder.info.backend_pid} (application by-hand" in message
    assert _record_table_rows(pg_url) == 0  # nothing applied
    # Once the lock is free the same run goes through.
    report = apply_phase(migration_set, Phase.EXPAND, pg_url, lock_wait_timeout="300ms")
    assert report.applied == ["0001_create_users.expand.sql"]


def test_lock_wait_timeout_is_validated(pg_url: str, tmp_path: Path) -> None:
    from controlplane.errors import ValidationError

    migration_set = make_set(tmp_path / "set", {}, copy_from=RENAME_EMAIL, names=("0001_create_users.expand.sql",))
    with pytest.raises(ValidationError, match="lock_wait_timeout"):
        apply_phase(migration_set, Phase.EXPAND, pg_url, lock_wait_timeout="forever")


async def test_cancelled_run_stops_waiting_and_leaves_nothing_behind(pg_url: str, tmp_path: Path) -> None:
    migration_set = make_set(tmp_path / "set", {}, copy_from=RENAME_EMAIL, names=("0001_create_users.expand.sql",))
    with connect(pg_url) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))

        def run(cancellation: Any) -> Any:
            return apply_phase(migration_set, Phase.EXPAND, pg_url, cancellation=cancellation)

        task = asyncio.create_task(apply_module.run_cancellable(run))
        await wait_for(lambda: _waiting_for_advisory_lock(pg_url) == 1, timeout=20, message="run waiting for the lock")
        task.cancel()  # shutdown
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        # The run's thread has ended: its session no longer waits, nothing was applied.
        assert _waiting_for_advisory_lock(pg_url) == 0
        holder.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
    assert _record_table_rows(pg_url) == 0


async def test_cancelled_run_cancels_the_statement_in_progress(pg_url: str, tmp_path: Path) -> None:
    migration_set = make_set(tmp_path / "set", {"0001_slow.expand.sql": "CREATE TABLE slow AS SELECT 1 AS x FROM pg_sleep(300);\n"})

    def run(cancellation: Any) -> Any:
        return apply_phase(migration_set, Phase.EXPAND, pg_url, cancellation=cancellation)

    def sleeping() -> bool:
        with connect(pg_url) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%%pg_sleep(300)%%' "
                               "AND state = 'active' AND pid <> pg_backend_pid()").fetchone()
            return bool(row and row[0])

    task = asyncio.create_task(apply_module.run_cancellable(run))
    await wait_for(sleeping, timeout=20, message="migration statement running")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    assert not sleeping()
    with connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('slow')").fetchone() == (None,)  # rolled back
    assert _record_table_rows(pg_url) == 0


