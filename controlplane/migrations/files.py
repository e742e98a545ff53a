"""Reading a migration set from a directory. Pure apart from reading the files."""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import MigrationError

_NAME = re.compile(r"^(?P<number>[0-9]{4})_(?P<name>[a-z0-9][a-z0-9_]*)\.(?P<phase>expand|contract)\.sql$")


class Phase(str, enum.Enum):
    EXPAND = "expand"
    CONTRACT = "contract"


@dataclass(frozen=True)
class MigrationFile:
    number: int
    name: str  # the file name, e.g. 0003_add_email.expand.sql: the key recorded in the database
    phase: Phase
    path: Path
    sql: str
    checksum: str  # sha256 of the file's bytes


@dataclass(frozen=True)
class MigrationSet:
    directory: Path
    files: tuple[MigrationFile, ...]  # ordered by number

    def phase(self, phase: Phase) -> tuple[MigrationFile, ...]:
        return tuple(f for f in self.files if f.phase is phase)


def load_migration_set(directory: str | Path) -> MigrationSet:
    """Read every file of ``directory``. A file whose name matches neither pattern is an error,
    not silently skipped (hidden files such as .gitkeep are ignored); so are two files with the
    same number, and a directory that does not exist."""
    root = Path(directory)
    if not root.is_dir():
        raise MigrationError(f"migration directory {root} does not exist or is not a directory")
    files: list[MigrationFile] = []
    seen: dict[int, str] = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        match = _NAME.match(path.name)
        if not path.is_file() or match is None:
            raise MigrationError(
                f"{path}: not a migration file; names must look like NNNN_name.expand.sql or "
                "NNNN_name.contract.sql (4 digits, lowercase name)"
            )
        number = int(match["number"])
        if number in seen:
            raise MigrationError(f"{path}: number {match['number']} is also used by {seen[number]}")
        seen[number] = path.name
        raw = path.read_bytes()
        try:
            sql = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MigrationError(f"{path}: not UTF-8 text: {exc}") from None
        files.append(MigrationFile(number, path.name, Phase(match["phase"]), path, sql, hashlib.sha256(raw).hexdigest()))
    files.sort(key=lambda f: f.number)
    return MigrationSet(root, tuple(files))
