"""Render the Envoy bootstrap that connects a proxy to this control plane over ADS."""

from __future__ import annotations

import ipaddress
import json
import math
import re
from importlib import resources
from string import Template
from typing import Sequence

from .errors import ValidationError

# The bootstrap's static cluster for ADS and the metrics service (see templates/bootstrap.yaml).
XDS_CLUSTER = "bluegreen_xds"

_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")


def parse_host_port(text: str, *, what: str) -> tuple[str, int]:
    """Split 'HOST:PORT' (IPv6 as '[ADDR]:PORT'); raise ValidationError naming ``what``."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValidationError(f"{what}: expected HOST:PORT, got {text!r}")
    return host, int(port)


def render_bootstrap(
    *,
    node_id: str,
    fleet: str = "default",
    xds: str | Sequence[str] = "127.0.0.1:18000",
    admin_address: str = "127.0.0.1",
    admin_port: int = 9901,
    delta: bool = False,
    stats_flush_seconds: float = 1.0,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    ca: str | None = None,
) -> str:
    """The bootstrap text. ``stats_flush_seconds`` is Envoy's ``stats_flush_interval``: how often
    it streams its stats to the control plane's metrics service (the deployment analysis reads
    them); rounded to whole milliseconds, within [1 ms, 300 s).

    With ``ca`` (a PEM file path, as Envoy will see it) the xDS connection uses TLS and Envoy
    verifies that the server's certificate is signed by it and names the ``xds`` host (an IP
    SAN for an IP address, else a DNS SAN). ``tls_cert`` and ``tls_key`` (together, and only
    with ``ca``) are the certificate Envoy presents: a control plane with ``xds.tls`` requires one.

    ``xds`` may name several replicas (``["a:18000", "b:18000"]``): the ``bluegreen_xds`` cluster
    lists them all, Envoy holds its ADS stream to one of them and reconnects to another when
    that one goes away; with ``ca`` the certificate may name any of them."""
    if not _NODE_ID.match(node_id):
        raise ValidationError(f"invalid node id {node_id!r}: use letters, digits, '.', '_', ':' or '-'")
    if not _NODE_ID.match(fleet):
        raise ValidationError(f"invalid fleet name {fleet!r}")
    try:
        ipaddress.ip_address(admin_address)
    except ValueError:
        raise ValidationError(f"invalid admin address {admin_address!r}: expected an IP address") from None
    if not 0 < admin_port < 65536:
        raise ValidationError(f"invalid admin port {admin_port}")
    stats_flush = format_flush_interval(stats_flush_seconds)
    addresses = [xds] if isinstance(xds, str) else list(xds)
    if not addresses:
        raise ValidationError("--xds: name at least one control plane replica")
    targets = [parse_host_port(a, what="--xds") for a in addresses]
    if len(set(targets)) != len(targets):
        raise ValidationError(f"--xds: the same address is named twice: {', '.join(addresses)}")
    hosts = [h for h, _ in targets]
    cluster_type = "STATIC" if all(_is_ip(h) for h in hosts) else "STRICT_DNS"  # e.g. compose service names
    transport_socket = _tls_transport_socket(hosts, tls_cert, tls_key, ca)
    template = Template(resources.files("controlplane").joinpath("templates/bootstrap.yaml").read_text())
    return template.substitute(
        node_id=node_id,
        fleet=fleet,
        admin_address=admin_address,
        admin_port=admin_port,
        api_type="DELTA_GRPC" if delta else "GRPC",
        xds_cluster_type=cluster_type,
        xds_endpoints="".join(
            "\n              - endpoint:"
            "\n                  address:"
            f"\n                    socket_address: {{ address: {json.dumps(h)}, port_value: {p} }}"
            for h, p in targets),
        stats_flush=stats_flush,
        xds_transport_socket=transport_socket,
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _tls_transport_socket(hosts: list[str], cert: str | None, key: str | None, ca: str | None) -> str:
    """The bluegreen_xds cluster's ``transport_socket``: YAML lines indented for the template,
    each after a newline (the template puts it at the end of the line before), or ''."""
    if (cert is None) != (key is None):
        raise ValidationError("--tls-cert and --tls-key go together: give both or neither")
    if ca is None:
        if cert is not None:
            raise ValidationError("--tls-cert needs --ca: Envoy must verify the control plane's certificate")
        return ""
    for what, value in (("--tls-cert", cert), ("--tls-key", key), ("--ca", ca)):
        if value is not None and (not value or "\n" in value):
            raise ValidationError(f"{what}: expected a file path, got {value!r}")
    lines = [
        "      transport_socket:",
        "        name: envoy.transport_sockets.tls",
        "        typed_config:",
        '          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext',
    ]
    if len(hosts) == 1 and not _is_ip(hosts[0]):
        lines.append(f"          sni: {json.dumps(hosts[0])}")
    lines += [
        "          common_tls_context:",
        '            alpn_protocols: ["h2"]',
    ]
    if cert is not None and key is not None:
        lines += [
            "            tls_certificates:",
            f"              - certificate_chain: {{ filename: {json.dumps(cert)} }}",
            f"                private_key: {{ filename: {json.dumps(key)} }}",
        ]
    lines += [
        "            validation_context:",
        f"              trusted_ca: {{ filename: {json.dumps(ca)} }}",
        "              match_typed_subject_alt_names:",
    ]
    for host in dict.fromkeys(hosts):  # any replica's certificate names its own host
        lines += [
            f"                - san_type: {'IP_ADDRESS' if _is_ip(host) else 'DNS'}",
            f"                  matcher: {{ exact: {json.dumps(host)} }}",
        ]
    return "".join("\n" + line for line in lines)


def format_flush_interval(seconds: float) -> str:
    """``seconds`` as an Envoy duration with millisecond precision: 1 -> '1s', 0.5 -> '0.5s'.

    Envoy accepts a stats flush interval from 1 ms up to (excluding) 300 s."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise ValidationError(f"invalid stats flush interval {seconds!r}: expected a number of seconds")
    millis = round(seconds * 1000)
    if not 1 <= millis < 300_000:
        raise ValidationError(f"invalid stats flush interval {seconds!r}: must be at least 0.001 s and less than 300 s")
    return f"{millis / 1000:g}s"


def render_grpc_bootstrap(
    *,
    node_id: str,
    fleet: str = "default",
    xds: str = "127.0.0.1:18000",
    tls_cert: str | None = None,
    tls_key: str | None = None,
    ca: str | None = None,
) -> str:
    """The JSON bootstrap a proxyless gRPC client reads from ``GRPC_XDS_BOOTSTRAP`` (gRFC A27):
    one xDS server (this control plane, xDS v3 over ADS, State of the World), and the node,
    whose ``cluster`` names the fleet, as an Envoy's does.

    Without ``ca`` the channel is plaintext (``insecure``). With ``ca`` it is TLS (gRFC A65's
    ``tls`` channel credentials: the client verifies the server's certificate against ``ca``),
    and with ``tls_cert`` and ``tls_key`` the client presents that certificate (mTLS). Paths are
    as the gRPC client will see them."""
    if not _NODE_ID.match(node_id):
        raise ValidationError(f"invalid node id {node_id!r}: use letters, digits, '.', '_', ':' or '-'")
    if not _NODE_ID.match(fleet):
        raise ValidationError(f"invalid fleet name {fleet!r}")
    host, port = parse_host_port(xds, what="--xds")
    _tls_transport_socket(host, tls_cert, tls_key, ca)  # the same rules for the TLS options
    creds: dict[str, object] = {"type": "insecure"}
    if ca is not None:
        config = {"ca_certificate_file": ca}
        if tls_cert is not None and tls_key is not None:
            config |= {"certificate_file": tls_cert, "private_key_file": tls_key}
        creds = {"type": "tls", "config": config}
    server_host = f"[{host}]" if ":" in host else host
    bootstrap = {
        "xds_servers": [{"server_uri": f"{server_host}:{port}", "channel_creds": [creds], "server_features": ["xds_v3"]}],
        "node": {"id": node_id, "cluster": fleet},
    }
    return json.dumps(bootstrap, indent=2) + "\n"
