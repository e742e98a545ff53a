"""Unit tests of the pure domain model (controlplane.model): parsing, validation, traffic
transitions, serialization and route conflicts. No I/O.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.errors import BlueGreenError, ConflictError, ValidationError
from controlplane.model import (
    DEFAULT_FLEET,
    Change,
    Deployment,
    DeploymentStatus,
    Endpoint,
    Environment,
    EnvironmentState,
    Fleet,
    ListenerSpec,
    Service,
    Traffic,
    apply_service_spec,
    deployment_from_dict,
    deployment_to_dict,
    full_weights,
    parse_environment_spec,
    parse_weights,
    rollback_target,
    route_conflict,
    service_from_dict,
    service_to_dict,
    set_environment,
    set_weights,
    switch_target,
    validate_domain,
    validate_prefix,
    validate_service_name,
    validate_version,
)

BLUE, GREEN = Environment.BLUE, Environment.GREEN
T0, T1, T2, T3 = 1000.0, 2000.0, 3000.0, 4000.0
NO_RECORDS: dict[Environment, Deployment | None] = {BLUE: None, GREEN: None}



def eps(*texts: str) -> tuple[Endpoint, ...]:
    return tuple(sorted(Endpoint.parse(t) for t in texts))


def env_state(version: str, *endpoints: str) -> EnvironmentState:
    return EnvironmentState(version, eps(*endpoints))


def record(service: str, seq: int, env: Environment, version: str, status: DeploymentStatus, **kw: Any) -> Deployment:
    return Deployment(
        id=f"{service}-{seq}", service=service, version=version, environment=env, status=status,
        deployed_at=kw.pop("deployed_at", T0), **kw,
    )


def by_env(change: Change) -> dict[Environment, list[Deployment]]:
    out: dict[Environment, list[Deployment]] = {BLUE: [], GREEN: []}
    for r in change.deployments:
        out[r.environment].append(r)
    return out


def blue_live_green_ready() -> tuple[Service, dict[Environment, Deployment | None]]:
    """The state every shift starts from: blue runs v1 with 100 %, green has v2 registered."""
    service = Service(
        name="shop",
        blue=env_state("v1", "10.0.0.1:8080", "10.0.0.2:8080"),
        green=env_state("v2", "10.0.1.1:8080"),
        deployment_seq=2,
    )
    current = {
        BLUE: record("shop", 1, BLUE, "v1", DeploymentStatus.ACTIVE, activated_at=T0, updated_at=T0),
        GREEN: record("shop", 2, GREEN, "v2", DeploymentStatus.READY, updated_at=T0),
    }
    return service, current


def advance(current: Mapping[Environment, Deployment | None], change: Change) -> dict[Environment, Deployment | None]:
    """What Repository.current_deployments would return after ``change`` was committed: the
    latest non-decommissioned record per environment."""
    out = dict(current)
    for r in change.deployments:
        old = out.get(r.environment)
        if r.status is DeploymentStatus.DECOMMISSIONED:
            if old is not None and old.id == r.id:
                out[r.environment] = None
        elif old is None or int(r.id.rsplit("-", 1)[1]) >= int(old.id.rsplit("-", 1)[1]):
            out[r.environment] = r
    return out


# =============================================================================================
# Endpoint.parse


@pytest.mark.parametrize(
    "text, host, port, canonical",
    [
        ("10.0.0.5:8080", "10.0.0.5", 8080, "10.0.0.5:8080"),
        ("127.0.0.1:1", "127.0.0.1", 1, "127.0.0.1:1"),
        ("192.168.1.1:65535", "192.168.1.1", 65535, "192.168.1.1:65535"),
        ("[::1]:8080", "::1", 8080, "[::1]:8080"),
        # IPv6 is normalized: lower case, zeros compressed.
        ("[2001:DB8:0:0:0:0:0:1]:443", "2001:db8::1", 443, "[2001:db8::1]:443"),
        ("[fe80:0000::0001]:9000", "fe80::1", 9000, "[fe80::1]:9000"),
        ("10.0.0.5:080", "10.0.0.5", 80, "10.0.0.5:80"),
    ],
)
def test_endpoint_parse_accepts_ip_literals(text: str, host: str, port: int, canonical: str) -> None:
    endpoint = Endpoint.parse(text)
    assert (endpoint.host, endpoint.port) == (host, port)
    assert str(endpoint) == canonical
    assert Endpoint.parse(str(endpoint)) == endpoint
    assert str(Endpoint.parse(str(endpoint))) == canonical


@pytest.mark.parametrize("text", ["localhost:8080", "example.com:80", "db.internal:5432", "[localhost]:80"])
def test_endpoint_parse_refuses_hostnames_mentioning_dns(text: str) -> None:
    with pytest.raises(ValidationError, match="DNS"):
        Endpoint.parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.5:0",
        "10.0.0.5:65536",
        "10.0.0.5:99999",
        "10.0.0.5:http",
        "10.0.0.5:-1",
        "10.0.0.5:+80",
        "10.0.0.5: 80",
        "10.0.0.5:80 ",
        "10.0.0.5:8o",
        "[::1]:0",
        "[::1]:65536",
        "[::1]:x",
    ],
)
def test_endpoint_parse_refuses_bad_ports(text: str) -> None:
    with pytest.raises(ValidationError, match="port"):
        Endpoint.parse(text)


@pytest.mark.parametrize("text", ["::1:8080", "2001:db8::1:443", "fe80::1:80"])
def test_endpoint_parse_refuses_unbracketed_ipv6(text: str) -> None:
    with pytest.raises(ValidationError, match=r"\[ADDR\]:PORT"):
        Endpoint.parse(text)


@pytest.mark.parametrize("text", ["", "10.0.0.5", "10.0.0.5:", ":8080", "[::1]", "[::1]:", "[]:80", None, 8080, b"1.2.3.4:80"])
def test_endpoint_parse_refuses_malformed(text: object) -> None:
    with pytest.raises(ValidationError):
        Endpoint.parse(text)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("10.0.0.5:\u00b2"),
        pytest.param("[::1]:\u00b9\u00b2"),
    ],
)
def test_endpoint_parse_unicode_digit_ports_raise_validation_error(text: str) -> None:
    with pytest.raises(ValidationError):
        Endpoint.parse(text)


@settings(max_examples=200, deadline=None)
@given(address=st.ip_addresses(), port=st.integers(1, 65535))
def test_endpoint_str_round_trips(address: Any, port: int) -> None:
    text = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
    endpoint = Endpoint.parse(text)
    assert endpoint.port == port
    assert Endpoint.parse(str(endpoint)) == endpoint
    assert str(Endpoint.parse(str(endpoint))) == str(endpoint)


# =============================================================================================
# Single-value validators


@pytest.mark.parametrize(
    "value, ok",
    [
        ("*", True),
        ("example.com", True),
        ("shop.example.com", True),
        ("EXAMPLE.Com", True),
        ("localhost", True),
        ("10.0.0.1", True),
        ("example.com:8080", True),
        ("example.com:1", True),
        ("example.com:65535", True),
        ("*.example.com", True),
        ("*.example.com:443", True),
        ("*-bar.example.com", True),
        ("shop.*", True),
        ("a-b.c-d.e", True),
        ("", False),
        (None, False),
        (42, False),
        (["example.com"], False),
        ("*.", False),
        ("**", False),
        ("*.*", False),
        ("*-", False),
        ("a*b.com", False),
        ("shop.*.com", False),
        ("example..com", False),
        ("-example.com", False),
        ("example-.com", False),
        (".example.com", False),
        ("exa mple.com", False),
        ("ex_ample.com", False),
        ("example.com/", False),
        ("example.com:0", False),
        ("example.com:65536", False),
        ("example.com:http", False),
        ("example.com:-1", False),
        ("x" * 254, False),
        pytest.param("example.com\n", False),
        pytest.param("example.com:", False),
        pytest.param("example.com:\u00b2", False),
    ],
)
def test_validate_domain(value: object, ok: bool) -> None:
    if ok:
        assert validate_domain(value) == value
    else:
        with pytest.raises(ValidationError, match="domain"):
            validate_domain(value)


@pytest.mark.parametrize(
    "value, ok",
    [
        ("/", True),
        ("/api", True),
        ("/api/v1/", True),
        ("/a-b_c.d~e", True),
        ("/%20", True),
        ("/a:b@c;d=e,f+g", True),
        ("/" + "a" * 1023, True),
        ("", False),
        ("api", False),
        ("api/", False),
        (None, False),
        (1, False),
        ("/a b", False),
        ("/a?b", False),
        ("/a#b", False),
        ("/ä", False),
        ("/a\\b", False),
        ("/" + "a" * 1024, False),
        pytest.param("/api\n", False),
    ],
)
def test_validate_prefix(value: object, ok: bool) -> None:
    if ok:
        assert validate_prefix(value) == value
    else:
        with pytest.raises(ValidationError, match="prefix"):
            validate_prefix(value)


@pytest.mark.parametrize(
    "value, ok",
    [
        ("a", True),
        ("0", True),
        ("shop", True),
        ("shop-2", True),
        ("0abc", True),
        ("a-b-c", True),
        ("a" * 48, True),
        ("", False),
        (None, False),
        (7, False),
        ("Shop", False),
        ("-shop", False),
        ("shop-", False),
        ("shop_1", False),
        ("shop.x", False),
        ("shop x", False),
        ("shop/x", False),
        ("a" * 49, False),
        pytest.param("shop\n", False),
    ],
)
def test_validate_service_name(value: object, ok: bool) -> None:
    if ok:
        assert validate_service_name(value) == value
    else:
        with pytest.raises(ValidationError, match="service name"):
            validate_service_name(value)


@pytest.mark.parametrize(
    "value, ok",
    [
        ("v1", True),
        ("1", True),
        ("1.2.3", True),
        ("1.0.0+build.5", True),
        ("v1_rc-2", True),
        ("V1", True),
        ("a" * 128, True),
        ("", False),
        (None, False),
        (1, False),
        ("-v1", False),
        (".v1", False),
        ("_v1", False),
        ("v 1", False),
        ("v1/2", False),
        ("v1:2", False),
        ("a" * 129, False),
        pytest.param("v1\n", False),
    ],
)
def test_validate_version(value: object, ok: bool) -> None:
    if ok:
        assert validate_version(value) == value
    else:
        with pytest.raises(ValidationError, match="version"):
            validate_version(value)


# =============================================================================================
# parse_weights


@pytest.mark.parametrize("blue, green", [(100, 0), (0, 100), (90, 10), (50, 50), (1, 99)])
def test_parse_weights_accepts_ints_summing_to_100(blue: int, green: int) -> None:
    assert parse_weights({"weights": {"blue": blue, "green": green}}) == {BLUE: blue, GREEN: green}


@pytest.mark.parametrize(
    "body, message",
    [
        ({"weights": {"blue": 90, "green": 9}}, "sum to 100"),
        ({"weights": {"blue": 100, "green": 1}}, "sum to 100"),
        ({"weights": {"blue": 0, "green": 0}}, "sum to 100"),
        ({"weights": {"blue": 90.0, "green": 10}}, "integer"),
        ({"weights": {"blue": 90, "green": 10.0}}, "integer"),
        ({"weights": {"blue": "90", "green": 10}}, "integer"),
        ({"weights": {"blue": None, "green": 100}}, "integer"),
        # bool is an int subclass; True + 99 == 100 must still be refused
        ({"weights": {"blue": True, "green": 99}}, "integer"),
        ({"weights": {"blue": False, "green": 100}}, "integer"),
        ({"weights": {"blue": -10, "green": 110}}, "between 0 and 100"),
        ({"weights": {"blue": 100}}, "missing green"),
        ({"weights": {"green": 100}}, "missing blue"),
        ({"weights": {}}, "missing"),
        ({"weights": {"blue": 90, "green": 10, "red": 0}}, "unknown environment"),
        ({"weights": {"Blue": 90, "green": 10}}, "unknown environment"),
        ({"weights": [90, 10]}, "weights"),
        ({"weights": None}, "weights"),
        ({}, "weights"),
        ({"weights": {"blue": 90, "green": 10}, "extra": 1}, "unknown field"),
        ([90, 10], "JSON object"),
        (None, "JSON object"),
    ],
)
def test_parse_weights_refuses(body: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        parse_weights(body)


def test_parse_environment_spec_sorts_and_validates() -> None:
    state = parse_environment_spec({"version": "v2", "endpoints": ["10.0.0.2:80", "[::1]:80", "10.0.0.1:80"]})
    assert state.version == "v2"
    assert state.endpoints == tuple(sorted(state.endpoints))
    assert {str(e) for e in state.endpoints} == {"10.0.0.1:80", "10.0.0.2:80", "[::1]:80"}
    with pytest.raises(ValidationError, match="repeat"):
        parse_environment_spec({"version": "v2", "endpoints": ["10.0.0.1:80", "10.0.0.1:080"]})
    with pytest.raises(ValidationError, match="DNS"):
        parse_environment_spec({"version": "v2", "endpoints": ["localhost:80"]})
    with pytest.raises(ValidationError, match="required"):
        parse_environment_spec({"version": "v2"})
    with pytest.raises(ValidationError, match="unknown field"):
        parse_environment_spec({"version": "v2", "endpoints": [], "weight": 1})


def test_apply_service_spec() -> None:
    service = apply_service_spec(None, "shop", {"domains": ["shop.example.com"], "prefix": "/api", "drain_seconds": 5})
    assert (service.name, service.domains, service.prefix, service.drain_seconds) == ("shop", ("shop.example.com",), "/api", 5)
    assert service.standby_seconds == Service(name="shop").standby_seconds
    updated = apply_service_spec(service, "shop", {"standby_seconds": 10})
    assert (updated.drain_seconds, updated.standby_seconds, updated.prefix) == (5, 10, "/api")
    for body, message in [
        ({"domains": ["a.com", "A.com"]}, "repeat"),
        ({"domains": []}, "non-empty"),
        ({"drain_seconds": True}, "integer"),
        ({"drain_seconds": -1}, "between"),
        ({"standby_seconds": 30 * 86_400 + 1}, "between"),
        ({"weights": {}}, "unknown field"),
    ]:
        with pytest.raises(ValidationError, match=message):
            apply_service_spec(service, "shop", body)


# =============================================================================================
# Traffic semantics


def test_new_service_defaults() -> None:
    service = apply_service_spec(None, "shop", {})
    assert service == Service(name="shop")
    t = service.traffic
    assert (t.active, t.idle, t.previous) == (BLUE, GREEN, None)
    assert (t.blue, t.green) == (100, 0)
    assert t.weights == {"blue": 100, "green": 0}
    assert not service.blue.registered and not service.green.registered
    assert service.deployment_seq == 0


def test_split_keeps_active_and_marks_idle_shifting() -> None:
    service, current = blue_live_green_ready()
    change = set_weights(service, {BLUE: 90, GREEN: 10}, current, T1)
    t = change.service.traffic
    assert (t.active, t.previous, t.blue, t.green) == (BLUE, None, 90, 10)
    # Only green's record changes; blue's is ACTIVE already.
    assert len(change.deployments) == 1
    (green,) = change.deployments
    assert (green.id, green.status, green.updated_at, green.activated_at) == ("shop-2", DeploymentStatus.SHIFTING, T1, None)


def test_full_switch_makes_green_active_and_blue_standby() -> None:
    service, current = blue_live_green_ready()
    change = set_weights(service, {BLUE: 0, GREEN: 100}, current, T1)
    t = change.service.traffic
    assert (t.active, t.previous, t.blue, t.green) == (GREEN, BLUE, 0, 100)
    records = by_env(change)
    (green,) = records[GREEN]
    (blue,) = records[BLUE]
    assert (green.status, green.activated_at, green.updated_at) == (DeploymentStatus.ACTIVE, T1, T1)
    assert (blue.status, blue.updated_at, blue.activated_at) == (DeploymentStatus.STANDBY, T1, T0)


def test_split_then_switch_activates_green_at_switch_time() -> None:
    service, current = blue_live_green_ready()
    split = set_weights(service, {BLUE: 90, GREEN: 10}, current, T1)
    current = advance(current, split)
    full = set_weights(split.service, {BLUE: 0, GREEN: 100}, current, T2)
    t = full.service.traffic
    assert (t.active, t.previous) == (GREEN, BLUE)
    records = by_env(full)
    assert records[GREEN][0].status is DeploymentStatus.ACTIVE
    assert records[GREEN][0].activated_at == T2
    assert records[BLUE][0].status is DeploymentStatus.STANDBY


def test_abandoned_split_returns_idle_to_ready() -> None:
    service, current = blue_live_green_ready()
    split = set_weights(service, {BLUE: 50, GREEN: 50}, current, T1)
    back = set_weights(split.service, {BLUE: 100, GREEN: 0}, advance(current, split), T2)
    assert back.service.traffic == Traffic(active=BLUE, previous=None, blue=100, green=0)
    (green,) = back.deployments
    assert green.status is DeploymentStatus.READY


def test_rollback_target_after_split_is_the_stable_environment() -> None:
    service, current = blue_live_green_ready()
    shift = set_weights(service, {BLUE: 90, GREEN: 10}, current, T1)
    split = shift.service
    assert rollback_target(split) is BLUE
    change = set_weights(split, full_weights(BLUE), advance(current, shift), T2, rollback=True)
    assert change.service.traffic == Traffic(active=BLUE, previous=None, blue=100, green=0)
    (green,) = change.deployments
    assert green.status is DeploymentStatus.ROLLED_BACK


def test_rollback_target_after_full_switch_is_previous() -> None:
    service, current = blue_live_green_ready()
    switch = set_weights(service, full_weights(GREEN), current, T1)
    assert rollback_target(switch.service) is BLUE
    current = advance(current, switch)
    rollback = set_weights(switch.service, full_weights(BLUE), current, T2, rollback=True)
    assert rollback.service.traffic == Traffic(active=BLUE, previous=GREEN, blue=100, green=0)
    records = by_env(rollback)
    assert records[BLUE][0].status is DeploymentStatus.ACTIVE
    assert records[BLUE][0].activated_at == T0  # it had been active before; keeps its first activation
    assert records[GREEN][0].status is DeploymentStatus.ROLLED_BACK


def test_rollback_of_a_fresh_service_is_a_conflict() -> None:
    with pytest.raises(ConflictError, match="nothing to roll back"):
        rollback_target(Service(name="shop"))
    service, _ = blue_live_green_ready()
    with pytest.raises(ConflictError, match="nothing to roll back"):
        rollback_target(service)


def test_rollback_to_an_unregistered_previous_is_a_conflict() -> None:
    # Green registered first and switched to; blue never had endpoints.
    service = Service(name="shop", green=env_state("v1", "10.0.0.1:80"))
    switched = set_weights(service, full_weights(GREEN), NO_RECORDS, T1).service
    assert switched.traffic.previous is BLUE
    with pytest.raises(ConflictError, match="no endpoints"):
        rollback_target(switched)


def test_switch_target() -> None:
    service, current = blue_live_green_ready()
    assert switch_target(service, None) is GREEN
    assert switch_target(service, GREEN) is GREEN
    with pytest.raises(ConflictError, match="already takes 100%"):
        switch_target(service, BLUE)
    split = set_weights(service, {BLUE: 90, GREEN: 10}, current, T1).service
    assert switch_target(split, None) is GREEN
    assert switch_target(split, BLUE) is BLUE  # 90 % is not 100 %: finishing "back" is a switch too
    switched = set_weights(service, full_weights(GREEN), current, T1).service
    assert switch_target(switched, None) is BLUE
    with pytest.raises(ConflictError, match="already takes 100%"):
        switch_target(switched, GREEN)


@pytest.mark.parametrize("weights", [{BLUE: 90, GREEN: 10}, {BLUE: 0, GREEN: 100}])
def test_traffic_to_an_environment_without_endpoints_is_a_conflict(weights: dict[Environment, int]) -> None:
    service = Service(name="shop", blue=env_state("v1", "10.0.0.1:80"))
    with pytest.raises(ConflictError, match="no endpoints"):
        set_weights(service, weights, NO_RECORDS, T1)


def test_first_registration_into_blue_of_a_new_service_is_allowed() -> None:
    service = Service(name="shop")
    change = set_environment(service, BLUE, env_state("v1", "10.0.0.1:80"), NO_RECORDS, T1)
    assert change.service.blue == env_state("v1", "10.0.0.1:80")
    assert change.service.traffic == service.traffic  # registering never moves traffic
    assert change.service.deployment_seq == 1
    (created,) = change.deployments
    assert (created.id, created.service, created.version, created.environment) == ("shop-1", "shop", "v1", BLUE)
    assert (created.deployed_at, created.updated_at) == (T1, T1)


def test_first_registration_into_blue_of_a_new_service_is_active() -> None:
    change = set_environment(Service(name="shop"), BLUE, env_state("v1", "10.0.0.1:80"), NO_RECORDS, T1)
    (created,) = change.deployments
    assert created.status is DeploymentStatus.ACTIVE
    assert created.activated_at == T1


def test_lifecycle_from_a_fresh_service() -> None:
    service, current = Service(name="shop"), dict(NO_RECORDS)
    c1 = set_environment(service, BLUE, env_state("v1", "10.0.0.1:80"), current, T0)
    current = advance(current, c1)
    c2 = set_environment(c1.service, GREEN, env_state("v2", "10.0.1.1:80"), current, T1)
    current = advance(current, c2)
    c3 = set_weights(c2.service, full_weights(GREEN), current, T2)
    current = advance(current, c3)
    assert current[GREEN] is not None and current[GREEN].status is DeploymentStatus.ACTIVE
    assert current[BLUE] is not None and current[BLUE].status is DeploymentStatus.STANDBY


def test_new_version_into_a_live_environment_is_refused() -> None:
    service, current = blue_live_green_ready()
    with pytest.raises(ConflictError, match="idle environment green"):
        set_environment(service, BLUE, env_state("v3", "10.0.0.1:8080"), current, T1)
    # Also while it takes only part of the traffic.
    split = set_weights(service, {BLUE: 90, GREEN: 10}, current, T1)
    with pytest.raises(ConflictError, match="takes 10% of traffic"):
        set_environment(split.service, GREEN, env_state("v3", "10.0.1.1:8080"), advance(current, split), T2)


def test_endpoints_only_change_of_a_live_environment_creates_no_record() -> None:
    service, current = blue_live_green_ready()
    scaled = env_state("v1", "10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080")
    change = set_environment(service, BLUE, scaled, current, T1)
    assert change.deployments == ()
    assert change.service.blue == scaled
    assert change.service.deployment_seq == service.deployment_seq
    assert change.service.green == service.green and change.service.traffic == service.traffic


def test_zero_endpoints_for_a_live_environment_is_refused() -> None:
    service, current = blue_live_green_ready()
    with pytest.raises(ConflictError, match="zero endpoints"):
        set_environment(service, BLUE, EnvironmentState("v1", ()), current, T1)


def test_new_version_into_the_idle_environment_replaces_its_record() -> None:
    service, current = blue_live_green_ready()
    change = set_environment(service, GREEN, env_state("v3", "10.0.1.5:8080"), current, T1)
    assert change.service.deployment_seq == 3
    assert change.service.green == env_state("v3", "10.0.1.5:8080")
    assert [r.id for r in change.deployments] == ["shop-2", "shop-3"]
    old, new = change.deployments
    assert old == dataclasses.replace(current[GREEN], status=DeploymentStatus.DECOMMISSIONED, updated_at=T1)
    assert new == Deployment(
        id="shop-3", service="shop", version="v3", environment=GREEN, status=DeploymentStatus.READY,
        deployed_at=T1, activated_at=None, updated_at=T1,
    )


def test_new_version_into_the_former_active_decommissions_the_standby() -> None:
    service, current = blue_live_green_ready()
    switch = set_weights(service, full_weights(GREEN), current, T1)
    current = advance(current, switch)
    assert current[BLUE] is not None and current[BLUE].status is DeploymentStatus.STANDBY
    change = set_environment(switch.service, BLUE, env_state("v3", "10.0.0.9:8080"), current, T2)
    assert [(r.id, r.status) for r in change.deployments] == [
        ("shop-1", DeploymentStatus.DECOMMISSIONED),
        ("shop-3", DeploymentStatus.READY),
    ]


def test_new_version_after_rollback_keeps_the_final_record() -> None:
    service, current = blue_live_green_ready()
    split = set_weights(service, {BLUE: 90, GREEN: 10}, current, T1)
    current = advance(current, split)
    rb = set_weights(split.service, full_weights(BLUE), current, T2, rollback=True)
    current = advance(current, rb)
    assert current[GREEN] is not None and current[GREEN].status is DeploymentStatus.ROLLED_BACK
    change = set_environment(rb.service, GREEN, env_state("v3", "10.0.1.1:8080"), current, T3)
    # A rolled-back record is final: it is not rewritten, only superseded.
    assert [(r.id, r.status) for r in change.deployments] == [("shop-3", DeploymentStatus.READY)]


# =============================================================================================
# Purity


def _transitions() -> list[tuple[str, Any, tuple[Any, ...], dict[str, Any], bool]]:
    service, current = blue_live_green_ready()
    split = set_weights(service, {BLUE: 90, GREEN: 10}, current, T1).service
    fresh = Service(name="shop")
    return [
        ("set_environment ok", set_environment, (service, GREEN, env_state("v3", "10.0.1.2:80"), current, T1), {}, True),
        ("set_environment scale", set_environment, (service, BLUE, env_state("v1", "10.0.0.7:80"), current, T1), {}, True),
        ("set_environment live", set_environment, (service, BLUE, env_state("v9", "10.0.0.7:80"), current, T1), {}, False),
        ("set_environment empty", set_environment, (service, BLUE, EnvironmentState("v1"), current, T1), {}, False),
        ("set_weights ok", set_weights, (service, {BLUE: 0, GREEN: 100}, current, T1), {}, True),
        ("set_weights rollback", set_weights, (split, {BLUE: 100, GREEN: 0}, current, T1), {"rollback": True}, True),
        ("set_weights no endpoints", set_weights, (fresh, {BLUE: 0, GREEN: 100}, NO_RECORDS, T1), {}, False),
        ("switch_target ok", switch_target, (service, None), {}, True),
        ("switch_target 100", switch_target, (service, BLUE), {}, False),
        ("rollback_target ok", rollback_target, (split,), {}, True),
        ("rollback_target none", rollback_target, (fresh,), {}, False),
        ("apply_service_spec ok", apply_service_spec, (service, "shop", {"drain_seconds": 1}), {}, True),
        ("apply_service_spec bad", apply_service_spec, (service, "shop", {"drain_seconds": -1}), {}, False),
    ]


@pytest.mark.parametrize("name, fn, args, kwargs, ok", _transitions(), ids=[t[0] for t in _transitions()])
def test_transitions_are_pure(name: str, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], ok: bool) -> None:
    before = copy.deepcopy((args, kwargs))
    result: Any = "no result"
    if ok:
        result = fn(*args, **kwargs)
        result_again = fn(*copy.deepcopy(args), **copy.deepcopy(kwargs))
        assert result == result_again  # deterministic
    else:
        with pytest.raises(BlueGreenError):
            result = fn(*args, **kwargs)
        assert result == "no result"  # nothing was returned
    assert (args, kwargs) == before  # inputs, including the `current` dict, are unchanged


@pytest.mark.parametrize(
    "value, attr",
    [
        (Service(name="shop"), "name"),
        (Traffic(), "blue"),
        (EnvironmentState(), "endpoints"),
        (Endpoint("10.0.0.1", 80), "port"),
        (Change(Service(name="shop")), "deployments"),
        (record("shop", 1, BLUE, "v1", DeploymentStatus.READY), "status"),
        (DEFAULT_FLEET, "services"),
    ],
)
def test_model_values_are_frozen(value: object, attr: str) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, attr, None)


def test_change_records_are_tuples() -> None:
    service, current = blue_live_green_ready()
    change = set_weights(service, full_weights(GREEN), current, T1)
    assert isinstance(change.deployments, tuple)
    hash(change.service)  # services are hashable values (used as cache keys)


# =============================================================================================
# Serialization

names = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")
domains = st.sampled_from(["*", "example.com", "Shop.Example.com", "*.example.com", "shop.*", "api.example.com:8443", "localhost"])
endpoints = st.builds(
    lambda ip, port: Endpoint.parse(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"),
    st.ip_addresses(),
    st.integers(1, 65535),
)
versions = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._+\-]{0,20}\Z")
env_states = st.one_of(
    st.just(EnvironmentState()),
    st.builds(
        lambda v, e: EnvironmentState(v, tuple(sorted(set(e)))),
        versions,
        st.lists(endpoints, max_size=5),
    ),
)


@st.composite
def traffics(draw: st.DrawFn) -> Traffic:
    blue = draw(st.integers(0, 100))
    return Traffic(
        active=draw(st.sampled_from(list(Environment))),
        previous=draw(st.one_of(st.none(), st.sampled_from(list(Environment)))),
        blue=blue,
        green=100 - blue,
    )


services = st.builds(
    Service,
    name=names,
    domains=st.lists(domains, min_size=1, max_size=4, unique_by=str.lower).map(tuple),
    prefix=st.sampled_from(["/", "/api", "/api/v1/", "/a-b_c"]),
    drain_seconds=st.integers(0, 86_400),
    standby_seconds=st.integers(0, 30 * 86_400),
    blue=env_states,
    green=env_states,
    traffic=traffics(),
    deployment_seq=st.integers(0, 10**9),
)

finite = st.floats(allow_nan=False, allow_infinity=False)
deployments = st.builds(
    Deployment,
    id=st.builds(lambda n, s: f"{n}-{s}", names, st.integers(1, 10**9)),
    service=names,
    version=versions,
    environment=st.sampled_from(list(Environment)),
    status=st.sampled_from(list(DeploymentStatus)),
    deployed_at=finite,
    activated_at=st.one_of(st.none(), finite),
    updated_at=st.one_of(st.none(), finite),
)


@settings(max_examples=150, deadline=None)
@given(service=services)
def test_service_dict_round_trip(service: Service) -> None:
    data = service_to_dict(service)
    assert service_from_dict(data) == service
    # Through JSON, as the store keeps it, with deterministic bytes.
    text = json.dumps(data, sort_keys=True)
    again = service_from_dict(json.loads(text))
    assert again == service
    assert json.dumps(service_to_dict(again), sort_keys=True) == text


@settings(max_examples=150, deadline=None)
@given(deployment=deployments)
def test_deployment_dict_round_trip(deployment: Deployment) -> None:
    data = deployment_to_dict(deployment)
    assert deployment_from_dict(data) == deployment
    assert deployment_from_dict(json.loads(json.dumps(data))) == deployment
    assert deployment_to_dict(deployment_from_dict(data)) == data


def test_service_dict_shape() -> None:
    service, _ = blue_live_green_ready()
    data = service_to_dict(service)
    assert data["traffic"] == {"active": "blue", "previous": None, "weights": {"blue": 100, "green": 0}}
    assert data["environments"]["blue"] == {"version": "v1", "endpoints": ["10.0.0.1:8080", "10.0.0.2:8080"]}
    legacy = dict(data)
    del legacy["deployment_seq"]
    assert service_from_dict(legacy).deployment_seq == 0


# =============================================================================================
# route_conflict


def _fleet(name: str, services: tuple[str, ...] | None) -> Fleet:
    return Fleet(name=name, listeners=(ListenerSpec(name=f"{name}-http", address="127.0.0.1", port=10000),), services=services)


def _svc(name: str, domains: tuple[str, ...], prefix: str = "/") -> Service:
    return Service(name=name, domains=domains, prefix=prefix)


def test_route_conflict_same_domain_and_prefix_on_a_shared_fleet() -> None:
    shop = _svc("shop", ("shop.example.com", "www.example.com"))
    cart = _svc("cart", ("www.example.com",))
    message = route_conflict((DEFAULT_FLEET,), [shop], cart)
    assert message is not None
    assert "shop" in message and "www.example.com" in message and "default" in message


def test_route_conflict_is_case_insensitive_on_domains() -> None:
    shop = _svc("shop", ("Shop.Example.COM",))
    cart = _svc("cart", ("shop.example.com",))
    assert route_conflict((DEFAULT_FLEET,), [shop], cart) is not None
    assert route_conflict((DEFAULT_FLEET,), [cart], _svc("cart2", ("SHOP.example.com",))) is not None


def test_route_conflict_different_prefix_is_free() -> None:
    shop = _svc("shop", ("example.com",), "/")
    cart = _svc("cart", ("example.com",), "/cart")
    assert route_conflict((DEFAULT_FLEET,), [shop], cart) is None
    # Prefixes are case-sensitive paths.
    assert route_conflict((DEFAULT_FLEET,), [cart], _svc("other", ("example.com",), "/Cart")) is None


def test_route_conflict_disjoint_fleets_are_free() -> None:
    fleets = (_fleet("edge-a", ("shop",)), _fleet("edge-b", ("cart",)))
    shop = _svc("shop", ("example.com",))
    cart = _svc("cart", ("example.com",))
    assert route_conflict(fleets, [shop], cart) is None
    # A fleet that serves every service shares with everyone.
    message = route_conflict(fleets + (_fleet("all", None),), [shop], cart)
    assert message is not None and "all" in message
    # So does one that lists both.
    assert route_conflict((_fleet("both", ("shop", "cart")),), [shop], cart) is not None


def test_route_conflict_ignores_the_service_itself() -> None:
    shop = _svc("shop", ("example.com",))
    assert route_conflict((DEFAULT_FLEET,), [shop], dataclasses.replace(shop, drain_seconds=1)) is None
    assert route_conflict((DEFAULT_FLEET,), [], shop) is None


def test_trailing_wildcard_domain_with_a_port_is_refused() -> None:
    """Envoy only treats a final '*' as a wildcard; 'shop.*:8080' would never match a Host."""
    from controlplane.model import validate_domain

    with pytest.raises(ValidationError, match="trailing wildcard cannot have a port"):
        validate_domain("shop.*:8080")
    assert validate_domain("*.shop.com:8080") == "*.shop.com:8080"
