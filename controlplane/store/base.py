"""The store interface: a revisioned key/value space with transactions and watches.

It is shaped like etcd's API on purpose, so that the etcd backend (several control-plane
replicas) is a thin adapter and the SQLite backend (one process, the default) behaves the same:

* Every successful write transaction increments one global ``revision``.
* Each key remembers the revision that last wrote it (``mod_revision``).
* :meth:`KVStore.commit` applies puts and deletes atomically *only if* every compared key still
  has the expected ``mod_revision`` (0 means "must not exist"); otherwise it raises
  :class:`~controlplane.errors.RevisionConflict` and writes nothing.
* :meth:`KVStore.watch` yields the global revision after each committed write, so a
  subscriber can re-read. Notifications may be coalesced: a subscriber that falls behind sees
  only the latest revision, never a stale one.

Values are JSON-compatible dicts. Backends must store them so that reading gives back an equal
dict; the typed layer (:mod:`controlplane.store.repository`) owns their meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, Protocol


@dataclass(frozen=True)
class Entry:
    key: str
    value: dict[str, Any]
    mod_revision: int


@dataclass(frozen=True)
class Listing:
    """All entries under a prefix, read at one consistent ``revision``.

    ``kept`` names the keys that a ``list(prefix, unchanged=...)`` found still at the given
    mod_revision: they are not in ``entries`` (and not decoded), the caller already has them."""

    revision: int
    entries: tuple[Entry, ...]
    kept: tuple[str, ...] = ()


@dataclass
class Txn:
    """A write transaction: compares, then puts and deletes. Build it, then pass it to commit."""

    compares: dict[str, int] = field(default_factory=dict)
    puts: dict[str, dict[str, Any]] = field(default_factory=dict)
    deletes: set[str] = field(default_factory=set)
    # key -> lease id for puts attached to a lease (etcd: the key vanishes with the lease).
    # Backends without leases (SQLite: one process, no replicas to outlive) ignore them.
    leases: dict[str, int] = field(default_factory=dict)

    def expect(self, key: str, mod_revision: int) -> Txn:
        """Require ``key`` to have ``mod_revision`` at commit time (0: the key must not exist)."""
        self.compares[key] = mod_revision
        return self

    def put(self, key: str, value: dict[str, Any], *, lease: int = 0) -> Txn:
        self.puts[key] = value
        self.deletes.discard(key)
        if lease:
            self.leases[key] = lease
        return self

    def delete(self, key: str) -> Txn:
        self.deletes.add(key)
        self.puts.pop(key, None)
        self.leases.pop(key, None)
        return self


class KVStore(Protocol):
    """Contract for state backends. All methods are safe to call concurrently from one event loop."""

    async def get(self, key: str) -> Entry | None: ...

    async def list(self, prefix: str, *, unchanged: Mapping[str, int] | None = None) -> Listing:
        """Every key under ``prefix``. Keys that ``unchanged`` maps to their current mod_revision
        are only named in ``Listing.kept``: a reader that re-reads a large prefix after every
        change decodes just what changed."""
        ...

    async def commit(self, txn: Txn) -> int:
        """Apply ``txn`` atomically and return the new global revision.

        Raises RevisionConflict (nothing written) if a compare fails, StoreError on backend failure.
        """
        ...

    async def revision(self) -> int: ...

    def watch(self) -> AsyncIterator[int]:
        """Yield the current revision at once, then the revision after every later commit."""
        ...

    async def close(self) -> None: ...
