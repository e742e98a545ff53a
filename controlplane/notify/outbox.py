"""Deployment event notifications: a transactional outbox in the store and a sender.

    store (deployment history) ──collect──► notifications/outbox/… + notifications/cursor/<id>
                                                     │ (one transaction: entries and cursor)
                                                     ▼
                                            deliver ──POST──► webhooks (retries, backoff)

*Collect* follows the store's watch; for each workflow deployment whose history grew past its
cursor it writes the new events' outbox entries and the advanced cursor in one compare-and-set
transaction, so every history event becomes its notifications exactly once, across restarts
and concurrent collectors. *Deliver* sends the entries oldest first, one lane per (deployment,
receiver) so a receiver sees one deployment's events in order; a 2xx deletes the entry, any
other outcome keeps it with capped exponential backoff. A failure is counted and noted once per
entry in the deployment's history; it never blocks a deployment (the driver does not wait).

Delivery is at least once: a crash between a receiver's 2xx and the deletion sends that entry
again after the restart, with the same ``X-Bluegreen-Delivery`` id for the receiver to drop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from dataclasses import replace
from typing import Any, Callable

import aiohttp

from ..errors import NotFoundError, RevisionConflict, StoreError
from ..metrics import Metrics
from ..model import Deployment, Event, deployment_from_dict
from ..store.base import KVStore, Txn
from ..store.repository import DEPLOYMENTS, Repository
from .events import WebhookTarget, body, message, new_events, read_secret, targets_for

log = logging.getLogger(__name__)

OUTBOX = "notifications/outbox/"
CURSORS = "notifications/cursor/"
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 300.0


def backoff(attempts: int, base: float = BACKOFF_BASE_SECONDS, cap: float = BACKOFF_MAX_SECONDS) -> float:
    """Seconds before attempt ``attempts + 1``: 1, 2, 4, ... capped."""
    return min(cap, base * 2 ** max(0, attempts - 1))


def signature(secret: bytes, payload: bytes) -> str:
    """``X-Bluegreen-Signature``: HMAC-SHA256 of the exact body, hex."""
    return "sha256=" + hmac.new(secret, payload, hashlib.sha256).hexdigest()


class Notifier:
    """Collects and delivers notifications until cancelled (:meth:`run`). Only one process of
    a set of replicas should run it (the leader); collecting is safe to repeat anywhere."""

    def __init__(self, kv: KVStore, repo: Repository, targets: tuple[WebhookTarget, ...], metrics: Metrics, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.kv = kv
        self.repo = repo
        self.targets = targets
        self.metrics = metrics
        self.clock = clock
        self.started_at = clock()
        self._wake = asyncio.Event()
        self._mod_seen: dict[str, int] = {}  # deployment key -> mod_revision already collected
        self._session: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        self._session = aiohttp.ClientSession()
        collector = asyncio.create_task(self._collect_loop(), name="notifications-collect")
        try:
            await self._deliver_loop()
        finally:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)
            await self._session.close()

    # -- collect -------------------------------------------------------------------------------

    async def _collect_loop(self) -> None:
        async for _ in self.kv.watch():
            try:
                if await self.collect():
                    self._wake.set()
            except (StoreError, OSError) as exc:
                log.warning("collecting notifications failed (retried at the next change): %s", exc)

    async def collect(self) -> int:
        """Write the outbox entries of history events not collected yet. Returns how many."""
        # Records unchanged since the last pass are only named (not read or decoded).
        listing = await self.kv.list(DEPLOYMENTS, unchanged=self._mod_seen)
        written = 0
        cursors: dict[str, tuple[int, int]] | None = None
        service_targets: dict[str, tuple[WebhookTarget, ...]] = {}
        for entry in listing.entries:
            if self._mod_seen.get(entry.key) == entry.mod_revision:
                continue
            record = deployment_from_dict(entry.value)
            if record.service not in service_targets:
                service_targets[record.service] = await self._targets(record.service)
            if record.spec is None or not service_targets[record.service]:
                # Registered by hand (not a workflow deployment), or nobody to tell: no write at all.
                self._mod_seen[entry.key] = entry.mod_revision
                continue
            if cursors is None:
                cursors = {e.key[len(CURSORS):]: (int(e.value["seen"]), e.mod_revision) for e in (await self.kv.list(CURSORS)).entries}
            seen, revision = cursors.get(record.id, (self._first_seen(record), 0))
            if seen < len(record.history):
                try:
                    written += await self._enqueue(record, seen, revision, service_targets[record.service])
                except RevisionConflict:
                    continue  # another collector got there first: look again at the next change
            self._mod_seen[entry.key] = entry.mod_revision
        return written

    def _first_seen(self, record: Deployment) -> int:
        """Where a record without a cursor starts: its whole history, unless it settled before
        this process started (notifications just configured: old news is not sent)."""
        if not record.in_progress and record.history and record.history[-1].at < self.started_at:
            return len(record.history)
        return 0

    async def _targets(self, service: str) -> tuple[WebhookTarget, ...]:
        """The config file's webhooks, then the service's own (its settings' notifications)."""
        try:
            own = (await self.repo.service(service)).notifications
        except NotFoundError:
            own = ()
        return self.targets + tuple(own)

    async def _enqueue(self, record: Deployment, seen: int, cursor_revision: int, targets: tuple[WebhookTarget, ...]) -> int:
        cursor = f"{CURSORS}{record.id}"
        txn = Txn().expect(cursor, cursor_revision).put(cursor, {"seen": len(record.history)})
        count = 0
        for index, name, event in new_events(record, seen):
            payload = message(record, name, event.at, event.reason or None)
            for n, target in enumerate(targets_for(name, targets)):
                key = f"{OUTBOX}{time.time_ns():020d}-{record.id}-{index:06d}-{name}-{n}"
                txn.put(key, {"id": uuid.uuid4().hex, "service": record.service, "deployment": record.id, "event": name,
                              "target": target.to_dict(), "payload": payload, "attempts": 0, "next_at": 0.0, "noted": False})
                count += 1
        await self.kv.commit(txn)
        return count

    # -- deliver -------------------------------------------------------------------------------

    async def _deliver_loop(self) -> None:
        while True:
            try:
                wake_at = await self.deliver_due()
            except (StoreError, OSError) as exc:
                log.warning("delivering notifications failed (retrying): %s", exc)
                wake_at = self.clock() + BACKOFF_BASE_SECONDS
            timeout = None if wake_at is None else max(0.0, wake_at - self.clock())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def deliver_due(self) -> float | None:
        """Send every entry that is due, in order per lane. Returns when the next one is due."""
        listing = await self.kv.list(OUTBOX)
        self.metrics.notifications_pending.set(len(listing.entries))
        blocked: set[tuple[str, str]] = set()
        wake_at: float | None = None
        delivered = 0
        for entry in listing.entries:  # keys sort by creation time
            item = entry.value
            lane = (item["deployment"], item["target"]["url"])
            if lane in blocked:
                continue
            if item["next_at"] > self.clock():
                blocked.add(lane)
                wake_at = min(wake_at or item["next_at"], item["next_at"])
                continue
            problem = await self._send(item)
            if problem is None:
                self.metrics.notifications.labels("delivered").inc()
                delivered += 1
                await self.kv.commit(Txn().expect(entry.key, entry.mod_revision).delete(entry.key))
                continue
            blocked.add(lane)
            self.metrics.notifications.labels("failed").inc()
            attempts = item["attempts"] + 1
            next_at = self.clock() + backoff(attempts)
            wake_at = min(wake_at or next_at, next_at)
            log.warning("notification %s of %s to %s failed (attempt %d, next in %.0fs): %s", item["event"], item["deployment"],
                        item["target"]["url"], attempts, next_at - self.clock(), problem)
            if not item["noted"]:
                await self._note(item, problem)
            updated = {**item, "attempts": attempts, "next_at": next_at, "noted": True, "last_error": problem}
            await self.kv.commit(Txn().expect(entry.key, entry.mod_revision).put(entry.key, updated))
        self.metrics.notifications_pending.set(len(listing.entries) - delivered)
        return wake_at

    async def _send(self, item: dict[str, Any]) -> str | None:
        """None on a 2xx, else what went wrong."""
        target = WebhookTarget.from_dict(item["target"])
        payload = body(target.format, item["payload"])
        headers = {"Content-Type": "application/json", "X-Bluegreen-Event": item["event"], "X-Bluegreen-Delivery": item["id"],
                   "User-Agent": "bluegreen-controlplane"}
        if target.secret_file:
            try:
                secret = read_secret(target.secret_file)
            except (OSError, ValueError) as exc:
                return f"secret_file: {exc}"
            headers["X-Bluegreen-Signature"] = signature(secret, payload)
        assert self._session is not None
        try:
            async with self._session.post(target.url, data=payload, headers=headers, allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=target.timeout_seconds)) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    async def _note(self, item: dict[str, Any], problem: str) -> None:
        """Once per entry: the deployment's history says a receiver did not get an event."""
        text = f"notification {item['event']} to {item['target']['url']} failed: {problem}; retrying with backoff"

        def noted(record: Deployment, now: float) -> Deployment:
            return replace(record, history=record.history + (Event(now, record.status.value, "automatic", text),))

        try:
            await self.repo.update_record(item["service"], item["deployment"], noted)
        except (NotFoundError, RevisionConflict) as exc:
            log.warning("could not note the failed notification in %s: %s", item["deployment"], exc)
