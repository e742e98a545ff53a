"""Lint a migration set with Squawk, judged by expand/contract rules.

Every file is checked by `Squawk <https://squawkhq.com>`_ (the ``squawk`` binary shipped by the
``squawk-cli`` PyPI package), then by a small regex *supplement* of ours, and each finding gets a
severity from its category and the file's phase:

==============  ==========================  =====================================================
category        expand file                 contract file
==============  ==========================  =====================================================
breaking        ``error``                   ``info`` (reported, never fails: contract exists to
                                            break the old version)
breaking+lock   ``error``                   the ``locking`` option (still a lock hazard)
locking         the ``locking`` option      the ``locking`` option
                (``"warning"`` by default,
                or ``"error"``)
syntax          ``error`` (cannot be        ``warning``
                shown to be N-1 safe)
other           ``warning``                 ``warning``
==============  ==========================  =====================================================

*Breaking* means: the previous version (N-1) of the application breaks while both versions share
the schema, either because the schema it uses disappears or changes, or because writes it makes
are now refused, or because it can now read values it never expected (NULLs, missing defaults).

Squawk rules (2.70, the default rule set)
-----------------------------------------

=============================================  ================  =====================================
rule                                           category          why
=============================================  ================  =====================================
ban-drop-column                                breaking          N-1 still reads/writes it
ban-drop-table                                 breaking          N-1 still uses it
ban-drop-view / -schema / -function / -type    breaking          N-1 may still use them
ban-drop-sequence / -domain / -extension       breaking          objects N-1 may depend on
ban-drop-database                              breaking          everything goes
ban-drop-default                               breaking          N-1 inserts that omit the column
                                                                 relied on it
ban-drop-not-null                              breaking          N-1 may read NULLs the new version
                                                                 writes; SET DEFAULT is the N-1-safe
                                                                 way to let the new version omit a
                                                                 column (``-- squawk-ignore`` it if
                                                                 N-1 tolerates NULLs)
ban-drop-constraint                            breaking          N-1 may rely on the guarantee (same
                                                                 reasoning as ban-drop-not-null)
ban-drop-generated-expression                  breaking          column stops being computed for N-1
ban-alter-identity                             breaking          N-1 inserts may start failing
ban-set-schema                                 breaking          N-1 looks it up by the old name
renaming-column / renaming-table               breaking          N-1 uses the old name
renaming-object (views, types, indexes, ...)   breaking          N-1 uses the old name
adding-required-field                          breaking          NOT NULL without default: N-1 inserts
                                                                 (which omit the column) fail
changing-column-type                           breaking+lock     N-1 reads/writes the old type; also a
                                                                 table rewrite under ACCESS EXCLUSIVE
adding-not-nullable-field (SET NOT NULL)       breaking+lock     N-1 inserts omitting it fail; also a
                                                                 full scan under ACCESS EXCLUSIVE
require-lock-timeout                           locking           no ``SET lock_timeout`` before a
                                                                 statement taking a strong lock
require-statement-timeout                      locking           no ``SET statement_timeout``
require-timeout-settings (alias of the two)    locking
require-concurrent-index-creation              locking           CREATE INDEX without CONCURRENTLY
require-concurrent-index-deletion              locking           DROP INDEX without CONCURRENTLY
require-concurrent-reindex                     locking           REINDEX without CONCURRENTLY
require-concurrent-partition-detach            locking           DETACH PARTITION without CONCURRENTLY
constraint-missing-not-valid                   locking           constraint validated under a lock
adding-foreign-key-constraint                  locking           FK without NOT VALID scans both tables
disallowed-unique-constraint                   locking           UNIQUE built under ACCESS EXCLUSIVE
                                                                 (it can also refuse N-1 duplicates:
                                                                 a semantic question we leave to
                                                                 review)
adding-field-with-default                      locking           volatile default / generated column
                                                                 rewrites the table
adding-serial-primary-key-field                locking           PK built under ACCESS EXCLUSIVE
ban-alter-domain-with-add-constraint           locking           validates every use of the domain
prefer-repack (PostgreSQL >= 19)               locking           CLUSTER / VACUUM FULL lock the table
ban-create-domain-with-constraint              other             hard to change online later
ban-concurrent-index-creation-in-transaction   other             fails at apply time, changes nothing
ban-truncate-cascade                           other             data loss, not a schema contract
ban-uncommitted-transaction, transaction-      other             transaction structure
nesting
prefer-robust-stmts, prefer-bigint-over-int,   other             style / future-proofing
prefer-bigint-over-smallint, prefer-identity,
prefer-text-field, prefer-timestamp-tz,
ban-char-field, identifier-too-long,
require-enum-value-ordering,
ban-duplicate-column-assignments,
require-table-schema (opt-in)
unused-ignore                                  other             a ``squawk-ignore`` names no rule
syntax-error                                   syntax            Squawk could not parse the file, so
                                                                 it checked nothing else in it
=============================================  ================  =====================================

Squawk 2.70 also has opt-in rules that we do not enable (``ban-add-column``, ``ban-revoke``,
``ban-new-write-restriction``, ``ban-set-default``, policy / role / RLS / trigger rules, ...).
A rule name we do not know (a newer Squawk) falls back by prefix: ``ban-drop-*`` and
``renaming-*`` are breaking, ``require-concurrent-*`` and ``require-*-timeout`` locking, anything
else other.

Squawk is run with an explicit PostgreSQL version (``pg_version``, default ``"15"``, the same as
Squawk's built-in default, pinned so a Squawk upgrade cannot change it silently). It changes rules:
below 12, ``SET NOT NULL`` is flagged even after a validated ``CHECK (c IS NOT NULL)``, and below
12 any ``DEFAULT`` on a new column is a table rewrite (adding-field-with-default); from 19,
prefer-repack fires. Squawk is also given an empty configuration file, so a ``.squawk.toml``
lying in the working directory or its parents cannot turn rules off behind our back;
``-- squawk-ignore <rule>`` / ``-- squawk-ignore-file [rules]`` comments in the SQL are honoured
(by Squawk, and by the supplement below), so a reviewed exception stays possible.

By default each file is linted the way ``apply_phase`` runs it: as one transaction
(``--assume-in-transaction``: no "missing transaction" advice; BEGIN/COMMIT in the file is
flagged as transaction-nesting), except files mentioning CONCURRENTLY or VACUUM, which the runner
executes statement by statement outside a transaction. ``lint(..., assume_in_transaction=True |
False)`` forces one mode. ``apply_phase`` also sets lock_timeout and statement_timeout before
every file; ``lint(..., runner_sets_timeouts=True)`` then drops Squawk's require-lock-timeout and
require-statement-timeout (off by default: a file that runs elsewhere, e.g. by psql, has no such
guard).

Our supplement (rule names ``bluegreen-*``, category breaking)
---------------------------------------------------------------

Squawk 2.70 has a rule for every pattern the expand/contract contract forbids (drop column or
table, rename column or table, change column type, NOT NULL column without default, SET NOT NULL),
but misses some spellings; the supplement reports those only where Squawk did not already report
the matching rule on the same statement:

* ``bluegreen-set-not-null``: ``ALTER COLUMN c SET NOT NULL`` -- Squawk skips it when a validated
  ``CHECK (c IS NOT NULL)`` precedes it (lock-safe on PostgreSQL >= 12, but still N-1 breaking).
* ``bluegreen-not-null-check``: ``ADD [CONSTRAINT n] CHECK (c IS NOT NULL)``, even ``NOT VALID``
  (new rows are checked at once): the same break as SET NOT NULL. No Squawk default rule.
* ``bluegreen-add-required-column``: ``ADD COLUMN c ... NOT NULL DEFAULT NULL`` and
  ``ADD COLUMN c ... PRIMARY KEY`` without a default, which adding-required-field does not flag.
* ``bluegreen-drop-column``, ``bluegreen-drop-table``, ``bluegreen-rename-column``,
  ``bluegreen-rename-table``, ``bluegreen-change-column-type``: the same patterns as Squawk's
  rules, which matter where Squawk does not look: inside dollar-quoted bodies (``DO $$ ... $$``,
  which Squawk does not analyse) and in files Squawk cannot parse (it then reports only
  ``syntax-error``).

The supplement works on the text with comments, string literals and quoted identifiers blanked
out, split on ``;``; it is a pattern match, not a parser.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import MigrationError, ValidationError
from .files import MigrationFile, MigrationSet, Phase, load_migration_set

__all__ = [
    "DEFAULT_PG_VERSION",
    "RULE_CATEGORIES",
    "Finding",
    "LintReport",
    "classify",
    "find_squawk",
    "format_text",
    "lint",
    "lint_exit_code",
]

DEFAULT_PG_VERSION = "15"
SQUAWK_TIMEOUT_S = 60.0

BREAKING = "breaking"
BREAKING_LOCK = "breaking+lock"
LOCKING = "locking"
SYNTAX = "syntax"
OTHER = "other"

RULE_CATEGORIES: dict[str, str] = {
    # breaking for N-1 clients
    "ban-drop-column": BREAKING,
    "ban-drop-table": BREAKING,
    "ban-drop-view": BREAKING,
    "ban-drop-schema": BREAKING,
    "ban-drop-function": BREAKING,
    "ban-drop-type": BREAKING,
    "ban-drop-sequence": BREAKING,
    "ban-drop-domain": BREAKING,
    "ban-drop-extension": BREAKING,
    "ban-drop-database": BREAKING,
    "ban-drop-default": BREAKING,
    "ban-drop-not-null": BREAKING,
    "ban-drop-constraint": BREAKING,
    "ban-drop-generated-expression": BREAKING,
    "ban-alter-identity": BREAKING,
    "ban-set-schema": BREAKING,
    "renaming-column": BREAKING,
    "renaming-table": BREAKING,
    "renaming-object": BREAKING,
    "adding-required-field": BREAKING,
    "changing-column-type": BREAKING_LOCK,
    "adding-not-nullable-field": BREAKING_LOCK,
    # locking hazards
    "require-lock-timeout": LOCKING,
    "require-statement-timeout": LOCKING,
    "require-timeout-settings": LOCKING,
    "require-concurrent-index-creation": LOCKING,
    "require-concurrent-index-deletion": LOCKING,
    "require-concurrent-reindex": LOCKING,
    "require-concurrent-partition-detach": LOCKING,
    "constraint-missing-not-valid": LOCKING,
    "adding-foreign-key-constraint": LOCKING,
    "disallowed-unique-constraint": LOCKING,
    "adding-field-with-default": LOCKING,
    "adding-serial-primary-key-field": LOCKING,
    "ban-alter-domain-with-add-constraint": LOCKING,
    "prefer-repack": LOCKING,
    # other
    "ban-create-domain-with-constraint": OTHER,
    "ban-concurrent-index-creation-in-transaction": OTHER,
    "ban-truncate-cascade": OTHER,
    "ban-uncommitted-transaction": OTHER,
    "transaction-nesting": OTHER,
    "prefer-robust-stmts": OTHER,
    "prefer-bigint-over-int": OTHER,
    "prefer-bigint-over-smallint": OTHER,
    "prefer-identity": OTHER,
    "prefer-text-field": OTHER,
    "prefer-timestamp-tz": OTHER,
    "ban-char-field": OTHER,
    "identifier-too-long": OTHER,
    "require-enum-value-ordering": OTHER,
    "require-table-schema": OTHER,
    "ban-duplicate-column-assignments": OTHER,
    "unused-ignore": OTHER,
    "syntax-error": SYNTAX,
    # our supplement
    "bluegreen-drop-column": BREAKING,
    "bluegreen-drop-table": BREAKING,
    "bluegreen-rename-column": BREAKING,
    "bluegreen-rename-table": BREAKING,
    "bluegreen-change-column-type": BREAKING_LOCK,
    "bluegreen-add-required-column": BREAKING,
    "bluegreen-set-not-null": BREAKING,
    "bluegreen-not-null-check": BREAKING,
}

_CONTRACT_LATER = "; do it in a later .contract.sql file, once no environment can roll back to a version that needs it"
_HINTS: dict[str, str] = {
    "ban-drop-column": "make the new version stop reading and writing the column" + _CONTRACT_LATER,
    "ban-drop-table": "make the new version stop using the table" + _CONTRACT_LATER,
    "renaming-column": (
        "add a column with the new name (nullable), write both and backfill, read the new one; "
        "drop the old column in a later .contract.sql file"
    ),
    "renaming-table": (
        "create the table under the new name (or a view) and move to it; drop or rename the old "
        "table in a later .contract.sql file"
    ),
    "renaming-object": "create the object under its new name alongside the old one; remove the old name in a later .contract.sql file",
    "changing-column-type": (
        "add a column of the new type, write both and backfill, read the new one; drop the old "
        "column in a later .contract.sql file"
    ),
    "adding-required-field": (
        "add the column nullable or with a non-volatile DEFAULT; make it NOT NULL in a later "
        ".contract.sql file once every running version writes it"
    ),
    "adding-not-nullable-field": (
        "keep the column nullable in expand; add NOT NULL (CHECK ... NOT VALID, VALIDATE, then "
        "SET NOT NULL) in a later .contract.sql file once every running version writes it"
    ),
    "ban-drop-not-null": (
        "the previous version may read NULLs the new one writes: give the column a DEFAULT in "
        "expand instead, or drop NOT NULL in a .contract.sql file (or '-- squawk-ignore "
        "ban-drop-not-null' if the previous version tolerates NULLs)"
    ),
    "ban-drop-default": "the previous version may insert without this column; keep the default" + _CONTRACT_LATER,
    "ban-drop-constraint": "the previous version may rely on the constraint" + _CONTRACT_LATER,
}
_SUPPLEMENT_EQUIVALENT: dict[str, str] = {
    # our rule -> the Squawk rule it duplicates (for de-duplication and squawk-ignore comments)
    "bluegreen-drop-column": "ban-drop-column",
    "bluegreen-drop-table": "ban-drop-table",
    "bluegreen-rename-column": "renaming-column",
    "bluegreen-rename-table": "renaming-table",
    "bluegreen-change-column-type": "changing-column-type",
    "bluegreen-add-required-column": "adding-required-field",
    "bluegreen-set-not-null": "adding-not-nullable-field",
    "bluegreen-not-null-check": "adding-not-nullable-field",
}
for _ours, _theirs in _SUPPLEMENT_EQUIVALENT.items():
    _HINTS[_ours] = _HINTS[_theirs]
_HINTS["bluegreen-not-null-check"] = _HINTS["adding-not-nullable-field"]
_GENERIC_BREAKING_HINT = "this breaks the previous version while both share the schema; move it to a .contract.sql file"
_CONTRACT_HINT = (
    "allowed in a contract file, which runs only once no environment can roll back to a version "
    "that needs the old schema"
)
_TYPE_LOCK_HINT = (
    "a type change rewrites the table under an ACCESS EXCLUSIVE lock: set lock_timeout first; on a "
    "big table add a new column and backfill it instead"
)
_CONTRACT_LOCK_HINTS = {
    "changing-column-type": _TYPE_LOCK_HINT,
    "bluegreen-change-column-type": _TYPE_LOCK_HINT,
    "adding-not-nullable-field": (
        "add CHECK (col IS NOT NULL) NOT VALID, VALIDATE CONSTRAINT, then SET NOT NULL: "
        "PostgreSQL 12+ then skips the scan under ACCESS EXCLUSIVE"
    ),
}
_SYNTAX_HINT = "Squawk could not parse this file, so it checked nothing else in it; fix the SQL (or split out what Squawk cannot parse)"

_LOCKING_CHOICES = ("error", "warning")


@dataclass(frozen=True)
class Finding:
    file: str  # the migration file name, e.g. 0003_drop_email.expand.sql
    line: int  # 1-based
    column: int | None  # 1-based, in characters; None when not known
    rule: str  # a Squawk rule name, or bluegreen-* for our supplement
    message: str
    hint: str
    severity: str  # "error" | "warning" | "info"
    phase: str  # "expand" | "contract"


@dataclass(frozen=True)
class LintReport:
    findings: tuple[Finding, ...]
    errors: int
    warnings: int

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": self.errors,
            "warnings": self.warnings,
            "findings": [asdict(f) for f in self.findings],
        }


def classify(rule: str) -> str:
    """The category of a rule: breaking, breaking+lock, locking, syntax or other."""
    category = RULE_CATEGORIES.get(rule)
    if category is not None:
        return category
    if rule.startswith(("ban-drop-", "renaming-")):
        return BREAKING
    if rule.startswith("require-concurrent-") or (rule.startswith("require-") and rule.endswith("-timeout")):
        return LOCKING
    return OTHER


def _severity(category: str, phase: Phase, locking: str) -> str:
    if category == BREAKING:
        return "error" if phase is Phase.EXPAND else "info"
    if category == BREAKING_LOCK:
        return "error" if phase is Phase.EXPAND else locking
    if category == LOCKING:
        return locking
    if category == SYNTAX:
        return "error" if phase is Phase.EXPAND else "warning"
    return "warning"


def find_squawk() -> str:
    """The path of the ``squawk`` binary: on PATH, else next to the running Python (a virtualenv's
    bin/ that is not on PATH). MigrationError when neither has it."""
    found = shutil.which("squawk")
    if found:
        return found
    bindir = Path(sys.executable).parent
    for name in ("squawk", "squawk.exe"):
        candidate = bindir / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise MigrationError(
        "the squawk linter was not found (on PATH or next to the Python interpreter); "
        "install the 'squawk-cli' package (pip install 'squawk-cli>=2')"
    )


def lint(
    migration_set: MigrationSet | str | Path,
    *,
    locking: str = "warning",
    pg_version: str = DEFAULT_PG_VERSION,
    assume_in_transaction: bool | None = None,
    runner_sets_timeouts: bool = False,
) -> LintReport:
    """Lint every file of ``migration_set`` (a loaded set, or a directory to load: a malformed
    directory raises MigrationError). ``locking`` is the severity of locking hazards, "warning"
    or "error". Squawk missing or failing raises MigrationError.

    ``assume_in_transaction`` tells Squawk whether the runner wraps a file in a transaction (it
    then drops "missing transaction" advice, and flags BEGIN/COMMIT and CREATE INDEX CONCURRENTLY
    in the file). ``None`` (default) decides per file the way ``apply_phase`` runs it: in a
    transaction unless the file mentions CONCURRENTLY or VACUUM outside comments and strings.
    ``runner_sets_timeouts=True`` drops require-lock-timeout / require-statement-timeout, for
    when the runner itself sets both before every file."""
    if locking not in _LOCKING_CHOICES:
        raise ValidationError(f"locking must be one of {', '.join(_LOCKING_CHOICES)}, not {locking!r}")
    if not re.fullmatch(r"[0-9]+(\.[0-9]+){0,2}", pg_version):
        raise ValidationError(f"pg_version must look like 15 or 15.4, not {pg_version!r}")
    mset = migration_set if isinstance(migration_set, MigrationSet) else load_migration_set(migration_set)
    squawk = find_squawk() if any(f.sql.strip() for f in mset.files) else ""
    findings: list[Finding] = []
    for f in mset.files:
        in_tx = _runs_in_transaction(f.sql) if assume_in_transaction is None else assume_in_transaction
        findings.extend(_lint_file(f, squawk, locking, pg_version, in_tx, runner_sets_timeouts))
    errors = sum(1 for x in findings if x.severity == "error")
    warnings = sum(1 for x in findings if x.severity == "warning")
    return LintReport(tuple(findings), errors, warnings)


def lint_exit_code(report: LintReport) -> int:
    """0 when the report has no errors, 1 otherwise (a malformed set is MigrationError: exit 2)."""
    return 0 if report.ok else 1


def format_text(report: LintReport) -> str:
    """One finding per line: ``FILE:LINE: SEVERITY [RULE] MESSAGE hint: HINT``."""
    return "\n".join(
        f"{f.file}:{f.line}: {f.severity} [{f.rule}] {f.message}" + (f" hint: {f.hint}" if f.hint else "")
        for f in report.findings
    )


# --- one file ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Raw:
    rule: str
    offset: int  # character offset in the file
    message: str
    help: str | None


_AUTOCOMMIT_WORDS = re.compile(r"\b(?:CONCURRENTLY|VACUUM)\b", re.IGNORECASE)


def _runs_in_transaction(sql: str) -> bool:
    """Whether apply_phase runs this file in one transaction (it runs files that need it, those
    with CONCURRENTLY or VACUUM, statement by statement in autocommit mode instead)."""
    return _AUTOCOMMIT_WORDS.search(_mask(sql)[0]) is None


def _lint_file(
    f: MigrationFile, squawk: str, locking: str, pg_version: str, in_tx: bool, no_timeouts: bool
) -> list[Finding]:
    lines = _LineIndex(f.sql)
    raw = _run_squawk(f, squawk, lines, pg_version, in_tx, no_timeouts) if f.sql.strip() else []
    raw.extend(_supplement(f.sql, raw))
    raw.sort(key=lambda r: (r.offset, r.rule))
    out = []
    for r in raw:
        category = classify(r.rule)
        line, col = lines.line_col(r.offset)
        out.append(
            Finding(
                file=f.name,
                line=line,
                column=col,
                rule=r.rule,
                message=r.message,
                hint=_hint(r.rule, category, f.phase, r.help),
                severity=_severity(category, f.phase, locking),
                phase=f.phase.value,
            )
        )
    return out


def _hint(rule: str, category: str, phase: Phase, squawk_help: str | None) -> str:
    if category == BREAKING and phase is Phase.CONTRACT:
        return _CONTRACT_HINT
    if category in (BREAKING, BREAKING_LOCK) and phase is Phase.EXPAND:
        return _HINTS.get(rule) or squawk_help or _GENERIC_BREAKING_HINT
    if category == BREAKING_LOCK:  # in a contract file only the lock matters
        return _CONTRACT_LOCK_HINTS.get(rule) or squawk_help or f"see https://squawkhq.com/docs/{rule}"
    if category == SYNTAX:
        return _SYNTAX_HINT
    return squawk_help or _HINTS.get(rule) or f"see https://squawkhq.com/docs/{rule}"


def _run_squawk(
    f: MigrationFile, squawk: str, lines: _LineIndex, pg_version: str, in_tx: bool, no_timeouts: bool
) -> list[_Raw]:
    # The SQL goes in on stdin, so Squawk checks exactly the text that was loaded (and checksummed)
    # and no path is ever taken for a glob pattern. An empty config file stops Squawk from picking
    # up a .squawk.toml from the working directory or its parents.
    cmd = [
        squawk,
        "--reporter",
        "json",
        "--config",
        os.devnull,
        "--pg-version",
        pg_version,
        "--stdin-filepath",
        f.name,
    ]
    if in_tx:
        cmd.append("--assume-in-transaction")
    if no_timeouts:
        cmd.append("--exclude=require-lock-timeout,require-statement-timeout")
    try:
        proc = subprocess.run(
            cmd,
            input=f.sql.encode("utf-8"),
            capture_output=True,
            timeout=SQUAWK_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise MigrationError(f"{f.path}: squawk did not finish within {SQUAWK_TIMEOUT_S:.0f}s") from None
    except OSError as exc:
        raise MigrationError(f"could not run squawk ({squawk}): {exc}; is the 'squawk-cli' package installed?") from exc
    stdout = proc.stdout.decode("utf-8", "replace").strip()
    stderr = proc.stderr.decode("utf-8", "replace").strip()
    # Squawk exits 0 when clean and 1 when it found something, and also 1 (or 2) on a usage or
    # configuration error, with nothing on stdout: so trust the JSON, not the exit code.
    try:
        items = json.loads(stdout) if stdout else None
    except json.JSONDecodeError:
        items = None
    if proc.returncode not in (0, 1) or not isinstance(items, list):
        detail = stderr or stdout or f"exit status {proc.returncode}"
        raise MigrationError(f"{f.path}: squawk failed: {detail[:500]}")
    raw = []
    for item in items:
        if not isinstance(item, dict) or "rule_name" not in item:
            raise MigrationError(f"{f.path}: unexpected squawk output: {json.dumps(item)[:200]}")
        # Squawk's JSON has 0-based lines and 0-based columns counted in UTF-8 bytes.
        offset = lines.offset_from_squawk(int(item.get("line") or 0), int(item.get("column") or 0))
        help_text = item.get("help")
        raw.append(
            _Raw(
                rule=str(item["rule_name"]),
                offset=offset,
                message=str(item.get("message") or item["rule_name"]),
                help=str(help_text) if help_text else None,
            )
        )
    return raw


class _LineIndex:
    def __init__(self, text: str) -> None:
        self.text = text
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def line_col(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset."""
        lo, hi = 0, len(self.starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.starts[mid] <= offset:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1, offset - self.starts[lo] + 1

    def offset_from_squawk(self, line0: int, byte_col: int) -> int:
        line0 = max(0, min(line0, len(self.starts) - 1))
        start = self.starts[line0]
        end = self.starts[line0 + 1] if line0 + 1 < len(self.starts) else len(self.text)
        prefix = self.text[start:end].encode("utf-8")[:byte_col].decode("utf-8", "ignore")
        return start + len(prefix)


# --- the supplement ---------------------------------------------------------------------------

_IDENT = r'(?:"[^"]*"|[^\W\d][\w$]*)'
_QNAME = rf"{_IDENT}(?:\s*\.\s*{_IDENT}){{0,2}}"
_FLAGS = re.IGNORECASE | re.DOTALL
# the optional COLUMN keyword: when present it is the keyword, never the column name
_COLUMN_KW = r"(?:COLUMN\s+|(?!COLUMN\s))"

_ALTER_TABLE = re.compile(
    rf"\bALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?(?P<table>{_QNAME})\s*\*?\s*(?=\S)", _FLAGS
)
_DROP_TABLE = re.compile(rf"\bDROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?P<table>{_QNAME})", _FLAGS)
_A_DROP_COLUMN = re.compile(rf"DROP\s+{_COLUMN_KW}(?:IF\s+EXISTS\s+)?(?P<col>{_IDENT})", _FLAGS)
_A_RENAME_COLUMN = re.compile(rf"RENAME\s+{_COLUMN_KW}(?P<col>{_IDENT})\s+TO\s+(?P<new>{_IDENT})", _FLAGS)
_A_RENAME_TABLE = re.compile(rf"RENAME\s+TO\s+(?P<new>{_QNAME})", _FLAGS)
_A_TYPE = re.compile(rf"ALTER\s+{_COLUMN_KW}(?P<col>{_IDENT})\s+(?:SET\s+DATA\s+)?TYPE\b", _FLAGS)
_A_SET_NOT_NULL = re.compile(rf"ALTER\s+{_COLUMN_KW}(?P<col>{_IDENT})\s+SET\s+NOT\s+NULL\b", _FLAGS)
_A_ADD_COLUMN = re.compile(
    rf"ADD\s+{_COLUMN_KW}(?:IF\s+NOT\s+EXISTS\s+)?(?P<col>{_IDENT})\s+(?P<rest>.*)", _FLAGS
)
_A_NOT_NULL_CHECK = re.compile(
    rf"ADD\s+(?:CONSTRAINT\s+{_IDENT}\s+)?CHECK\s*\(\s*\(?\s*(?P<col>{_IDENT})\s+IS\s+NOT\s+NULL\s*\)?\s*\)", _FLAGS
)
_NOT_COLUMN_NAMES = {"constraint", "primary", "unique", "check", "foreign", "exclude", "column"}
_SERIAL = re.compile(r"^\s*(?:small|big)?serial[248]?\b", re.IGNORECASE)


def _supplement(sql: str, squawk_raw: list[_Raw]) -> list[_Raw]:
    masked, ignores = _mask(sql)
    lines = _LineIndex(sql)
    found: list[tuple[str, int, int, int, str]] = []  # rule, offset, span start, span end, message
    start = 0
    for part in masked.split(";"):
        end = start + len(part)
        _scan_statement(sql, masked, start, end, found)
        start = end + 1
    out = []
    for rule, offset, span_start, span_end, message in found:
        theirs = _SUPPLEMENT_EQUIVALENT[rule]
        if any(r.rule == theirs and span_start <= r.offset <= span_end for r in squawk_raw):
            continue  # Squawk already reported it
        line0 = lines.line_col(offset)[0] - 1
        stmt_line0 = lines.line_col(span_start)[0] - 1
        if ignores.covers({rule, theirs}, (line0, line0 - 1, stmt_line0, stmt_line0 - 1)):
            continue
        out.append(_Raw(rule, offset, message, None))
    return out


def _scan_statement(sql: str, masked: str, start: int, end: int, found: list[tuple[str, int, int, int, str]]) -> None:
    for m in _DROP_TABLE.finditer(masked, start, end):
        found.append(("bluegreen-drop-table", m.start(), m.start(), end, f"Dropping table {sql[m.start('table'):m.end('table')]} breaks the previous version, which still uses it."))
    for m in _ALTER_TABLE.finditer(masked, start, end):
        table = sql[m.start("table") : m.end("table")]
        for a_start, a_end in _split_actions(masked, m.end(), end):
            _scan_action(sql, masked, table, a_start, a_end, found)


def _split_actions(masked: str, start: int, end: int) -> Iterable[tuple[int, int]]:
    """Split ALTER TABLE actions on top-level commas; yield (start, end) of each, trimmed."""
    depth = 0
    piece = start
    for i in range(start, end + 1):
        ch = masked[i] if i < end else ","
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif ch == "," and (depth == 0 or i == end):
            s = piece
            while s < i and masked[s].isspace():
                s += 1
            if s < i:
                yield s, i
            piece = i + 1


def _scan_action(sql: str, masked: str, table: str, start: int, end: int, found: list[tuple[str, int, int, int, str]]) -> None:
    def name(m: re.Match[str], group: str = "col") -> str:
        return sql[m.start(group) : m.end(group)]

    def add(rule: str, message: str) -> None:
        found.append((rule, start, start, end, message))

    m = _A_DROP_COLUMN.match(masked, start, end)
    if m and m["col"].lower() != "constraint":
        add("bluegreen-drop-column", f"Dropping column {table}.{name(m)} breaks the previous version, which still reads or writes it.")
        return
    m = _A_RENAME_TABLE.match(masked, start, end)
    if m:
        add("bluegreen-rename-table", f"Renaming table {table} to {name(m, 'new')} breaks the previous version, which uses the old name.")
        return
    m = _A_RENAME_COLUMN.match(masked, start, end)
    if m and m["col"].lower() not in ("constraint", "to"):
        add("bluegreen-rename-column", f"Renaming column {table}.{name(m)} breaks the previous version, which uses the old name.")
        return
    m = _A_TYPE.match(masked, start, end)
    if m:
        add("bluegreen-change-column-type", f"Changing the type of column {table}.{name(m)} breaks the previous version, which uses the old type.")
        return
    m = _A_SET_NOT_NULL.match(masked, start, end)
    if m:
        add("bluegreen-set-not-null", f"Making column {table}.{name(m)} NOT NULL breaks the previous version's inserts that do not set it.")
        return
    m = _A_NOT_NULL_CHECK.match(masked, start, end)
    if m:
        add("bluegreen-not-null-check", f"A CHECK ({name(m)} IS NOT NULL) constraint refuses the previous version's inserts that do not set {table}.{name(m)}, even when NOT VALID.")
        return
    m = _A_ADD_COLUMN.match(masked, start, end)
    if m and m["col"].lower() not in _NOT_COLUMN_NAMES and _is_required(masked[m.start("rest") : end]):
        add("bluegreen-add-required-column", f"Adding column {table}.{name(m)} as NOT NULL without a default breaks the previous version's inserts, which do not set it.")


def _is_required(definition: str) -> bool:
    """Whether a column definition is NOT NULL (or PRIMARY KEY) with no usable default."""
    if _SERIAL.match(definition):
        return False
    flat = _drop_parens(definition)
    required = re.search(r"\bNOT\s+NULL\b|\bPRIMARY\s+KEY\b", flat, re.IGNORECASE) is not None
    if not required:
        return False
    if re.search(r"\bGENERATED\b", flat, re.IGNORECASE):
        return False
    default = re.search(r"\bDEFAULT\b(?P<expr>\s*\S*)", flat, re.IGNORECASE)
    if default is None:
        return True
    return re.fullmatch(r"\s*NULL", default["expr"], re.IGNORECASE) is not None


def _drop_parens(text: str) -> str:
    out = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
            out.append(" (" if depth == 1 else "")
        elif ch == ")":
            depth = max(0, depth - 1)
            out.append(") " if depth == 0 else "")
        elif depth == 0:
            out.append(ch)
    return "".join(out)


class _Ignores:
    """The ``squawk-ignore`` / ``squawk-ignore-file`` comments of a file."""

    def __init__(self) -> None:
        self.file_all = False
        self.file_rules: set[str] = set()
        self.line_rules: dict[int, set[str]] = {}

    def add(self, comment: str, line0: int) -> None:
        body = comment.strip()
        kind_file = body.startswith("squawk-ignore-file")
        if not kind_file and not body.startswith("squawk-ignore"):
            return
        rest = body[len("squawk-ignore-file" if kind_file else "squawk-ignore") :]
        if rest and not rest[0].isspace():
            return
        rest = rest.split("--", 1)[0]
        names = {n.strip() for n in rest.split(",") if n.strip()}
        if kind_file:
            if names:
                self.file_rules |= names
            else:
                self.file_all = True
        else:
            self.line_rules.setdefault(line0, set()).update(names)

    def covers(self, rules: set[str], lines0: Iterable[int]) -> bool:
        if self.file_all or rules & self.file_rules:
            return True
        return any(rules & self.line_rules.get(line, set()) for line in lines0)


_DOLLAR = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")


def _mask(sql: str) -> tuple[str, _Ignores]:
    """The SQL with comments and string literals blanked (spaces) and quoted identifiers' contents
    replaced by x, keeping every offset and newline. Dollar-quoted bodies stay visible (their
    delimiters are blanked) and are masked the same way on their own, so a DO block's statements
    are checked."""
    out = list(sql)
    ignores = _Ignores()
    newlines = [m.start() for m in re.finditer("\n", sql)]

    def line0(pos: int) -> int:
        lo, hi = 0, len(newlines)
        while lo < hi:
            mid = (lo + hi) // 2
            if newlines[mid] < pos:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def blank(a: int, b: int, fill: str = " ") -> None:
        for k in range(a, b):
            if sql[k] != "\n":
                out[k] = fill

    def scan(i: int, end: int) -> None:
        while i < end:
            ch = sql[i]
            nxt = sql[i + 1] if i + 1 < end else ""
            if ch == "-" and nxt == "-":
                j = sql.find("\n", i, end)
                j = end if j < 0 else j
                ignores.add(sql[i + 2 : j], line0(i))
                blank(i, j)
                i = j
            elif ch == "/" and nxt == "*":
                depth, j = 1, i + 2
                while j < end and depth:
                    if sql.startswith("/*", j):
                        depth, j = depth + 1, j + 2
                    elif sql.startswith("*/", j):
                        depth, j = depth - 1, j + 2
                    else:
                        j += 1
                ignores.add(sql[i + 2 : max(i + 2, j - 2)], line0(i))
                blank(i, j)
                i = j
            elif ch == "'":
                escapes = i > 0 and sql[i - 1] in "eE" and (i < 2 or not (sql[i - 2].isalnum() or sql[i - 2] == "_"))
                j = i + 1
                while j < end:
                    if escapes and sql[j] == "\\":
                        j += 2
                        continue
                    if sql[j] == "'":
                        if j + 1 < end and sql[j + 1] == "'":
                            j += 2
                            continue
                        break
                    j += 1
                j = min(j + 1, end)
                blank(i, j)
                i = j
            elif ch == '"':
                j = i + 1
                while j < end:
                    if sql[j] == '"':
                        if j + 1 < end and sql[j + 1] == '"':
                            j += 2
                            continue
                        break
                    j += 1
                blank(i + 1, min(j, end), "x")
                i = min(j + 1, end)
            elif ch == "$" and not (i > 0 and (sql[i - 1].isalnum() or sql[i - 1] in "_$")):
                m = _DOLLAR.match(sql, i, end)
                if m is None:
                    i += 1
                    continue
                tag = m[0]
                close = sql.find(tag, m.end(), end)
                body_end = end if close < 0 else close
                blank(i, m.end())
                scan(m.end(), body_end)
                if close >= 0:
                    blank(close, close + len(tag))
                    i = close + len(tag)
                else:
                    i = end
            else:
                i += 1

    scan(0, len(sql))
    return "".join(out), ignores
