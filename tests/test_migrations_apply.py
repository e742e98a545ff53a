"""apply_phase against a real PostgreSQL (one server for the module, a fresh database per test)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from controlplane.errors import MigrationError, ValidationError
from controlplane.migrations.apply import (
    ADVISORY_LOCK_KEY,
    RECORD_TABLE,
    ApplyReport,
    applied,
    apply_phase,
    redact,
    split_statements,
)
from controlplane.migrations.files import MigrationSet, Phase, load_migration_set
from tests.fixtures.app_versions import V1, V2, VERSIONS
from tests.harness import free_port
from tests.pg import pg_url, postgres_server  # noqa: F401 - fixtures

RENAME_EMAIL = Path(__file__).parents[1] / "examples" / "migrations" / "rename_email"


def make_set(directory: Path, files: dict[str, str], *, copy_from: Path | None = None, names: tuple[str, ...] = ()) -> MigrationSet:
    """A migration set in ``directory``: files copied from ``copy_from`` (all, or ``names``) plus ``files``."""
    directory.mkdir(parents=True, exist_ok=True)
    if copy_from is not None:
        for path in sorted(copy_from.iterdir()):
            if not names or path.name in names:
                shutil.copyfile(path, directory / path.name)
    for name, text in files.items():
        (directory / name).write_text(text)
    return load_migration_set(directory)


def connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True)


def records(url: str) -> list[str]:
    return [row["name"] for row in applied(url)]


def table_exists(url: str, name: str) -> bool:
    with connect(url) as conn:
        row = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()
        return row is not None and row[0] is not None


# --------------------------------------------------------------------------------------------
# The column-rename example
# --------------------------------------------------------------------------------------------


def test_expand_lets_v1_and_v2_read_and_write_the_same_rows(pg_url: str, tmp_path: Path) -> None:
    full = load_migration_set(RENAME_EMAIL)
    # v1's world: only the v1 schema, with rows written by v1 before the expand.
    v1_only = make_set(tmp_path / "v1", {}, copy_from=RENAME_EMAIL, names=("0001_create_users.expand.sql",))
    apply_phase(v1_only, Phase.EXPAND, pg_url, deployment_id="d-v1")
    with connect(pg_url) as conn:
        old = V1.create_user(conn, "old", "old@example.com")

    report = apply_phase(full, Phase.EXPAND, pg_url, deployment_id="d-v2")
    assert report.applied == ["0002_add_email.expand.sql"]
    assert report.skipped == ["0001_create_users.expand.sql"]
    assert report.phase is Phase.EXPAND and report.seconds >= 0
    rows = applied(pg_url)
    assert [(r["name"], r["phase"], r["deployment_id"]) for r in rows] == [
        ("0001_create_users.expand.sql", "expand", "d-v1"),
        ("0002_add_email.expand.sql", "expand", "d-v2"),
    ]
    assert rows[1]["checksum"] == full.files[1].checksum and rows[1]["applied_at"] is not None

    with connect(pg_url) as conn:
        # The backfill: v2 sees the row v1 wrote before the expand.
        assert V2.get_address(conn, old) == "old@example.com"
        # Each version reads its own writes and the other's, for inserts and updates.
        for writer in VERSIONS:
            for reader in VERSIONS:
                user = writer.create_user(conn, f"{writer.version}-{reader.version}", f"{writer.version}@example.com")
                assert reader.get_address(conn, user) == f"{writer.version}@example.com"
                writer.set_address(conn, user, f"new-{writer.version}@example.com")
                assert reader.get_address(conn, user) == f"new-{writer.version}@example.com"
        V2.set_address(conn, old, "moved@example.com")
        assert V1.get_address(conn, old) == "moved@example.com"


def test_contract_breaks_v1_and_keeps_v2(pg_url: str) -> None:
    migration_set = load_migration_set(RENAME_EMAIL)
    apply_phase(migration_set, Phase.EXPAND, pg_url)
    with connect(pg_url) as conn:
        by_v1 = V1.create_user(conn, "a", "a@example.com")
    report = apply_phase(migration_set, Phase.CONTRACT, pg_url, deployment_id="d-contract")
    assert report.applied == ["0003_drop_mail.contract.sql"] and report.skipped == []
    assert records(pg_url) == [f.name for f in migration_set.files]

    with connect(pg_url) as conn:
        # Exactly why the control plane gates contract: v1 is broken from here on.
        with pytest.raises(psycopg.errors.UndefinedColumn):
            V1.create_user(conn, "b", "b@example.com")
        with pytest.raises(psycopg.errors.UndefinedColumn):
            V1.get_address(conn, by_v1)
        assert V2.get_address(conn, by_v1) == "a@example.com"
        user = V2.create_user(conn, "c", "c@example.com")
        V2.set_address(conn, user, "c2@example.com")
        assert V2.get_address(conn, user) == "c2@example.com"


def test_contract_refused_while_expand_files_are_pending(pg_url: str, tmp_path: Path) -> None:
    migration_set = load_migration_set(RENAME_EMAIL)
    with pytest.raises(MigrationError, match=r"0001_create_users\.expand\.sql, 0002_add_email\.expand\.sql not applied"):
        apply_phase(migration_set, Phase.CONTRACT, pg_url)
    assert records(pg_url) == []


def test_rerunning_expand_is_idempotent(pg_url: str) -> None:
    migration_set = load_migration_set(RENAME_EMAIL)
    first = apply_phase(migration_set, "expand", pg_url)
    assert first.applied == ["0001_create_users.expand.sql", "0002_add_email.expand.sql"]
    before = applied(pg_url)
    second = apply_phase(migration_set, "expand", pg_url)
    assert second.applied == []
    assert second.skipped == ["0001_create_users.expand.sql", "0002_add_email.expand.sql"]
    assert applied(pg_url) == before  # same rows, same applied_at: nothing ran again


# --------------------------------------------------------------------------------------------
# Concurrency, tampering, timeouts, failures
# --------------------------------------------------------------------------------------------


def test_concurrent_runs_apply_each_file_once(pg_url: str, tmp_path: Path) -> None:
    migration_set = make_set(
        tmp_path / "set",
        {"0003_counted.expand.sql": "CREATE TABLE IF NOT EXISTS runs (n int);\nINSERT INTO runs VALUES (1);\n"},
        copy_from=RENAME_EMAIL,
        names=("0001_create_users.expand.sql", "0002_add_email.expand.sql"),
    )
    results: list[ApplyReport | BaseException] = []

    def run() -> None:
        try:
            results.append(apply_phase(migration_set, Phase.EXPAND, pg_url))
        except BaseException as exc:  # noqa: BLE001 - reported below
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    with connect(pg_url) as holder:
        # Hold the migration lock so both runs are provably inside apply_phase, waiting for
        # it, before either may start; then let them race.
        holder.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while True:
            row = holder.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchone()
            if row is not None and row[0] == 2:
                break
            assert time.monotonic() < deadline, "the two runs never both waited for the advisory lock"
            time.sleep(0.02)
        holder.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
        for thread in threads:
            thread.join(20)
    assert not any(t.is_alive() for t in threads)
    assert all(isinstance(r, ApplyReport) for r in results), results
    reports = [r for r in results if isinstance(r, ApplyReport)]
    names = [f.name for f in migration_set.files]
    applied_by = sorted((r.applied for r in reports), key=len)
    assert applied_by == [[], names]  # one run did everything, the other found it done
    assert sorted(reports, key=lambda r: len(r.applied))[0].skipped == names
    assert records(pg_url) == names
    with connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (1,)


def test_changed_checksum_of_applied_file_is_refused(pg_url: str, tmp_path: Path) -> None:
    directory = tmp_path / "set"
    original = make_set(directory, {}, copy_from=RENAME_EMAIL)
    apply_phase(original, Phase.EXPAND, pg_url)
    before = applied(pg_url)

    edited = directory / "0002_add_email.expand.sql"
    edited.write_text(edited.read_text() + "\n-- an innocent-looking edit\n")
    (directory / "0004_more.expand.sql").write_text("CREATE TABLE more (id int);\n")
    changed = load_migration_set(directory)
    old_sum = original.files[1].checksum
    new_sum = changed.files[1].checksum
    with pytest.raises(MigrationError) as caught:
        apply_phase(changed, Phase.EXPAND, pg_url)
    message = str(caught.value)
    assert "0002_add_email.expand.sql" in message and old_sum in message and new_sum in message
    assert not table_exists(pg_url, "more")
    assert applied(pg_url) == before
    # The contract phase is refused the same way: every recorded file of the set is compared.
    with pytest.raises(MigrationError, match="0002_add_email"):
        apply_phase(changed, Phase.CONTRACT, pg_url)


def test_timeouts_are_set_for_every_file(pg_url: str, tmp_path: Path) -> None:
    probe = "CREATE TABLE {0} AS SELECT current_setting('lock_timeout') AS lt, current_setting('statement_timeout') AS st;\n"
    migration_set = make_set(
        tmp_path / "set",
        {
            "0001_probe.expand.sql": probe.format("probe1") + "SET lock_timeout = '1min';\n",  # leaks? no: reset
            "0002_probe.expand.sql": probe.format("probe2"),
        },
    )
    apply_phase(migration_set, Phase.EXPAND, pg_url, lock_timeout="200ms", statement_timeout="3s")
    with connect(pg_url) as conn:
        assert conn.execute("SELECT lt, st FROM probe1").fetchone() == ("200ms", "3s")
        assert conn.execute("SELECT lt, st FROM probe2").fetchone() == ("200ms", "3s")


def test_lock_timeout_makes_a_blocked_file_fail_fast(pg_url: str, tmp_path: Path) -> None:
    with connect(pg_url) as conn:
        conn.execute("CREATE TABLE busy (id int)")
    migration_set = make_set(
        tmp_path / "set",
        {
            "0001_ok.expand.sql": "CREATE TABLE ok (id int);\n",
            "0002_alter_busy.expand.sql": "ALTER TABLE busy ADD COLUMN note text;\n",
        },
    )
    with connect(pg_url) as holder:
        with holder.transaction():
            holder.execute("LOCK TABLE busy IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(MigrationError) as caught:
                apply_phase(migration_set, Phase.EXPAND, pg_url, lock_timeout="200ms")
            elapsed = time.monotonic() - started
    assert elapsed < 3, f"took {elapsed:.1f}s despite lock_timeout=200ms"
    assert "0002_alter_busy.expand.sql" in str(caught.value) and "lock timeout" in str(caught.value)
    assert "55P03" in str(caught.value)
    assert records(pg_url) == ["0001_ok.expand.sql"]


def test_statement_timeout_stops_a_slow_file(pg_url: str, tmp_path: Path) -> None:
    migration_set = make_set(tmp_path / "set", {"0001_slow.expand.sql": "SELECT pg_sleep(20);\n"})
    started = time.monotonic()
    with pytest.raises(MigrationError, match=r"0001_slow\.expand\.sql: canceling statement due to statement timeout"):
        apply_phase(migration_set, Phase.EXPAND, pg_url, statement_timeout="300ms")
    assert time.monotonic() - started < 5
    assert records(pg_url) == []


def test_failing_file_keeps_earlier_files_and_records_nothing_for_itself(pg_url: str, tmp_path: Path) -> None:
    migration_set = make_set(
        tmp_path / "set",
        {
            "0001_a.expand.sql": "CREATE TABLE a (id int);\n",
            "0002_b.expand.sql": "CREATE TABLE b (id int);\n",
            "0003_broken.expand.sql": "CREATE TABLE c (id int);\n\nCREATE TABEL d (id int);\n",
            "0004_after.expand.sql": "CREATE TABLE after (id int);\n",
        },
    )
    with pytest.raises(MigrationError) as caught:
        apply_phase(migration_set, Phase.EXPAND, pg_url)
    message = str(caught.value)
    assert message.startswith("0003_broken.expand.sql: syntax error at or near \"TABEL\"")
    assert "line 3" in message and "42601" in message
    assert records(pg_url) == ["0001_a.expand.sql", "0002_b.expand.sql"]
    assert table_exists(pg_url, "a") and table_exists(pg_url, "b")
    assert not table_exists(pg_url, "c") and not table_exists(pg_url, "after")

    # Fixed file: a re-run resumes where it failed.
    (tmp_path / "set" / "0003_broken.expand.sql").write_text("CREATE TABLE c (id int);\n")
    report = apply_phase(load_migration_set(tmp_path / "set"), Phase.EXPAND, pg_url)
    assert report.applied == ["0003_broken.expand.sql", "0004_after.expand.sql"]
    assert report.skipped == ["0001_a.expand.sql", "0002_b.expand.sql"]


def test_runtime_error_rolls_back_the_whole_file(pg_url: str, tmp_path: Path) -> None:
    migration_set = make_set(
        tmp_path / "set",
        {"0001_half.expand.sql": "CREATE TABLE half (id int);\nINSERT INTO half VALUES (1);\nSELECT 1 / 0;\n"},
    )
    with pytest.raises(MigrationError, match=r"0001_half\.expand\.sql: division by zero \(SQLSTATE 22012\)"):
        apply_phase(migration_set, Phase.EXPAND, pg_url)
    assert not table_exists(pg_url, "half")
    assert records(pg_url) == []


def test_concurrently_runs_outside_a_transaction(pg_url: str, tmp_path: Path) -> None:
    migration_set = make_set(
        tmp_path / "set",
        {
            "0001_table.expand.sql": "CREATE TABLE t (id int, code text);\nINSERT INTO t VALUES (1, 'x'), (2, 'x');\n",
            "0002_index.expand.sql": (
                "-- one statement per file is the advice; two here to test splitting\n"
                "SET lock_timeout = '1s';\n"
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_id ON t (id);\n"
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_code ON t (code) WHERE code <> ';';\n"
            ),
            "0003_unique.expand.sql": "CREATE UNIQUE INDEX CONCURRENTLY t_code_unique ON t (code);\n",
        },
    )
    with pytest.raises(MigrationError) as caught:
        apply_phase(migration_set, Phase.EXPAND, pg_url)
    message = str(caught.value)
    assert message.startswith("0003_unique.expand.sql: could not create unique index")
    assert "invalid indexes left behind" in message and "t_code_unique" in message
    assert records(pg_url) == ["0001_table.expand.sql", "0002_index.expand.sql"]
    with connect(pg_url) as conn:
        valid = conn.execute(
            "SELECT indexrelid::regclass::text, indisvalid FROM pg_index WHERE indrelid = 't'::regclass ORDER BY 1"
        ).fetchall()
    assert valid == [("t_code", True), ("t_code_unique", False), ("t_id", True)]


def test_files_with_their_own_transaction_control_are_refused(pg_url: str, tmp_path: Path) -> None:
    migration_set = make_set(
        tmp_path / "set",
        {
            "0001_fine.expand.sql": "CREATE TABLE fine (id int);\n",
            "0002_commits.expand.sql": "-- 'BEGIN;' in a comment is fine\nCREATE TABLE x (id int);\nCOMMIT;\n",
        },
    )
    with pytest.raises(MigrationError, match=r"0002_commits\.expand\.sql: contains transaction control \(COMMIT, line 3\)"):
        apply_phase(migration_set, Phase.EXPAND, pg_url)
    assert records(pg_url) == [] and not table_exists(pg_url, "fine")


# --------------------------------------------------------------------------------------------
# Arguments and helpers
# --------------------------------------------------------------------------------------------


def test_applied_is_empty_before_the_first_run(pg_url: str) -> None:
    assert applied(pg_url) == []
    assert not table_exists(pg_url, RECORD_TABLE)


@pytest.mark.parametrize(
    ("field", "value"), [("lock_timeout", "5 seconds"), ("lock_timeout", "-1s"), ("statement_timeout", "15m"), ("statement_timeout", "")]
)
def test_bad_timeouts_are_refused_before_connecting(field: str, value: str) -> None:
    migration_set = load_migration_set(RENAME_EMAIL)
    with pytest.raises(ValidationError, match=field):
        apply_phase(migration_set, Phase.EXPAND, "postgresql://nowhere.invalid/db", **{field: value})


def test_unreachable_database_error_hides_the_password() -> None:
    url = f"postgresql://app:s3cret@127.0.0.1:{free_port()}/db"
    with pytest.raises(MigrationError) as caught:
        apply_phase(load_migration_set(RENAME_EMAIL), Phase.EXPAND, url)
    assert "cannot connect to postgresql://app:***@127.0.0.1" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_redact() -> None:
    assert redact("postgresql://u:p%40ss@h:5432/db?sslmode=require") == "postgresql://u:***@h:5432/db?sslmode=require"
    assert redact("postgresql://u@h/db?password=x&sslmode=require") == "postgresql://u@h/db?password=***&sslmode=require"
    assert redact("host=h user=u password='a b' dbname=d") == "host=h user=u password=*** dbname=d"
    assert redact("postgresql://h/db") == "postgresql://h/db"


def test_split_statements() -> None:
    text = (
        "-- lead; comment\nSELECT 'a;b', E'c\\';d', \"e;f\";\n"
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $fn$ BEGIN RETURN 1; END $fn$;\n"
        "CREATE FUNCTION g() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT CASE WHEN true THEN 2 END; END;\n"
        "/* a /* nested; */ comment; */ CREATE INDEX CONCURRENTLY i ON t (x)\n-- trailing; comment\n"
    )
    statements = split_statements(text)
    assert [s.words[:3] for s in statements] == [
        ("SELECT",),
        ("CREATE", "FUNCTION", "F"),
        ("CREATE", "FUNCTION", "G"),
        ("CREATE", "INDEX", "CONCURRENTLY"),
    ]
    assert statements[0].text == "-- lead; comment\nSELECT 'a;b', E'c\\';d', \"e;f\""
    assert text[statements[1].offset :].startswith("CREATE FUNCTION f()")
    assert statements[2].text.endswith("END")
    assert split_statements("-- nothing\n;;  /* here */") == []
