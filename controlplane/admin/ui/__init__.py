"""The web dashboard: its static files (``static/``, shipped in the package) and the two API
endpoints it needs besides the JSON API: ``GET /v1/whoami`` and the live feed ``GET /v1/events``.

The page and its files carry no data, so they are open routes; everything shown comes from the
API with the user's token. The live feed is a ``text/event-stream`` that the page reads with
``fetch()`` (browsers' EventSource cannot send an Authorization header, and a token in a query
string ends up in logs). It carries no state either, only "something changed": the page then
re-reads what it shows. One :class:`EventHub` per admin app follows the store's watch and the
convergence tracker's notifications, and coalesces bursts (a cutover is many ACKs) into at most
one event per :data:`DEBOUNCE_SECONDS` for all subscribers: the number of reads the page makes
follows the number of changes, never a polling period.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from ..auth import PRINCIPAL

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
DEBOUNCE_SECONDS = 0.2
KEEPALIVE_SECONDS = 15.0
SUBSCRIBER_QUEUE = 8  # a subscriber this far behind gets only the newest event (they carry no state)

_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".svg": "image/svg+xml"}
# The page loads only its own files and talks only to this server; no inline script or style.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"}


class EventHub:
    """Fans "the state changed" out to the live-feed subscribers, debounced.

    :meth:`start` follows ``watch()`` (the store's revisions) in a task; :meth:`proxies_changed`
    is registered as a convergence listener (called on the loop, must be cheap: it only sets a
    flag and arms one timer). :meth:`close` ends every subscription (at shutdown)."""

    def __init__(self, watch: Callable[[], AsyncIterator[int]], *, debounce: float = DEBOUNCE_SECONDS) -> None:
        self._watch = watch
        self._debounce = debounce
        self._subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._revision = 0
        self._store_changed = False
        self._proxies_changed = False
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def revision(self) -> int:
        return self._revision

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow_store(), name="ui-event-hub")

    async def _follow_store(self) -> None:
        first = True
        async for revision in self._watch():
            if first:  # the revision at start is the baseline, not a change
                self._revision, first = revision, False
            elif revision != self._revision:
                self._revision = revision
                self._store_changed = True
                self._arm()

    def proxies_changed(self) -> None:
        self._proxies_changed = True
        self._arm()

    def _arm(self) -> None:
        if self._timer is None and self._subscribers and not self._closed:
            self._timer = asyncio.get_running_loop().call_later(self._debounce, self._flush)
        elif not self._subscribers:
            self._store_changed = self._proxies_changed = False  # nobody listens: nothing to tell later

    def _flush(self) -> None:
        self._timer = None
        event = {"store_revision": self._revision, "store": self._store_changed, "proxies": self._proxies_changed}
        self._store_changed = self._proxies_changed = False
        for queue in self._subscribers:
            _offer(queue, event)

    @contextlib.contextmanager
    def subscribe(self) -> Any:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(SUBSCRIBER_QUEUE)
        if self._closed:
            queue.put_nowait(None)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for queue in self._subscribers:
            _offer(queue, None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


def _offer(queue: asyncio.Queue[dict[str, Any] | None], item: dict[str, Any] | None) -> None:
    """Put without blocking: a slow reader loses older events (each one only says "re-read")."""
    while True:
        try:
            queue.put_nowait(item)
            return
        except asyncio.QueueFull:
            queue.get_nowait()


EVENT_HUB = web.AppKey("event_hub", EventHub)


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def events(request: web.Request) -> web.StreamResponse:
    """``GET /v1/events``: see the module docstring and the OpenAPI document."""
    hub = request.app[EVENT_HUB]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    with hub.subscribe() as queue:
        try:
            await response.write(sse("hello", {"store_revision": hub.revision}))
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
                except asyncio.TimeoutError:
                    await response.write(b": keepalive\n\n")  # keeps proxies and the browser from timing out
                    continue
                if event is None:
                    break
                await response.write(sse("change", event))
        except ConnectionError:  # aiohttp's ClientConnectionResetError included
            pass  # the page went away: nothing to answer
    return response


async def whoami(request: web.Request) -> web.Response:
    principal = request.get(PRINCIPAL)
    if principal is None:  # build_admin_app(cp, None): in-process tests, everything allowed
        return web.json_response({"name": "api", "role": "admin"})
    return web.json_response({"name": principal.name, "role": principal.role.label})


def _static_file(name: str) -> Path | None:
    """The shipped file called ``name``; None for anything else (no paths, no dot files)."""
    if "/" in name or "\\" in name or name.startswith("."):
        return None
    path = STATIC / name
    return path if path.suffix in _TYPES and path.is_file() else None


def _file_response(path: Path) -> web.Response:
    return web.Response(body=path.read_bytes(), content_type=_TYPES[path.suffix], headers=_HEADERS)


async def page(request: web.Request) -> web.Response:
    path = _static_file("index.html")
    assert path is not None, "the package ships controlplane/admin/ui/static/index.html"
    return _file_response(path)


async def asset(request: web.Request) -> web.Response:
    path = _static_file(request.match_info["file"])
    if path is None:
        raise web.HTTPNotFound(text=json.dumps({"error": f"no dashboard file {request.match_info['file']!r}"}),
                               content_type="application/json")
    return _file_response(path)


def install(app: web.Application, watch: Callable[[], AsyncIterator[int]], listeners: list[Callable[[], None]]) -> None:
    """Give ``app`` an EventHub that starts and stops with it and hears ``listeners``' changes."""
    hub = EventHub(watch)
    app[EVENT_HUB] = hub

    async def on_startup(_: web.Application) -> None:
        hub.start()
        listeners.append(hub.proxies_changed)

    async def on_shutdown(_: web.Application) -> None:
        # Before the runner waits for handlers: open feeds end here instead of holding shutdown.
        if hub.proxies_changed in listeners:
            listeners.remove(hub.proxies_changed)
        await hub.close()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)


ROUTES = [
    ("GET", "/ui", page),
    ("GET", "/ui/{file}", asset),
    ("GET", "/v1/whoami", whoami),
    ("GET", "/v1/events", events),
]
