"""mTLS on the xDS port and certificate identities bound to fleets, with real Envoys, a real
`bluegreen serve` process and certificates made by the test (tests/certs.py)."""

from __future__ import annotations

import contextlib
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import yaml

from controlplane.bootstrap import render_bootstrap
from controlplane.config import identity_allowed, parse_settings
from controlplane.errors import ConfigError, ValidationError
from tests.certs import CertFiles, CertificateAuthority
from tests.harness import Envoy, admin_headers, envoy_binary, free_port, run_control_plane, run_envoy, wait_for

pytestmark = pytest.mark.envoy

EDGE_ID = "spiffe://example.org/edge/envoy-1"
INTERNAL_ID = "spiffe://example.org/internal/envoy-1"


@dataclass
class Pki:
    ca: CertificateAuthority
    server: CertFiles
    edge: CertFiles
    internal: CertFiles


def make_pki(directory: Path) -> Pki:
    ca = CertificateAuthority(directory)
    return Pki(ca, ca.server(), ca.client("edge-1", EDGE_ID), ca.client("internal-1", INTERNAL_ID))


def tls_config(path: Path, pki: Pki, **xds: Any) -> Path:
    def fleet(kind: str) -> dict[str, Any]:
        return {"listeners": [{"name": "http", "address": "127.0.0.1", "port": free_port()}],
                "identities": [f"spiffe://example.org/{kind}/*"]}

    config = {
        "xds": {"tls": {"cert": str(pki.server.cert), "key": str(pki.server.key), "client_ca": str(pki.ca.cert_path)}, **xds},
        "fleets": {"edge": fleet("edge"), "internal": fleet("internal")},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.asynccontextmanager
async def tls_envoy(cp: Any, node_id: str, fleet: str, pki: Pki, cert: CertFiles | None) -> AsyncIterator[Envoy]:
    admin_port = free_port()
    bootstrap = render_bootstrap(
        node_id=node_id, fleet=fleet, xds=cp.xds_address, admin_port=admin_port, ca=str(pki.ca.cert_path),
        tls_cert=str(cert.cert) if cert else None, tls_key=str(cert.key) if cert else None,
    )
    async with run_envoy(bootstrap, admin_port=admin_port) as envoy:
        yield envoy


async def get_text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url, headers=admin_headers(url)) as response:
        assert response.status == 200, f"GET {url} -> {response.status}"
        return await response.text()


def dynamic_listeners(dump: dict[str, Any]) -> list[Any]:
    return [listener for config in dump["configs"] for listener in config.get("dynamic_listeners", [])]


def test_rendered_tls_bootstrap_is_valid_for_envoy(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    for xds, cert in (("127.0.0.1:18000", pki.edge), ("controlplane:18000", pki.edge), ("127.0.0.1:18000", None)):
        text = render_bootstrap(node_id="e1", fleet="edge", xds=xds, ca=str(pki.ca.cert_path),
                                tls_cert=str(cert.cert) if cert else None, tls_key=str(cert.key) if cert else None)
        config = yaml.safe_load(text)
        [cluster] = config["static_resources"]["clusters"]
        assert cluster["transport_socket"]["name"] == "envoy.transport_sockets.tls"
        path = tmp_path / "bootstrap.yaml"
        path.write_text(text)
        result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{xds} cert={cert}: {result.stdout[-2000:]}{result.stderr[-2000:]}"


async def test_mtls_refuses_proxies_without_the_right_certificate_and_serves_the_right_one(tmp_path: Path) -> None:
    """One control plane with mTLS and fleets edge/internal bound to SPIFFE IDs; three Envoys:
    no client certificate (refused at the handshake), an edge certificate claiming fleet
    internal (PERMISSION_DENIED naming the fleet, counted), and an edge certificate in edge
    (converges)."""
    pki = make_pki(tmp_path / "pki")
    config = tls_config(tmp_path / "config.yaml", pki)
    async with run_control_plane(state_path=tmp_path / "state.db", config_path=config, log_dir=tmp_path) as cp, \
            aiohttp.ClientSession() as session, \
            tls_envoy(cp, "no-cert", "edge", pki, None) as anonymous, \
            tls_envoy(cp, "impostor", "internal", pki, pki.edge) as impostor, \
            tls_envoy(cp, "edge-1", "edge", pki, pki.edge) as good:
        await good.wait_ready(timeout=60)
        assert dynamic_listeners(await good.config_dump()), "the right certificate gets its fleet's listeners"

        async def impostor_refused() -> bool:
            metrics = await get_text(session, cp.admin_url + "/metrics")
            return 'bluegreen_xds_streams_refused_total{reason="fleet_not_allowed"}' in metrics

        await wait_for(impostor_refused, timeout=60, message="the impostor's stream refused and counted")
        assert f"{EDGE_ID} may not join fleet 'internal'" in cp.log_text()

        async def handshake_failed() -> bool:
            # The port is open (the other Envoys are served on it): Envoy counts a TLS handshake
            # that the server refused as a failed connect, then retries.
            return (await anonymous.stats()).get("cluster.bluegreen_xds.upstream_cx_connect_fail", 0) >= 2

        await wait_for(handshake_failed, timeout=60, message="the Envoy without a certificate refused at the handshake, twice")
        for envoy in (anonymous, impostor):
            stats = await envoy.stats()
            assert stats.get("control_plane.connected_state") == 0, envoy
            assert not dynamic_listeners(await envoy.config_dump()), envoy
        async with session.get(cp.admin_url + "/v1/proxies", headers=cp.headers) as response:
            proxies = (await response.json())["proxies"]
        assert [p["node_id"] for p in proxies] == ["edge-1"]


def test_identity_patterns_match_one_path_segment() -> None:
    patterns = ("spiffe://example.org/edge/*", "envoy-*.internal.example.org")
    assert identity_allowed(patterns, (EDGE_ID,))
    assert identity_allowed(patterns, ("envoy-7.internal.example.org",))
    assert not identity_allowed(patterns, ("spiffe://example.org/edge",))
    assert not identity_allowed(patterns, ("spiffe://example.org/edge/a/b",))
    assert not identity_allowed(patterns, (INTERNAL_ID,))
    assert not identity_allowed(patterns, ())
    # A DNS pattern's * stays within one label, and URI and DNS patterns match only their kind.
    assert not identity_allowed(("*.edge.example.com",), ("a.b.edge.example.com",))
    assert identity_allowed(("*.edge.example.com",), ("a.edge.example.com",))
    assert not identity_allowed(("envoy-*",), ("envoy-x.evil.com",))
    assert not identity_allowed(("spiffe://example.org/*",), ("example.org",))


def test_config_refuses_identities_without_tls_and_missing_files(tmp_path: Path) -> None:
    fleet = {"listeners": [{"name": "http", "port": 10000}], "identities": ["spiffe://example.org/edge/*"]}
    with pytest.raises(ConfigError, match=r"fleets.edge.identities: needs xds.tls"):
        parse_settings({"fleets": {"edge": fleet}})
    with pytest.raises(ConfigError, match=r"xds.tls.cert: no such file"):
        parse_settings({"xds": {"tls": {"cert": str(tmp_path / "none.crt"), "key": "k", "client_ca": "c"}}})
    with pytest.raises(ConfigError, match=r"fleets.edge.identities: expected a non-empty list"):
        parse_settings({"fleets": {"edge": dict(fleet, identities=[])}})
    with pytest.raises(ConfigError, match=r"xds: unknown key\(s\) bogus"):
        parse_settings({"xds": {"bogus": 1}})
    with pytest.raises(ConfigError, match=r"xds.max_streams_per_identity: expected an integer"):
        parse_settings({"xds": {"max_streams_per_identity": 0}})


def test_bootstrap_tls_flags_must_come_together() -> None:
    with pytest.raises(ValidationError, match="--tls-cert and --tls-key go together"):
        render_bootstrap(node_id="e1", tls_cert="a.crt", ca="ca.crt")
    with pytest.raises(ValidationError, match="--tls-cert needs --ca"):
        render_bootstrap(node_id="e1", tls_cert="a.crt", tls_key="a.key")
    assert "transport_socket" not in render_bootstrap(node_id="e1")
