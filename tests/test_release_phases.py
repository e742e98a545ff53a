"""Pure unit tests of the release features in the workflow's transitions: session affinity
during the steps, the mirror and targeting phases before them (``service.release`` and the
deployment's ``phase``), and their spec fields. Helpers as in test_rollout.py."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from controlplane import model, resources
from controlplane.deploy import transitions as rollout
from controlplane.deploy.spec import parse_deployment_spec, spec_to_dict
from controlplane.errors import ConflictError, ValidationError
from controlplane.model import Affinity, DeploymentStatus as S, Environment, Release, service_from_dict, service_to_dict
from tests.test_rollout import GREEN_ENDPOINT, T0, apply, blue_record, blue_service, spec

BLUE, GREEN = Environment.BLUE, Environment.GREEN
ANALYSIS = {"interval_seconds": 5, "failure_limit": 2}
TARGET = {"headers": {"X-User-Group": "beta"}, "seconds": 120}


def ready(**extra: Any) -> tuple[model.Service, Any, str]:
    service, current = blue_service(), {BLUE: blue_record(), GREEN: None}
    service, current = apply(service, current, rollout.start(service, current, spec(**extra), T0))
    did = current[GREEN].id
    service, current = apply(service, current, rollout.smoke_passed(service, current, did, T0 + 1, "ok"))
    return service, current, did


def proceed(service: model.Service, current: Any, did: str, now: float = T0 + 2) -> tuple[model.Service, Any]:
    return apply(service, current, rollout.proceed(service, current, did, now))


# ---------------------------------------------------------------------------------------------
# Affinity


def test_affinity_release_follows_the_steps_and_ends_at_100() -> None:
    service, current, did = ready(affinity={"cookie": "env", "ttl_seconds": 60})
    service, current = proceed(service, current, did)
    assert service.release == Release(did, GREEN, affinity=Affinity("env", 60), earlier=())
    service, current = apply(service, current, rollout.promote(service, current, did, T0 + 3))
    assert service.traffic.green == 50 and service.release is not None and service.release.earlier == (10,)
    routes = [r.name for r in resources.production_routes(service)]
    assert routes == ["shop-preview", *["shop-pinned-green"] * 2, *["shop-pinned-blue"] * 2, *["shop-redraw-10"] * 2, "shop"]
    service, current = apply(service, current, rollout.promote(service, current, did, T0 + 4))
    assert service.traffic.green == 100 and service.release is None


def test_affinity_comes_from_the_service_unless_the_deployment_sets_one() -> None:
    service, current = blue_service(affinity=Affinity("svc", 10)), {BLUE: blue_record(), GREEN: None}
    service, current = apply(service, current, rollout.start(service, current, spec(), T0))
    did = current[GREEN].id
    service, current = apply(service, current, rollout.smoke_passed(service, current, did, T0 + 1, "ok"))
    service, current = proceed(service, current, did)
    assert service.release is not None and service.release.affinity == Affinity("svc", 10)


def test_rollback_ends_every_pin() -> None:
    service, current, did = ready(affinity={})
    service, current = proceed(service, current, did)
    assert service.release is not None
    service, current = apply(service, current, rollout.rollback(service, current, did, T0 + 3, rollout.API, "bad"))
    assert service.release is None and service.traffic.blue == 100
    assert [r.name for r in resources.production_routes(service)] == ["shop-preview", "shop"]


def test_traffic_set_by_hand_ends_the_release() -> None:
    service = replace(blue_service(), release=Release("shop-2", GREEN, affinity=Affinity()))
    change = model.set_weights(service, {BLUE: 100, GREEN: 0}, {BLUE: blue_record(), GREEN: None}, T0)
    assert change.service.release is None


def test_release_survives_the_store() -> None:
    release = Release("shop-2", GREEN, affinity=Affinity("c", 5), earlier=(10, 50), mirror_percent=2.5,
                      target=model.parse_target_rule("t", {"headers": {"x-a": "1"}, "cookie": {"name": "k", "value": "v"}}))
    service = replace(blue_service(affinity=Affinity("d", 7)), release=release)
    assert service_from_dict(service_to_dict(service)) == service
    assert "release" not in service_to_dict(blue_service()) and "affinity" not in service_to_dict(blue_service())


# ---------------------------------------------------------------------------------------------
# Mirror


def test_mirror_phase_comes_first_and_sends_no_user_to_green() -> None:
    service, current, did = ready(mirror={"percent": 10, "seconds": 60}, analysis=ANALYSIS)
    service, current = proceed(service, current, did)
    d = current[GREEN]
    assert (d.status, d.phase, d.step, d.deadline) == (S.READY, "mirror", -1, T0 + 2 + 60)
    assert service.traffic.green == 0 and service.release == Release(did, GREEN, mirror_percent=10)
    [production] = [r for r in resources.production_routes(service) if r.name == "shop"]
    [policy] = production.route.request_mirror_policies
    assert policy.cluster == "shop-green" and policy.runtime_fraction.default_value.numerator == 100_000


def test_a_mirror_phase_that_fails_its_analysis_fails_the_deployment_without_traffic() -> None:
    service, current, did = ready(mirror={"percent": 10, "seconds": 60}, analysis=ANALYSIS)
    service, current = proceed(service, current, did)
    figures = {"requests": 100, "error_rate": 1.0}
    service, current = apply(service, current, rollout.analysis_result(service, current, did, T0 + 7, figures, "5xx", 2))
    assert current[GREEN].status is S.READY and current[GREEN].failures == 1
    service, current = apply(service, current, rollout.analysis_result(service, current, did, T0 + 12, figures, "5xx", 2))
    d = current[GREEN]
    assert d.status is S.FAILED and d.phase is None and "mirror phase failed" in d.history[-1].reason
    assert service.release is None and service.traffic.blue == 100 and current[BLUE].status is S.ACTIVE
    with pytest.raises(ConflictError):
        rollout.rollback(service, current, did, T0 + 13, rollout.API, "nothing to roll back")


def test_a_mirror_phase_judged_ok_at_its_deadline_goes_on_to_targeting_then_the_steps() -> None:
    service, current, did = ready(mirror={"percent": 10, "seconds": 5}, target=TARGET, analysis=ANALYSIS)
    service, current = proceed(service, current, did)
    with pytest.raises(ConflictError, match="not over yet"):
        rollout.phase_due(service, current, did, T0 + 3)
    service, current = apply(service, current, rollout.phase_due(service, current, did, T0 + 8))  # extended: unjudged
    assert current[GREEN].extended and current[GREEN].phase == "mirror"
    ok = {"requests": 100, "error_rate": 0.0}
    service, current = apply(service, current, rollout.analysis_result(service, current, did, T0 + 9, ok, None, 2))
    d = current[GREEN]
    assert (d.status, d.phase, d.step, d.intervals_judged) == (S.SHIFTING, "targeting", -1, 0)
    assert service.release is not None and service.release.target is not None and service.release.mirror_percent == 0
    assert service.traffic.green == 0


# ---------------------------------------------------------------------------------------------
# Targeting


def test_targeting_phase_routes_matching_requests_and_promote_ends_it() -> None:
    service, current, did = ready(target=TARGET)
    service, current = proceed(service, current, did)
    d = current[GREEN]
    assert (d.status, d.phase, d.step, d.deadline) == (S.SHIFTING, "targeting", -1, T0 + 2 + 120)
    [target] = [r for r in resources.production_routes(service) if r.name == "shop-target"]
    assert [(h.name, h.string_match.exact) for h in target.match.headers] == [("x-user-group", "beta")]
    assert target.route.cluster == "shop-green"
    with pytest.raises(ConflictError, match="not running a timed step"):
        rollout.step_due(service, current, did, T0 + 500)
    service, current = apply(service, current, rollout.promote(service, current, did, T0 + 3))
    d = current[GREEN]
    assert (d.status, d.phase, d.step) == (S.SHIFTING, None, 0) and service.traffic.green == 10 and service.release is None


def test_targeting_without_analysis_ends_at_its_deadline() -> None:
    service, current, did = ready(target=TARGET)
    service, current = proceed(service, current, did)
    service, current = apply(service, current, rollout.phase_due(service, current, did, T0 + 200))
    assert (current[GREEN].step, current[GREEN].phase, service.traffic.green) == (0, None, 10)


def test_targeting_rollback_goes_back_and_clears_the_rule() -> None:
    service, current, did = ready(target=TARGET)
    service, current = proceed(service, current, did)
    service, current = apply(service, current, rollout.rollback(service, current, did, T0 + 3, rollout.API, "no"))
    assert current[GREEN].status is S.ROLLED_BACK and service.release is None


def test_first_version_has_no_phases_to_run() -> None:
    service, current = replace(blue_service(), blue=model.EnvironmentState()), {BLUE: None, GREEN: None}
    service, current = apply(service, current, rollout.start(service, current, spec(target=TARGET), T0))
    did = current[GREEN].id
    service, current = apply(service, current, rollout.smoke_passed(service, current, did, T0 + 1, "ok"))
    service, current = proceed(service, current, did)
    assert current[GREEN].status is S.ACTIVE and current[GREEN].phase is None


# ---------------------------------------------------------------------------------------------
# Spec


@pytest.mark.parametrize("extra, problem", [
    ({"mirror": {"percent": 10}}, "mirror needs analysis"),
    ({"mirror": {"percent": 0}, "analysis": {}}, "mirror.percent must be above 0"),
    ({"mirror": {"percent": 101}, "analysis": {}}, "mirror.percent must be between 0 and 100"),
    ({"mirror": {"seconds": 0}, "analysis": {}}, "mirror.seconds must be between"),
    ({"mirror": {"pct": 1}, "analysis": {}}, "unknown field(s) in mirror: pct"),
    ({"target": {}}, "target needs headers or a cookie"),
    ({"target": {"headers": {"host": "x"}}}, "target.headers: 'host'"),
    ({"target": {"headers": {"x-a": ""}}}, "target.headers.x-a must be a non-empty"),
    ({"target": {"cookie": {"name": "b", "value": "a;b"}}}, "target.cookie.value must be a cookie value"),
    ({"target": {"headers": {"x-a": "1"}, "seconds": 0}}, "target.seconds must be between"),
    ({"affinity": {"cookie": "a=b"}}, "affinity.cookie must be a cookie name"),
    ({"affinity": {"ttl_seconds": 0}}, "affinity.ttl_seconds must be an integer"),
])
def test_bad_release_fields_are_refused_naming_the_field(extra: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_deployment_spec({"version": "v2", "endpoints": [GREEN_ENDPOINT], **extra})
    assert problem in str(info.value)


def test_release_fields_round_trip_with_defaults_filled_in() -> None:
    parsed = parse_deployment_spec({"version": "v2", "endpoints": [GREEN_ENDPOINT], "affinity": {}, "analysis": {},
                                    "mirror": {}, "target": {"cookie": {"name": "beta", "value": "yes"}}})
    stored = spec_to_dict(parsed)
    assert stored["affinity"] == {"cookie": "bluegreen-env", "ttl_seconds": 3600}
    assert stored["mirror"] == {"percent": 10.0, "seconds": 60.0}
    assert stored["target"] == {"headers": {}, "cookie": {"name": "beta", "value": "yes"}, "seconds": 300.0}
    assert parse_deployment_spec(stored) == parsed
