"""Lint of migration sets: Squawk findings classified by expand/contract, plus our supplement.

Runs the real ``squawk`` binary (the squawk-cli package); no database is needed."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from controlplane.errors import MigrationError, ValidationError
from controlplane.migrations import lint as lint_mod
from controlplane.migrations.files import load_migration_set
from controlplane.migrations.lint import (
    Finding,
    LintReport,
    classify,
    find_squawk,
    format_text,
    lint,
    lint_exit_code,
)

TIMEOUTS = "SET lock_timeout = '2s';\nSET statement_timeout = '5min';\n"


def write(directory: Path, name: str, sql: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(sql, encoding="utf-8")
    return path


def errors(report: LintReport) -> list[Finding]:
    return [f for f in report.findings if f.severity == "error"]


def by_rule(report: LintReport, rule: str) -> list[Finding]:
    return [f for f in report.findings if f.rule == rule]


# pattern -> (SQL statement, the Squawk rule that must reject it in an expand file)
INCOMPATIBLE = {
    "drop column": ("ALTER TABLE users DROP COLUMN email;", "ban-drop-column"),
    "drop table": ("DROP TABLE legacy_sessions;", "ban-drop-table"),
    "rename column": ("ALTER TABLE users RENAME COLUMN email TO email_address;", "renaming-column"),
    "rename table": ("ALTER TABLE users RENAME TO accounts;", "renaming-table"),
    "change column type": ("ALTER TABLE users ALTER COLUMN age TYPE bigint;", "changing-column-type"),
    "add not null column without default": (
        "ALTER TABLE users ADD COLUMN tenant_id bigint NOT NULL;",
        "adding-required-field",
    ),
    "set not null": ("ALTER TABLE users ALTER COLUMN email SET NOT NULL;", "adding-not-nullable-field"),
}


@pytest.mark.parametrize("pattern", sorted(INCOMPATIBLE))
def test_incompatible_change_rejected_in_expand(tmp_path: Path, pattern: str) -> None:
    statement, rule = INCOMPATIBLE[pattern]
    write(tmp_path, "0001_change.expand.sql", TIMEOUTS + "\n" + statement + "\n")
    report = lint(load_migration_set(tmp_path))
    assert not report.ok
    assert lint_exit_code(report) == 1
    hits = [f for f in errors(report) if f.rule == rule]
    assert len(hits) == 1, format_text(report)
    hit = hits[0]
    assert hit.file == "0001_change.expand.sql"
    assert hit.line == 4  # two SET lines, a blank line, then the statement
    assert hit.column is not None and hit.column >= 1
    assert hit.phase == "expand"
    assert hit.hint and "contract" in hit.hint
    # Squawk reported it, so the supplement does not report it a second time
    assert not [f for f in report.findings if f.rule.startswith("bluegreen-")]


@pytest.mark.parametrize("pattern", sorted(INCOMPATIBLE))
def test_incompatible_change_accepted_in_contract(tmp_path: Path, pattern: str) -> None:
    statement, rule = INCOMPATIBLE[pattern]
    write(tmp_path, "0001_change.contract.sql", TIMEOUTS + "\n" + statement + "\n")
    report = lint(tmp_path)
    assert report.ok, format_text(report)
    assert lint_exit_code(report) == 0
    (hit,) = by_rule(report, rule)  # still reported, for the record
    assert hit.severity in ("info", "warning")
    assert hit.phase == "contract"
    assert hit.line == 4


def test_breaking_change_that_also_locks_follows_locking_option_in_contract(tmp_path: Path) -> None:
    write(tmp_path, "0001_widen.contract.sql", TIMEOUTS + "ALTER TABLE users ALTER COLUMN age TYPE bigint;\n")
    (hit,) = by_rule(lint(tmp_path), "changing-column-type")
    assert hit.severity == "warning"
    assert "ACCESS EXCLUSIVE" in hit.hint
    (hit,) = by_rule(lint(tmp_path, locking="error"), "changing-column-type")
    assert hit.severity == "error"
    # a pure drop stays informational in a contract file whatever the locking option
    write(tmp_path, "0002_drop.contract.sql", TIMEOUTS + "ALTER TABLE users DROP COLUMN IF EXISTS age;\n")
    (hit,) = by_rule(lint(tmp_path, locking="error"), "ban-drop-column")
    assert hit.severity == "info"


def test_safe_expand_passes_without_any_finding(tmp_path: Path) -> None:
    write(
        tmp_path,
        "0001_nickname.expand.sql",
        TIMEOUTS
        + "ALTER TABLE users ADD COLUMN IF NOT EXISTS nickname text;\n"
        "CREATE TABLE IF NOT EXISTS audit_log (\n"
        "    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n"
        "    note text\n"
        ");\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS users_nickname_idx ON users (nickname);\n",
    )
    report = lint(tmp_path, locking="error")
    assert report.findings == (), format_text(report)
    assert report.ok and report.errors == 0 and report.warnings == 0
    assert lint_exit_code(report) == 0
    assert format_text(report) == ""


def test_safe_expand_with_only_lock_timeout_passes_with_warnings(tmp_path: Path) -> None:
    write(
        tmp_path,
        "0001_nickname.expand.sql",
        "SET lock_timeout = '2s';\n"
        "ALTER TABLE users ADD COLUMN nickname text;\n"
        "CREATE INDEX CONCURRENTLY users_nickname_idx ON users (nickname);\n",
    )
    report = lint(tmp_path)
    assert report.ok, format_text(report)
    assert report.warnings >= 1  # e.g. no statement_timeout, IF NOT EXISTS missing
    assert not by_rule(report, "require-lock-timeout")


def test_non_concurrent_index_is_a_locking_warning_or_error(tmp_path: Path) -> None:
    write(tmp_path, "0001_idx.expand.sql", TIMEOUTS + "CREATE INDEX IF NOT EXISTS users_email_idx ON users (email);\n")
    report = lint(tmp_path)
    (hit,) = by_rule(report, "require-concurrent-index-creation")
    assert hit.severity == "warning" and hit.line == 3
    assert "concurrently" in hit.hint.lower()
    assert report.ok

    report = lint(tmp_path, locking="error")
    (hit,) = by_rule(report, "require-concurrent-index-creation")
    assert hit.severity == "error"
    assert not report.ok and lint_exit_code(report) == 1


def test_missing_lock_timeout_is_a_locking_finding_in_both_phases(tmp_path: Path) -> None:
    sql = "SET statement_timeout = '5min';\nALTER TABLE users ADD COLUMN IF NOT EXISTS nickname text;\n"
    write(tmp_path, "0001_a.expand.sql", sql)
    write(tmp_path, "0002_b.contract.sql", sql)
    report = lint(tmp_path)
    hits = by_rule(report, "require-lock-timeout")
    assert [(h.file, h.severity, h.line) for h in hits] == [
        ("0001_a.expand.sql", "warning", 2),
        ("0002_b.contract.sql", "warning", 2),
    ]
    assert report.ok
    hits = by_rule(lint(tmp_path, locking="error"), "require-lock-timeout")
    assert [h.severity for h in hits] == ["error", "error"]


def test_foreign_key_without_not_valid_is_locking(tmp_path: Path) -> None:
    write(
        tmp_path,
        "0001_fk.expand.sql",
        TIMEOUTS + "ALTER TABLE orders ADD CONSTRAINT orders_user_fk FOREIGN KEY (user_id) REFERENCES users (id);\n",
    )
    report = lint(tmp_path)
    assert {f.rule for f in report.findings} >= {"adding-foreign-key-constraint", "constraint-missing-not-valid"}
    assert report.ok
    assert not lint(tmp_path, locking="error").ok


def test_transaction_mode_follows_the_runner(tmp_path: Path) -> None:
    write(tmp_path, "0001_col.expand.sql", TIMEOUTS + "ALTER TABLE users ALTER COLUMN plan SET DEFAULT 'basic';\n")
    write(tmp_path, "0002_tx.expand.sql", "BEGIN;\n" + TIMEOUTS + "ALTER TABLE users ADD COLUMN IF NOT EXISTS a text;\nCOMMIT;\n")
    write(tmp_path, "0003_idx.expand.sql", TIMEOUTS + "CREATE INDEX CONCURRENTLY IF NOT EXISTS users_a_idx ON users (a);\n")
    report = lint(tmp_path)
    # files without CONCURRENTLY run in one transaction: no "missing transaction" advice, but
    # their own BEGIN/COMMIT is flagged
    assert not by_rule(report, "prefer-robust-stmts")
    assert {f.file for f in by_rule(report, "transaction-nesting")} == {"0002_tx.expand.sql"}
    # the CONCURRENTLY file runs outside a transaction
    assert not by_rule(report, "ban-concurrent-index-creation-in-transaction")
    assert report.ok

    forced = lint(tmp_path, assume_in_transaction=True)
    (hit,) = by_rule(forced, "ban-concurrent-index-creation-in-transaction")
    assert hit.file == "0003_idx.expand.sql"
    assert {f.file for f in by_rule(lint(tmp_path, assume_in_transaction=False), "prefer-robust-stmts")} == {
        "0001_col.expand.sql"
    }


def test_runner_sets_timeouts_drops_timeout_findings(tmp_path: Path) -> None:
    write(tmp_path, "0001_a.expand.sql", "ALTER TABLE users ADD COLUMN IF NOT EXISTS nickname text;\n")
    rules = {f.rule for f in lint(tmp_path, locking="error").findings}
    assert {"require-lock-timeout", "require-statement-timeout"} <= rules
    report = lint(tmp_path, locking="error", runner_sets_timeouts=True)
    assert report.findings == (), format_text(report)


def test_line_numbers_point_at_the_statement(tmp_path: Path) -> None:
    sql = (
        "-- 0003: drop the e-mail column\n"  # 1
        "SET lock_timeout = '2s';\n"  # 2
        "SET statement_timeout = '5min';\n"  # 3
        "\n"  # 4
        "ALTER TABLE users ADD COLUMN IF NOT EXISTS nickname text;\n"  # 5
        "/* a block\n"  # 6
        "   comment */\n"  # 7
        "ALTER TABLE users\n"  # 8
        "    DROP COLUMN IF EXISTS email;\n"  # 9
        "SELECT 'é'; ALTER TABLE users RENAME COLUMN a TO b;\n"  # 10
        "DROP TABLE IF EXISTS old_users;\n"  # 11
    )
    write(tmp_path, "0003_drop_email.expand.sql", sql)
    report = lint(tmp_path)
    where = {f.rule: (f.line, f.column) for f in errors(report)}
    assert where == {
        "ban-drop-column": (9, 5),
        "renaming-column": (10, 31),  # columns count characters, not UTF-8 bytes
        "ban-drop-table": (11, 1),
    }
    text = format_text(report)
    assert (
        "0003_drop_email.expand.sql:9: error [ban-drop-column] Dropping a column may break existing clients. hint: "
        in text
    )
    assert len(text.splitlines()) == len(report.findings)


def test_report_to_dict_and_exit_code(tmp_path: Path) -> None:
    write(tmp_path, "0001_a.expand.sql", TIMEOUTS + "ALTER TABLE users ADD COLUMN IF NOT EXISTS nickname text;\n")
    write(tmp_path, "0002_b.expand.sql", "CREATE INDEX users_nick_idx ON users (nickname);\n")
    report = lint(tmp_path)
    assert report.ok and report.errors == 0 and report.warnings > 0
    assert lint_exit_code(report) == 0
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["ok"] is True and data["errors"] == 0 and data["warnings"] == report.warnings
    assert set(data["findings"][0]) == {"file", "line", "column", "rule", "message", "hint", "severity", "phase"}
    assert {f["file"] for f in data["findings"]} == {"0002_b.expand.sql"}

    write(tmp_path, "0003_c.expand.sql", TIMEOUTS + "ALTER TABLE users DROP COLUMN IF EXISTS nickname;\n")
    report = lint(tmp_path)
    assert not report.ok and report.errors == 1
    assert lint_exit_code(report) == 1
    assert report.to_dict()["ok"] is False
    # findings are in migration order
    assert [f.file for f in report.findings] == sorted(f.file for f in report.findings)


@pytest.mark.parametrize(
    "name",
    ["README.txt", "1_short.expand.sql", "0001_Upper.expand.sql", "0001_x.sql", "0001_x.expand.SQL"],
)
def test_malformed_set_raises_naming_the_file(tmp_path: Path, name: str) -> None:
    write(tmp_path, "0001_ok.expand.sql", TIMEOUTS)
    write(tmp_path, name, "-- stray\n")
    with pytest.raises(MigrationError, match=name.replace(".", r"\.")):
        lint(tmp_path)


def test_missing_directory_and_duplicate_numbers_raise(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="does not exist"):
        lint(tmp_path / "nope")
    write(tmp_path, "0001_a.expand.sql", TIMEOUTS)
    write(tmp_path, "0001_b.contract.sql", TIMEOUTS)
    with pytest.raises(MigrationError, match="0001_b.contract.sql"):
        lint(tmp_path)


def test_empty_set_and_empty_files_are_ok(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    assert lint(tmp_path).findings == ()
    write(tmp_path, "0001_nothing.expand.sql", "")
    write(tmp_path, "0002_comment.expand.sql", "-- nothing to do yet\n")
    report = lint(tmp_path)
    assert report.ok and report.findings == ()


def test_invalid_locking_option(tmp_path: Path) -> None:
    write(tmp_path, "0001_a.expand.sql", TIMEOUTS)
    with pytest.raises(ValidationError, match="locking"):
        lint(tmp_path, locking="fatal")
    with pytest.raises(ValidationError, match="pg_version"):
        lint(tmp_path, pg_version="latest")


# --- the supplement: what Squawk misses ---------------------------------------------------------


def test_set_not_null_after_validated_check_is_still_breaking(tmp_path: Path) -> None:
    # Squawk (PostgreSQL >= 12) considers this lock-safe and stays silent; the old version's
    # inserts that omit the column still fail.
    sql = TIMEOUTS + (
        "ALTER TABLE users VALIDATE CONSTRAINT users_email_not_null;\n"
        "ALTER TABLE users ALTER COLUMN email SET NOT NULL;\n"
    )
    write(tmp_path, "0001_a.expand.sql", sql)
    report = lint(tmp_path)
    assert not by_rule(report, "adding-not-nullable-field")
    (hit,) = by_rule(report, "bluegreen-set-not-null")
    assert (hit.severity, hit.line) == ("error", 4)
    assert "users.email" in hit.message and hit.hint

    write(tmp_path, "0001_a.expand.sql", "")
    write(tmp_path, "0002_a.contract.sql", sql)
    assert lint(tmp_path).ok


def test_not_null_check_constraint_is_breaking_in_expand(tmp_path: Path) -> None:
    write(
        tmp_path,
        "0001_a.expand.sql",
        TIMEOUTS + "ALTER TABLE users ADD CONSTRAINT users_email_nn CHECK (email IS NOT NULL) NOT VALID;\n",
    )
    (hit,) = by_rule(lint(tmp_path), "bluegreen-not-null-check")
    assert hit.severity == "error" and hit.line == 3


def test_breaking_statements_inside_a_do_block(tmp_path: Path) -> None:
    write(
        tmp_path,
        "0001_a.expand.sql",
        TIMEOUTS
        + "DO $body$\nBEGIN\n  ALTER TABLE users DROP COLUMN email;\n  DROP TABLE old_users;\nEND\n$body$;\n",
    )
    report = lint(tmp_path)
    assert {(f.rule, f.line) for f in errors(report)} == {
        ("bluegreen-drop-column", 5),
        ("bluegreen-drop-table", 6),
    }


def test_required_column_spellings_squawk_misses(tmp_path: Path) -> None:
    write(
        tmp_path,
        "0001_a.expand.sql",
        TIMEOUTS
        + "ALTER TABLE users ADD COLUMN a bigint NOT NULL DEFAULT NULL;\n"
        "ALTER TABLE users ADD COLUMN b bigint DEFAULT 0 NOT NULL;\n"
        "ALTER TABLE users ADD COLUMN c text NOT NULL DEFAULT 'x;y';\n"
        "ALTER TABLE users ADD COLUMN d bigint GENERATED ALWAYS AS IDENTITY;\n"
        "ALTER TABLE users ADD COLUMN e text CHECK (e IS NOT NULL OR true);\n",
    )
    report = lint(tmp_path)
    assert [(f.rule, f.line) for f in errors(report)] == [("bluegreen-add-required-column", 3)]


def test_sql_in_comments_and_strings_is_not_flagged(tmp_path: Path) -> None:
    write(
        tmp_path,
        "0001_a.expand.sql",
        TIMEOUTS
        + "-- later: ALTER TABLE users DROP COLUMN email;\n"
        "/* DROP TABLE users; */\n"
        "COMMENT ON TABLE users IS 'ALTER TABLE users DROP COLUMN email; DROP TABLE users';\n",
    )
    report = lint(tmp_path)
    assert report.ok and not errors(report), format_text(report)


def test_supplement_leaves_safe_alterations_alone(tmp_path: Path) -> None:
    write(
        tmp_path,
        "0001_a.expand.sql",
        TIMEOUTS
        + "ALTER TABLE users ALTER COLUMN type SET DEFAULT 'basic';\n"  # a column named "type"
        "ALTER TABLE users ADD COLUMN IF NOT EXISTS price numeric(10, 2) NOT NULL DEFAULT 0;\n"
        "ALTER TABLE users ADD COLUMN IF NOT EXISTS seq bigserial;\n"
        "ALTER TABLE users ADD CONSTRAINT users_price_positive CHECK (price >= 0) NOT VALID;\n"
        "CREATE TABLE IF NOT EXISTS plans (id bigint PRIMARY KEY, name text NOT NULL);\n",
    )
    report = lint(tmp_path)
    assert not [f for f in report.findings if f.rule.startswith("bluegreen-")], format_text(report)
    assert report.ok, format_text(report)


def test_squawk_ignore_comment_is_honoured_by_squawk_and_supplement(tmp_path: Path) -> None:
    write(
        tmp_path,
        "0001_a.expand.sql",
        TIMEOUTS
        + "-- squawk-ignore ban-drop-column\n"
        "ALTER TABLE users DROP COLUMN IF EXISTS never_read;\n"
        "DO $$ BEGIN\n"
        "-- squawk-ignore ban-drop-column\n"
        "ALTER TABLE users DROP COLUMN IF EXISTS also_never_read;\n"
        "END $$;\n",
    )
    report = lint(tmp_path)
    assert report.ok, format_text(report)


def test_unparseable_file_is_an_error_in_expand_but_still_checked(tmp_path: Path) -> None:
    write(tmp_path, "0001_a.expand.sql", TIMEOUTS + "ALTER TABLE users DROP COLUMN email;\nALTER TABLE users ADD COLUMN (;\n")
    report = lint(tmp_path)
    rules = {f.rule for f in errors(report)}
    assert "syntax-error" in rules
    assert "bluegreen-drop-column" in rules  # Squawk stops at the syntax error; we do not

    write(tmp_path, "0001_a.expand.sql", "")
    write(tmp_path, "0002_a.contract.sql", "ALTER TABLE users ADD COLUMN (;\n")
    report = lint(tmp_path)
    assert report.ok
    assert {f.severity for f in by_rule(report, "syntax-error")} == {"warning"}


# --- the squawk binary --------------------------------------------------------------------------


def test_squawk_missing_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lint_mod.shutil, "which", lambda name: None)
    monkeypatch.setattr(lint_mod.sys, "executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(MigrationError, match="squawk-cli"):
        find_squawk()
    write(tmp_path / "m", "0001_a.expand.sql", TIMEOUTS)
    with pytest.raises(MigrationError, match="squawk-cli"):
        lint(tmp_path / "m")


def test_squawk_found_next_to_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = write(tmp_path / "bin", "squawk", "#!/bin/sh\necho '[]'\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(lint_mod.shutil, "which", lambda name: None)
    monkeypatch.setattr(lint_mod.sys, "executable", str(tmp_path / "bin" / "python"))
    assert find_squawk() == str(binary)


def test_squawk_failure_is_a_migration_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = write(tmp_path / "bin", "squawk", "#!/bin/sh\necho 'Configuration error: boom' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(lint_mod, "find_squawk", lambda: str(broken))
    write(tmp_path / "m", "0001_a.expand.sql", TIMEOUTS)
    with pytest.raises(MigrationError, match="boom"):
        lint(tmp_path / "m")


def test_project_squawk_config_is_not_picked_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a .squawk.toml in the working directory must not switch the breaking rules off
    (tmp_path / ".squawk.toml").write_text('excluded_rules = ["ban-drop-column"]\n')
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "m", "0001_a.expand.sql", TIMEOUTS + "ALTER TABLE users DROP COLUMN email;\n")
    assert by_rule(lint(tmp_path / "m"), "ban-drop-column")


def test_classification() -> None:
    assert classify("ban-drop-column") == "breaking"
    assert classify("ban-drop-not-null") == "breaking"
    assert classify("changing-column-type") == "breaking+lock"
    assert classify("require-lock-timeout") == "locking"
    assert classify("require-concurrent-index-creation") == "locking"
    assert classify("prefer-robust-stmts") == "other"
    # rules of a newer Squawk fall back by name
    assert classify("ban-drop-trigger") == "breaking"
    assert classify("renaming-whatever") == "breaking"
    assert classify("require-concurrent-vacuum") == "locking"
    assert classify("prefer-something") == "other"


def test_is_fast_enough_for_tens_of_files(tmp_path: Path) -> None:
    for n in range(1, 31):
        write(tmp_path, f"{n:04d}_step.expand.sql", TIMEOUTS + f"ALTER TABLE t ADD COLUMN IF NOT EXISTS c{n} text;\n")
    import time

    started = time.monotonic()
    report = lint(tmp_path)
    assert report.ok
    assert time.monotonic() - started < 10


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX paths")
def test_directory_with_glob_characters(tmp_path: Path) -> None:
    directory = tmp_path / "migr[ations]*"
    write(directory, "0001_a.expand.sql", TIMEOUTS + "ALTER TABLE users DROP COLUMN email;\n")
    assert by_rule(lint(directory), "ban-drop-column")
