"""The dashboard's live feed (GET /v1/events) and whoami, in-process: a change of the stored
state or of convergence becomes one debounced event; a burst becomes one event; shutdown ends
the feed; the static files are served with a strict Content-Security-Policy."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from aiohttp import web

from controlplane.admin.ui import EventHub, sse
from test_admin_api import Api, api, setup_state  # noqa: F401  (fixture)


async def next_event(content: Any) -> tuple[str, dict[str, Any]]:
    lines: list[str] = []
    while True:
        line = (await asyncio.wait_for(content.readline(), 10)).decode()
        if line == "\n" and lines:
            break
        if line.startswith(":") or line == "\n":
            continue
        lines.append(line.rstrip("\n"))
    fields = dict(line.split(": ", 1) for line in lines)
    return fields["event"], json.loads(fields["data"])


async def test_a_change_reaches_the_feed_once_per_burst(api: Api) -> None:
    await setup_state(api, "seeded")
    async with api.client.get("/v1/events") as feed:
        assert feed.status == 200 and feed.content_type == "text/event-stream"
        event, data = await next_event(feed.content)
        assert event == "hello"
        for blue in (90, 80, 70):  # a burst well inside the debounce period
            await api.ok("PUT", "/v1/services/shop/traffic", {"weights": {"blue": blue, "green": 100 - blue}})
        event, data = await next_event(feed.content)
        assert event == "change" and data["store"] is True
        assert 0 < data["store_revision"] <= await api.cp.kv.revision()
        # Whatever else arrives, nothing arrives for each of the three writes separately.
        try:
            extra = await asyncio.wait_for(next_event(feed.content), 1.0)
        except asyncio.TimeoutError:
            extra = None
        assert extra is None or extra[1]["store_revision"] == await api.cp.kv.revision()


async def test_convergence_changes_reach_the_feed() -> None:
    async def no_changes() -> AsyncIterator[int]:
        yield 1
        await asyncio.Event().wait()

    hub = EventHub(no_changes, debounce=0.01)
    hub.start()
    with hub.subscribe() as queue:
        hub.proxies_changed()
        hub.proxies_changed()
        event = await asyncio.wait_for(queue.get(), 5)
        assert event == {"store_revision": 1, "store": False, "proxies": True}
        assert queue.empty()
        await hub.close()
        assert await asyncio.wait_for(queue.get(), 1) is None  # the feed ends at shutdown


async def test_whoami_and_static_files(api: Api) -> None:
    assert (await api.ok("GET", "/v1/whoami")) == {"name": "api", "role": "admin"}
    async with api.client.get("/ui") as page:
        assert page.status == 200 and page.content_type == "text/html"
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    async with api.client.get("/ui/app.js") as script:
        assert script.status == 200 and script.content_type == "text/javascript"
    for bad in ("/ui/..%2F__init__.py", "/ui/__init__.py", "/ui/.hidden", "/ui/nothing.js"):
        async with api.client.get(bad) as reply:
            assert reply.status == 404, bad


def test_sse_framing() -> None:
    assert sse("change", {"a": 1}) == b'event: change\ndata: {"a":1}\n\n'
