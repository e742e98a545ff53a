"""Endpoint sources (docs/endpoint-sources.md): a watched file and DNS, with real files, a real
DNS server process (dnslib) and a real control plane process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

import aiohttp
import pytest
import yaml

from controlplane.config import parse_settings
from controlplane.errors import ConfigError
from controlplane.model import Endpoint, Environment
from controlplane.sources.base import Endpoints, Owned
from controlplane.sources.dns import DnsSource
from controlplane.sources.file import FileSource
from controlplane.sources.spec import DnsSourceSpec, FileSourceSpec
from tests.harness import REPO_ROOT, free_port, run_control_plane, wait_for

GREEN = Owned("shop", Environment.GREEN)


class Recorder:
    """A Reporter that keeps what a source reported."""

    def __init__(self) -> None:
        self.latest: dict[Owned, Endpoints] = {}
        self.reports = 0
        self.errors: list[str] = []

    def endpoints(self, found: Mapping[Owned, Endpoints]) -> None:
        self.latest.update(found)
        self.reports += 1

    def error(self, message: str) -> None:
        self.errors.append(message)

    def addresses(self, pair: Owned = GREEN) -> list[str]:
        return [str(e) for e in self.latest.get(pair, ())]


@contextlib.asynccontextmanager
async def running(source: Any, recorder: Recorder) -> AsyncIterator[None]:
    task = asyncio.create_task(source.run(recorder))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def replace_atomically(path: Path, text: str) -> None:
    """What config management does: write a temporary file, rename it over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Config


def test_config_parses_sources_and_refuses_mistakes_naming_the_key() -> None:
    settings = parse_settings({"endpoint_sources": [
        {"name": "cm", "owns": [{"service": "shop", "environment": "green"}], "file": {"path": "/x/endpoints.json"}},
        {"name": "dns", "service": "search", "environment": "blue",
         "dns": {"name": "search.internal", "type": "A", "port": 8080, "nameservers": ["127.0.0.1:5353", "[::1]:53", "10.0.0.2"]}},
    ]})
    cm, dns = settings.endpoint_sources
    assert cm.file == FileSourceSpec("/x/endpoints.json", "json", 1.0) and cm.owns == (GREEN,)
    assert dns.dns is not None and dns.dns.nameservers == (("127.0.0.1", 5353), ("::1", 53), ("10.0.0.2", 53))
    one = {"name": "s", "service": "shop", "environment": "green"}
    for bad, words in [
        ([{**one, "file": {"path": "/x"}, "wat": 1}], "endpoint_sources[0]: unknown key(s) wat"),
        ([{**one, "file": {"path": "/x", "format": "toml"}}], "endpoint_sources[0].file.format: expected yaml or json"),
        ([{**one}], "endpoint_sources[0]: give exactly one of file or dns"),
        ([{**one, "dns": {"name": "a.internal", "type": "A"}}], "endpoint_sources[0].dns.port: expected a port number"),
        ([{**one, "dns": {"name": "a.internal", "type": "SRV", "port": 80}}], "endpoint_sources[0].dns.port: SRV records give the port"),
        ([{**one, "dns": {"name": "a.internal", "type": "MX"}}], "endpoint_sources[0].dns.type: expected one of A, AAAA, SRV"),
        ([{**one, "dns": {"name": "a.internal", "port": 80, "nameservers": ["ns.internal"]}}],
         "endpoint_sources[0].dns.nameservers[0]: expected an IP address"),
        ([{**one, "environment": "red", "file": {"path": "/x"}}], "endpoint_sources[0].environment: expected blue or green"),
        ([{**one, "file": {"path": "/x"}}, {**one, "name": "t", "file": {"path": "/y"}}],
         "endpoint_sources[1]: shop/green is already owned by source 's'"),
        ([{**one, "file": {"path": "/x"}}, {**one, "environment": "blue", "file": {"path": "/y"}}],
         "endpoint_sources[1].name: 's' is used twice"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_settings({"endpoint_sources": bad})
        assert words in str(caught.value), (words, str(caught.value))


# ---------------------------------------------------------------------------------------------
# The file source, on real files


async def test_file_source_follows_writes_and_atomic_renames_and_keeps_the_last_good_set(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(yaml.safe_dump({"shop": {"green": ["10.0.1.1:8080", {"address": "10.0.1.2:8080", "weight": 3}]}}))
    recorder = Recorder()
    source = FileSource("cm", (GREEN,), FileSourceSpec(str(path), "yaml", poll_seconds=0.05))
    async with running(source, recorder):
        await wait_for(lambda: recorder.addresses() == ["10.0.1.1:8080", "10.0.1.2:8080"], message="first read")
        assert [e.weight for e in recorder.latest[GREEN]] == [1, 3]
        # Atomic rename (a new inode under the same name): an endpoint added, one removed.
        replace_atomically(path, yaml.safe_dump({"shop": {"green": ["10.0.1.2:8080", "10.0.1.3:8080"]}}))
        await wait_for(lambda: recorder.addresses() == ["10.0.1.2:8080", "10.0.1.3:8080"], message="after the rename")
        # A bad file (an endpoint the API would refuse): reported once, last good kept.
        reports = recorder.reports
        replace_atomically(path, yaml.safe_dump({"shop": {"green": ["10.0.1.2:8080", "db.internal:5432"]}}))
        await wait_for(lambda: recorder.errors, message="bad file reported")
        assert "shop.green: invalid endpoint 'db.internal:5432'" in recorder.errors[-1]
        # Not valid YAML, then the file removed: each reported, nothing reported as endpoints.
        path.write_text("shop: {green: [")
        await wait_for(lambda: len(recorder.errors) == 2 and "not valid YAML" in recorder.errors[-1], message="broken YAML")
        path.unlink()
        await wait_for(lambda: len(recorder.errors) == 3 and "cannot read" in recorder.errors[-1], message="file removed")
        assert recorder.reports == reports and recorder.addresses() == ["10.0.1.2:8080", "10.0.1.3:8080"]
        # Back, in place (no rename): picked up again.
        path.write_text(yaml.safe_dump({"shop": {"green": ["10.0.1.4:8080"]}}))
        await wait_for(lambda: recorder.addresses() == ["10.0.1.4:8080"], message="file back")
        assert len(recorder.errors) == 3  # an unchanged bad file is not re-reported on every poll


async def test_file_source_refuses_empty_lists_missing_and_unowned_entries_unless_allowed(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.json"
    spec = FileSourceSpec(str(path), "json", poll_seconds=0.05)
    for content, words in [({"shop": {"green": []}}, "shop.green: no endpoints (an empty set is only applied with allow_empty: true)"),
                           ({"shop": {"blue": ["10.0.0.1:80"], "green": ["10.0.0.2:80"]}}, "shop.blue: not owned by this source"),
                           ({"other": {}}, "missing shop/green")]:
        path.write_text(json.dumps(content))
        recorder = Recorder()
        async with running(FileSource("cm", (GREEN,), spec), recorder):
            await wait_for(lambda: recorder.errors, message=f"error for {content}")
        assert words in recorder.errors[0] and recorder.reports == 0
    path.write_text(json.dumps({"shop": {"green": []}}))
    recorder = Recorder()
    async with running(FileSource("cm", (GREEN,), spec, allow_empty=True), recorder):
        await wait_for(lambda: recorder.reports, message="empty set with allow_empty")
    assert recorder.latest[GREEN] == ()


# ---------------------------------------------------------------------------------------------
# The DNS source, against a real DNS server process


@contextlib.contextmanager
def dns_server(zone: Path) -> Any:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.dns_server", str(zone), str(port)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None and b"dns server on" in proc.stdout.readline()
        yield port
    finally:
        proc.kill()
        proc.wait()


def write_zone(path: Path, records: dict[str, Any], *, servfail: bool = False) -> None:
    replace_atomically(path, json.dumps({"servfail": servfail, "records": records}))


async def test_dns_source_re_resolves_a_and_srv_records_and_keeps_the_last_good_set_on_failure(tmp_path: Path) -> None:
    zone = tmp_path / "zone.json"
    write_zone(zone, {"shop-green.test.": {"A": ["127.0.0.11", "127.0.0.12"]},
                      "_http._tcp.shop.test.": {"SRV": [[10, 5, 9001, "a.test."], [10, 0, 9002, "b.test."], [20, 1, 9003, "c.test."]]},
                      "a.test.": {"A": ["127.0.1.1"]}, "b.test.": {"A": ["127.0.1.2"]}, "c.test.": {"A": ["127.0.1.3"]}})
    with dns_server(zone) as port:
        a_records, srv = Recorder(), Recorder()
        a_source = DnsSource("a", (GREEN,), DnsSourceSpec("shop-green.test", "A", port=8080, interval_seconds=0.1,
                                                          timeout_seconds=0.5, nameservers=(("127.0.0.1", port),)))
        srv_source = DnsSource("srv", (GREEN,), DnsSourceSpec("_http._tcp.shop.test", "SRV", interval_seconds=0.1,
                                                              timeout_seconds=0.5, nameservers=(("127.0.0.1", port),)))
        async with running(a_source, a_records), running(srv_source, srv):
            await wait_for(lambda: a_records.addresses() == ["127.0.0.11:8080", "127.0.0.12:8080"], message="A records")
            # SRV: the lowest priority only (c.test is a backup), its ports, weights (0 counts as 1).
            await wait_for(lambda: srv.addresses() == ["127.0.1.1:9001", "127.0.1.2:9002"], message="SRV records")
            assert [e.weight for e in srv.latest[GREEN]] == [5, 1]
            # The records change: re-resolution picks it up.
            write_zone(zone, {"shop-green.test.": {"A": ["127.0.0.12", "127.0.0.13"]},
                              "_http._tcp.shop.test.": {"SRV": [[10, 2, 9001, "a.test."]]}, "a.test.": {"A": ["127.0.1.1"]}})
            await wait_for(lambda: a_records.addresses() == ["127.0.0.12:8080", "127.0.0.13:8080"], message="A changed")
            await wait_for(lambda: srv.addresses() == ["127.0.1.1:9001"] and srv.latest[GREEN][0].weight == 2, message="SRV changed")
            # The server fails (SERVFAIL): errors, the last good sets stay.
            write_zone(zone, {}, servfail=True)
            await wait_for(lambda: a_records.errors and srv.errors, message="failures reported")
            assert "lookup failed" in a_records.errors[-1]
            assert a_records.addresses() == ["127.0.0.12:8080", "127.0.0.13:8080"] and srv.addresses() == ["127.0.1.1:9001"]
            # NXDOMAIN (the name resolves to nothing): without allow_empty an error, last good kept.
            write_zone(zone, {})
            await wait_for(lambda: any("NXDOMAIN" in e for e in a_records.errors), message="NXDOMAIN reported")
            assert a_records.addresses() == ["127.0.0.12:8080", "127.0.0.13:8080"]
        # The server gone (no answer at all): an error, nothing reported.
        last = a_records.addresses()
    errors = len(a_records.errors)
    async with running(a_source, a_records):
        await wait_for(lambda: len(a_records.errors) > errors, message="timeout reported")
    assert "no answer within" in a_records.errors[-1] or "lookup failed" in a_records.errors[-1]
    assert a_records.addresses() == last


async def test_dns_empty_answer_empties_only_with_allow_empty(tmp_path: Path) -> None:
    zone = tmp_path / "zone.json"
    write_zone(zone, {"shop-green.test.": {"AAAA": ["::1"]}})  # exists, but has no A records
    with dns_server(zone) as port:
        recorder = Recorder()
        source = DnsSource("a", (GREEN,), DnsSourceSpec("shop-green.test", "A", port=8080, interval_seconds=0.1,
                                                        timeout_seconds=0.5, nameservers=(("127.0.0.1", port),)),
                           allow_empty=True)
        async with running(source, recorder):
            await wait_for(lambda: recorder.reports, message="empty answer")
        assert recorder.latest[GREEN] == () and not recorder.errors


# ---------------------------------------------------------------------------------------------
# End to end: a real control plane process


async def test_a_deployment_takes_its_endpoints_from_the_file_and_api_writes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(yaml.safe_dump({"shop": {"green": ["127.0.0.1:9101", {"address": "127.0.0.1:9102", "weight": 2}]}}))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"endpoint_sources": [
        {"name": "cm-file", "service": "shop", "environment": "green", "file": {"path": str(path), "poll_seconds": 0.1}}]}))
    async with run_control_plane(state_path=tmp_path / "state.db", config_path=config, log_dir=tmp_path) as cp, \
            cp.session() as session:
        async def call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
            async with session.request(method, f"{cp.admin_url}{url}", json=body) as response:
                return response.status, await response.json()

        assert (await call("PUT", "/v1/services/shop", {"drain_seconds": 0, "standby_seconds": 1}))[0] == 200
        assert (await call("PUT", "/v1/services/shop/environments/blue", {"version": "v1", "endpoints": ["127.0.0.1:9001"]}))[0] == 200

        async def green() -> list[Any]:
            return (await call("GET", "/v1/services/shop"))[1]["environments"]["green"]["endpoints"]

        async def pending() -> str | None:
            return (await call("GET", "/v1/endpoint-sources"))[1]["sources"][0]["owns"][0]["pending"]

        # Green has no version yet: the source waits for a deployment, and says so.
        assert "no version in shop/green yet" in (await wait_for(pending, message="pending reason"))
        status, body = await call("PUT", "/v1/services/shop/environments/green", {"version": "v2", "endpoints": ["127.0.0.1:9999"]})
        assert status == 409 and "endpoint source 'cm-file'" in body["error"]
        status, body = await call("POST", "/v1/services/shop/deployments", {"version": "v2", "endpoints": ["127.0.0.1:9999"]})
        assert status == 409 and "leave endpoints out" in body["error"]
        # So is a release naming endpoints for the owned member, and it stores nothing.
        assert (await call("PUT", "/v1/services/cart", {"domains": ["cart.example"]}))[0] == 200
        assert (await call("PUT", "/v1/services/cart/environments/blue", {"version": "v1", "endpoints": ["127.0.0.1:9002"]}))[0] == 200
        status, body = await call("POST", "/v1/releases", {"services": {
            "shop": {"version": "v2", "endpoints": ["127.0.0.1:9999"]},
            "cart": {"version": "v2", "endpoints": ["127.0.0.1:9003"]}}})
        assert status == 409 and "leave endpoints out" in body["error"], body
        assert (await call("GET", "/v1/releases"))[1]["releases"] == []
        # The deployment takes the file's endpoints.
        status, body = await call("POST", "/v1/services/shop/deployments", {"version": "v2", "strategy": {"steps": [100]}})
        assert status == 202, body
        assert body["deployment"]["spec"]["endpoints"] == ["127.0.0.1:9101", {"address": "127.0.0.1:9102", "weight": 2}]
        assert await green() == ["127.0.0.1:9101", "127.0.0.1:9102"]

        async def deployment_status() -> str:
            return (await call("GET", f"/v1/deployments/{body['id']}"))[1]["status"]
        await wait_for(lambda: _is(deployment_status, "active"), timeout=60, message="deployment active")

        # Config management changes the file (atomic rename): one endpoint added, one removed;
        # the live environment follows through the store.
        replace_atomically(path, yaml.safe_dump({"shop": {"green": ["127.0.0.1:9102", "127.0.0.1:9103"]}}))
        await wait_for(lambda: _is(green, ["127.0.0.1:9102", "127.0.0.1:9103"]), message="file change applied")
        # A bad file keeps the last good endpoints, is shown and counted.
        replace_atomically(path, "shop: {green: [not-an-address]}")
        view = await wait_for(lambda: _source_with_error(call), message="error shown")
        assert "invalid endpoint 'not-an-address'" in view["last_error"] and view["errors"] == 1
        assert view["owns"][0]["endpoints"] == ["127.0.0.1:9102", "127.0.0.1:9103"]
        assert await green() == ["127.0.0.1:9102", "127.0.0.1:9103"]
        async with session.get(f"{cp.admin_url}/metrics") as response:
            text = await response.text()
        assert 'bluegreen_endpoint_source_errors_total{source="cm-file"} 1.0' in text
        assert 'bluegreen_endpoint_source_updates_total{source="cm-file"} 1.0' in text
        # An empty list for a live environment: refused (without allow_empty), last good kept.
        replace_atomically(path, yaml.safe_dump({"shop": {"green": []}}))
        await wait_for(lambda: _source_with_error(call, errors=2), message="empty list refused")
        assert await green() == ["127.0.0.1:9102", "127.0.0.1:9103"]


async def _is(get: Any, expected: Any) -> bool:
    return bool(await get() == expected)


async def _source_with_error(call: Any, errors: int = 1) -> dict[str, Any] | None:
    view = (await call("GET", "/v1/endpoint-sources"))[1]["sources"][0]
    return view if view["errors"] == errors and view["last_error"] else None


# ---------------------------------------------------------------------------------------------
# The CLI, for environments a source owns


def _in_process_with(tmp_path: Path, config: dict[str, Any]) -> Any:
    """A control plane in this process with ``config`` (its admin API on a test server)."""
    from tests.test_workflow import in_process

    return in_process(tmp_path, parse_settings(config))


async def test_cli_deploys_and_releases_into_a_source_owned_environment_without_endpoints(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The API takes an owned environment's endpoints from its source and refuses a body that
    gives some (409): `bluegreen deploy` and `bluegreen release create` must be able to leave
    them out, and without a source the API names the missing endpoints."""
    from controlplane.cli import main
    from tests.test_workflow import _call

    path = tmp_path / "endpoints.yaml"
    path.write_text(yaml.safe_dump({"shop": {"green": ["127.0.0.1:9101"]}}))
    config = {"endpoint_sources": [
        {"name": "cm-file", "service": "shop", "environment": "green", "file": {"path": str(path), "poll_seconds": 0.1}}]}
    async with _in_process_with(tmp_path, config) as (cp, client):
        for name, port in (("shop", 9001), ("cart", 9002)):
            await _call(client, "PUT", f"/v1/services/{name}", {"domains": [f"{name}.example"], "drain_seconds": 0,
                                                                "standby_seconds": 1})
            await _call(client, "PUT", f"/v1/services/{name}/environments/blue", {"version": "v1", "endpoints": [f"127.0.0.1:{port}"]})
        await wait_for(lambda: cp.sources.endpoints_of("shop", Environment.GREEN), message="the source's first report")
        common = ["--admin", str(client.make_url("")).rstrip("/")]

        # Without a source, leaving endpoints out is a 400 naming them, and nothing is stored.
        assert await asyncio.to_thread(main, ["deploy", "cart", "--version", "v2", *common]) == 1
        assert "'endpoints' is required" in capsys.readouterr().err
        assert [d["version"] for d in (await _call(client, "GET", "/v1/services/cart/deployments"))["deployments"]] == ["v1"]

        assert await asyncio.to_thread(main, ["deploy", "shop", "--version", "v2", "--bake-seconds", "0", *common]) == 0
        created = capsys.readouterr().out
        assert "deployment shop-2 accepted" in created, created

        async def active() -> bool:
            return (await _call(client, "GET", "/v1/deployments/shop-2"))["status"] == "active"
        await wait_for(active, message="shop-2 active")
        shop = await _call(client, "GET", "/v1/services/shop")
        assert shop["environments"]["green"]["endpoints"] == ["127.0.0.1:9101"]

        # A release: shop's idle environment is now blue (not owned); cart names its endpoints.
        assert await asyncio.to_thread(main, ["release", "create", *common, "--member", "shop=v3@127.0.0.1:9103",
                                              "--member", "cart=v3@127.0.0.1:9203", "--steps", "100",
                                              "--bake-seconds", "0"]) == 0
        assert "release release-1 accepted (cart, shop)" in capsys.readouterr().out

        async def complete() -> bool:
            return (await _call(client, "GET", "/v1/releases/release-1"))["status"] == "complete"
        await wait_for(complete, message="release-1 complete")

        async def green_free() -> bool:
            shop = await _call(client, "GET", "/v1/services/shop")
            return shop["environments"]["green"]["version"] is None  # decommissioned: idle again, owned
        await wait_for(green_free, message="green decommissioned")
        # Now shop's idle environment is the owned one: the member gives only its version.
        assert await asyncio.to_thread(main, ["release", "create", *common, "--member", "shop=v4",
                                              "--member", "cart=v4@127.0.0.1:9204", "--steps", "100",
                                              "--bake-seconds", "0"]) == 0
        assert "release release-2 accepted (cart, shop)" in capsys.readouterr().out
        release = await _call(client, "GET", "/v1/releases/release-2")
        assert release["spec"]["services"]["shop"]["endpoints"] == ["127.0.0.1:9101"]
        # A member without '=' is still refused by the CLI itself.
        assert await asyncio.to_thread(main, ["release", "create", *common, "--member", "shop"]) == 2
        assert "expected NAME=VERSION[@IP:PORT" in capsys.readouterr().err


async def test_endpoints_a_source_reports_during_scaling_let_the_waiting_step_go(tmp_path: Path) -> None:
    """docs/endpoint-sources.md: the source's writes take the put_environment path, so endpoints
    it reports while a deployment waits in the capacity guard's scaling phase satisfy it, in the
    same transaction, credited to the source."""
    from tests.test_workflow import _call

    path = tmp_path / "endpoints.yaml"
    path.write_text(yaml.safe_dump({"shop": {"green": ["127.0.0.1:9101"]}}))
    config = {"endpoint_sources": [
        {"name": "cm-file", "service": "shop", "environment": "green", "file": {"path": str(path), "poll_seconds": 0.1}}]}
    async with _in_process_with(tmp_path, config) as (cp, client):
        await _call(client, "PUT", "/v1/services/shop", {"domains": ["shop.example"]})
        await _call(client, "PUT", "/v1/services/shop/environments/blue",
                    {"version": "v1", "endpoints": [f"127.0.0.1:{9001 + i}" for i in range(4)]})
        await wait_for(lambda: cp.sources.endpoints_of("shop", Environment.GREEN), message="the source's first report")
        created = await _call(client, "POST", "/v1/services/shop/deployments", {
            "version": "v2", "strategy": {"steps": [50, 100], "step_seconds": 600}, "scale": {"timeout_seconds": 600}}, expect=202)

        async def deployment() -> dict[str, Any]:
            return dict(await _call(client, "GET", f"/v1/deployments/{created['id']}"))

        async def scaling() -> bool:
            return (await deployment())["phase"] == "scaling"
        await wait_for(scaling, message="waiting for capacity (1 of the 2 that 50 % of 4 needs)")
        replace_atomically(path, yaml.safe_dump({"shop": {"green": ["127.0.0.1:9101", "127.0.0.1:9102"]}}))

        async def shifted() -> dict[str, Any] | None:
            d = await deployment()
            return d if d["status"] == "shifting" and d["phase"] is None and d["step"] == 0 else None
        d = await wait_for(shifted, message="step 0 taken once the source reported the capacity")
        assert d["history"][-1]["actor"] == "source:cm-file", d["history"][-1]
        shop = await _call(client, "GET", "/v1/services/shop")
        assert shop["environments"]["green"]["weight"] == 50
