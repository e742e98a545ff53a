"""The control plane never follows a redirect out of what the operator allowed: a webhook URL
passed the allowlist, not wherever it redirects to; a smoke check judges the preview entry's own
answer. Real HTTP servers on loopback; the redirect target records whether it was reached."""

from __future__ import annotations

from typing import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from controlplane.deploy.smoke import PreviewTarget, _check, call_webhook
from controlplane.deploy.spec import HttpCheck, Webhook


@pytest.fixture
async def servers() -> AsyncIterator[tuple[str, list[str]]]:
    """A server that redirects everything (307 and 302) to a second one, which records hits."""
    reached: list[str] = []

    async def target(request: web.Request) -> web.Response:
        reached.append(request.path)
        return web.Response(text="reached")

    inner = web.Application()
    inner.router.add_route("*", "/{tail:.*}", target)
    inner_runner = web.AppRunner(inner)
    await inner_runner.setup()
    inner_site = web.TCPSite(inner_runner, "127.0.0.1", 0)
    await inner_site.start()
    inner_url = f"http://127.0.0.1:{inner_runner.addresses[0][1]}"

    async def redirect(request: web.Request) -> web.Response:
        status = 307 if request.method == "POST" else 302
        raise web.HTTPTemporaryRedirect(inner_url + "/elsewhere") if status == 307 else web.HTTPFound(inner_url + "/elsewhere")

    outer = web.Application()
    outer.router.add_route("*", "/{tail:.*}", redirect)
    outer_runner = web.AppRunner(outer)
    await outer_runner.setup()
    outer_site = web.TCPSite(outer_runner, "127.0.0.1", 0)
    await outer_site.start()
    try:
        yield f"http://127.0.0.1:{outer_runner.addresses[0][1]}", reached
    finally:
        await outer_runner.cleanup()
        await inner_runner.cleanup()


async def test_a_webhook_redirect_is_not_followed(servers: tuple[str, list[str]]) -> None:
    url, reached = servers
    async with aiohttp.ClientSession() as session:
        problem = await call_webhook(session, Webhook(url + "/hook"), {"event": "test"})
    assert problem is not None and "status 307" in problem
    assert reached == []


async def test_a_smoke_check_judges_the_redirect_itself(servers: tuple[str, list[str]]) -> None:
    url, reached = servers
    target = PreviewTarget(url, ())
    async with aiohttp.ClientSession() as session:
        assert "status 302, expected 200" in (await _check(session, target, HttpCheck(path="/health", retries=0)) or "")
        assert await _check(session, target, HttpCheck(path="/login", expect_status=302, retries=0)) is None
    assert reached == []
