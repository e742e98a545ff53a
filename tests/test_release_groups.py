"""Release groups (docs/releases.md): the lockstep rules (pure), and the API in process: the
members move in one transaction, a member cannot be steered alone (409), bad input changes
nothing, and a restart resumes the release from its stored deadlines. The real-Envoy proof of
"no route table in which the members disagree" is tests/test_release_groups_envoy.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pytest

from controlplane import model
from controlplane.deploy import releases, transitions
from controlplane.deploy.spec import parse_analysis
from controlplane.errors import ConflictError, ValidationError
from controlplane.model import Change, DeploymentStatus as S, Environment, ReleaseGroupStatus as G
from tests.harness import wait_for
from tests.test_workflow import _call, in_process

pytestmark = pytest.mark.timeout(60)

LONG_STEP = 600


def release_body(steps: list[int] | None = None, step_seconds: float = LONG_STEP, **extra: Any) -> dict[str, Any]:
    return {
        "services": {"web": {"version": "v2", "endpoints": ["127.0.0.1:9102"]},
                     "api": {"version": "v2", "endpoints": ["127.0.0.1:9202"]}},
        "strategy": {"steps": steps or [10, 50, 100], "step_seconds": step_seconds, "bake_seconds": 0},
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# Pure lockstep rules


def _stored(changes: Mapping[str, Change], members: releases.Members) -> dict[str, tuple[model.Service, dict[Environment, Any]]]:
    """``members`` with ``changes`` applied, as the store would hold them."""
    out = {}
    for name, (service, current) in members.items():
        current = dict(current)
        change = changes.get(name)
        if change is not None:
            service = change.service
            for record in change.deployments:
                if record.status is not S.DECOMMISSIONED:
                    current[record.environment] = record
        out[name] = (service, current)
    return out


def _shifting_pair(analysis: Any = None) -> tuple[model.ReleaseGroup, dict[str, Any]]:
    members = {}
    for name in ("api", "web"):
        service = model.Service(name=name, deployment_seq=1,
                                blue=model.parse_environment_spec({"version": "v1", "endpoints": ["127.0.0.1:9001"]}))
        v1 = model.Deployment(id=f"{name}-1", service=name, version="v1", environment=Environment.BLUE, status=S.ACTIVE,
                              deployed_at=0.0, updated_at=0.0)
        members[name] = (service, {Environment.BLUE: v1, Environment.GREEN: None})
    body = release_body(**({"analysis": analysis} if analysis else {}))
    changes, group = releases.create(members, "release-1", releases.parse_release_request(body), 1.0, "api")
    members = _stored(changes, members)
    for name in ("api", "web"):
        d = releases.member_record(group, members[name][1], name)
        members = _stored({name: transitions.smoke_passed(members[name][0], members[name][1], d.id, 2.0, "ok")}, members)
    changes, group = releases.proceed_all(group, members, 3.0)
    return group, _stored(changes, members)


def test_every_step_moves_every_member_in_one_change() -> None:
    group, members = _shifting_pair()
    assert {n: s.traffic.weights for n, (s, _) in members.items()} == {"api": {"blue": 90, "green": 10}, "web": {"blue": 90, "green": 10}}
    changes, group = releases.command_all(group, members, "promote", 4.0)
    assert set(changes) == {"api", "web"}
    members = _stored(changes, members)
    assert {n: s.traffic.weights["green"] for n, (s, _) in members.items()} == {"api": 50, "web": 50}
    # Without analysis the step's deadline moves both, and only both.
    deadline = releases.member_record(group, members["web"][1], "web").deadline
    changes, group = releases.timers_due(group, members, None, deadline + 1)
    members = _stored(changes, members)
    assert {n: s.traffic.weights["green"] for n, (s, _) in members.items()} == {"api": 100, "web": 100}
    assert group.status is G.IN_PROGRESS and all(s.release_group == "release-1" for s, _ in members.values())
    changes, group = releases.timers_due(group, members, None, deadline + 1)  # the bake (0 s) ends for both
    members = _stored(changes, members)
    assert group.status is G.COMPLETE and all(s.release_group is None for s, _ in members.values())


def test_a_breach_in_one_member_rolls_back_every_member_in_one_change() -> None:
    analysis = {"interval_seconds": 1, "max_error_rate": 0.01, "min_requests": 1, "failure_limit": 1}
    group, members = _shifting_pair(analysis)
    verdicts = {"web": releases.Verdict("ok", {"requests": 100, "error_rate": 0.0}),
                "api": releases.Verdict("breach", {"requests": 100, "error_rate": 0.5}, "error rate 0.500 > max_error_rate 0.01")}
    changes, group = releases.judged_all(group, members, verdicts, parse_analysis(analysis), 5.0)
    assert group.status is G.ROLLED_BACK and "api breached" in (group.reason or "")
    members = _stored(changes, members)
    for name in ("api", "web"):
        service, current = members[name]
        assert service.traffic.weights == {"blue": 100, "green": 0} and service.release_group is None
        assert releases.member_record(group, current, name).status is S.ROLLED_BACK


def test_a_step_ends_only_when_every_member_may_end_it() -> None:
    analysis = {"interval_seconds": 1, "max_error_rate": 0.01, "min_requests": 10, "failure_limit": 3}
    group, members = _shifting_pair(analysis)
    late = releases.member_record(group, members["web"][1], "web").deadline + 1
    verdicts = {"web": releases.Verdict("ok", {"requests": 100, "error_rate": 0.0}),
                "api": releases.Verdict("wait", {"requests": 2}, "only 2 requests")}
    changes, group = releases.judged_all(group, members, verdicts, parse_analysis(analysis), late)
    members = _stored(changes, members)
    assert {n: s.traffic.weights["green"] for n, (s, _) in members.items()} == {"api": 10, "web": 10}
    verdicts["api"] = releases.Verdict("ok", {"requests": 100, "error_rate": 0.0})
    changes, group = releases.judged_all(group, members, verdicts, parse_analysis(analysis), late + 1)
    members = _stored(changes, members)
    assert {n: s.traffic.weights["green"] for n, (s, _) in members.items()} == {"api": 50, "web": 50}


def test_release_request_errors_name_the_problem() -> None:
    cases = [
        ({**release_body(), "services": {}}, "at least two services"),
        ({**release_body(), "services": {"web": {"version": "v2", "endpoints": ["127.0.0.1:1"]}}}, "at least two services"),
        ({**release_body(), "migrations": {"directory": "x", "database": "y"}}, "migrations is not supported in a release"),
        ({**release_body(), "colour": 1}, "unknown field(s) in release: colour"),
        ({**release_body(), "services": {"web": {"version": "v2", "endpoints": []}, "api": {"version": "v2", "endpoints": ["127.0.0.1:1"]}}},
         "services.web: endpoints must list at least one"),
        ({**release_body(), "services": {"Web!": {"version": "v2", "endpoints": ["127.0.0.1:1"]}, "api": {"version": "v2", "endpoints": ["127.0.0.1:1"]}}},
         "invalid service name 'Web!'"),
        ({**release_body(), "smoke": {"checks": [{"path": "/", "service": "shop"}]}}, r"smoke.checks[0].service: 'shop' is not a service"),
        ({**release_body(), "strategy": {"steps": [50, 10]}}, "strategy.steps"),
    ]
    for body, words in cases:
        with pytest.raises(ValidationError) as info:
            releases.parse_release_request(body)
        assert words in str(info.value), (words, str(info.value))


async def test_a_release_of_more_services_than_one_store_transaction_holds_is_refused(tmp_path: Path) -> None:
    """Every group change is one transaction; etcd refuses a transaction of more than 128
    operations ("too many operations in txn request", a 503 after the release was accepted by
    validation). The API refuses such a release up front, naming the limit, and stores nothing."""
    many = {f"s{i:02d}": {"version": "v2", "endpoints": ["127.0.0.1:9002"]} for i in range(releases.MAX_SERVICES + 1)}
    async with in_process(tmp_path) as (cp, client):
        for name in many:
            await _call(client, "PUT", f"/v1/services/{name}", {"domains": [f"{name}.example"]})
            await _call(client, "PUT", f"/v1/services/{name}/environments/blue", {"version": "v1", "endpoints": ["127.0.0.1:9001"]})
        body = await _call(client, "POST", "/v1/releases", {"services": many}, expect=400)
        assert f"at most {releases.MAX_SERVICES} services" in body["error"], body
        assert (await _call(client, "GET", "/v1/releases"))["releases"] == []


def test_smoke_checks_go_to_the_service_they_name() -> None:
    body = release_body(smoke={"checks": [{"path": "/web", "service": "web"}, {"path": "/api", "service": "api"}, {"path": "/both"}]})
    request = releases.parse_release_request(body)
    assert [c.path for c in request.members["web"].smoke.checks] == ["/web", "/both"]
    assert [c.path for c in request.members["api"].smoke.checks] == ["/api", "/both"]


# ---------------------------------------------------------------------------------------------
# The API, in process


async def _two_services(client: Any) -> None:
    for name, port in (("web", 9101), ("api", 9201)):
        await _call(client, "PUT", f"/v1/services/{name}", {"prefix": f"/{name}", "drain_seconds": 1, "standby_seconds": 300})
        await _call(client, "PUT", f"/v1/services/{name}/environments/blue", {"version": "v1", "endpoints": [f"127.0.0.1:{port}"]})


async def _release_at(client: Any, release_id: str, **expected: Any) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        view = await _call(client, "GET", f"/v1/releases/{release_id}")
        if view["status"] in ("failed", "rolled_back") and expected.get("status") != view["status"]:
            raise AssertionError(f"{release_id} ended {view['status']}: {view['reason']}")
        return view if all(view[k] == v for k, v in expected.items()) else None

    return await wait_for(check, timeout=30, message=f"{release_id}: {expected}")  # type: ignore[no-any-return]


def _weights(view: dict[str, Any]) -> dict[str, int]:
    return {m["service"]: m["weights"]["green"] for m in view["members"]}


async def test_release_moves_members_together_and_refuses_steering_one_alone(tmp_path: Path) -> None:
    async with in_process(tmp_path) as (cp, client):
        await _two_services(client)
        created = await _call(client, "POST", "/v1/releases", release_body(), expect=202)
        rid = created["id"]
        assert rid == "release-1" and created["release"]["status"] == "in_progress"
        view = await _release_at(client, rid, phase="shifting")
        assert _weights(view) == {"api": 10, "web": 10}
        assert [m["deployment"] for m in view["members"]] == ["api-2", "web-2"]
        assert (await _call(client, "GET", "/v1/services/web"))["release_group"] == rid

        # Nothing that would split the release is accepted on a member alone; each 409 names the release.
        refusals = [
            ("POST", "/v1/services/web/deployments", {"version": "v3", "endpoints": ["127.0.0.1:9103"]}),
            ("PUT", "/v1/services/web/traffic", {"weights": {"blue": 50, "green": 50}}),
            ("POST", "/v1/services/web/switch", None),
            ("POST", "/v1/services/api/rollback", None),
            ("PUT", "/v1/services/web/environments/blue", {"version": "v1", "endpoints": ["127.0.0.1:9104"]}),
            ("POST", "/v1/deployments/web-2/promote", None),
            ("POST", "/v1/deployments/api-2/rollback", None),
            ("POST", "/v1/deployments/api-2/abort", None),
            ("POST", "/v1/releases", release_body()),
        ]
        for method, path, body in refusals:
            answer = await _call(client, method, path, body, expect=409)
            assert "release-1" in answer["error"], (path, answer)
        assert _weights(await _call(client, "GET", f"/v1/releases/{rid}")) == {"api": 10, "web": 10}
        # More endpoints of the new version move no traffic: allowed, as during a deployment.
        await _call(client, "PUT", "/v1/services/web/environments/green", {"version": "v2", "endpoints": ["127.0.0.1:9102", "127.0.0.1:9104"]})

        promoted = await _call(client, "POST", f"/v1/releases/{rid}/promote")
        assert _weights(promoted) == {"api": 50, "web": 50}
        paused = await _call(client, "POST", f"/v1/releases/{rid}/pause")
        assert paused["phase"] == "paused" and all(m["paused"] for m in paused["members"])
        resumed = await _call(client, "POST", f"/v1/releases/{rid}/resume")
        assert resumed["phase"] == "shifting"
        rolled = await _call(client, "POST", f"/v1/releases/{rid}/rollback")
        assert rolled["status"] == "rolled_back" and _weights(rolled) == {"api": 0, "web": 0}
        assert [m["status"] for m in rolled["members"]] == ["rolled_back", "rolled_back"]
        # Each member's shift events happened at the same instants (one transaction each).
        times = [[e["at"] for e in (await _call(client, "GET", f"/v1/deployments/{m}"))["history"] if e["status"] in ("shifting", "rolled_back")]
                 for m in ("api-2", "web-2")]
        assert times[0] == times[1] and len(times[0]) >= 4
        # The release is over: the services are free again.
        await _call(client, "PUT", "/v1/services/web/traffic", {"weights": {"blue": 100, "green": 0}})
        listing = await _call(client, "GET", "/v1/releases")
        assert [r["id"] for r in listing["releases"]] == [rid]
        await _call(client, "POST", f"/v1/releases/{rid}/promote", expect=409)


async def test_bad_releases_are_refused_and_change_nothing(tmp_path: Path) -> None:
    async with in_process(tmp_path) as (cp, client):
        await _two_services(client)
        before = {n: await _call(client, "GET", f"/v1/services/{n}/deployments") for n in ("web", "api")}
        unknown = release_body()
        unknown["services"]["nope"] = {"version": "v2", "endpoints": ["127.0.0.1:1"]}
        answer = await _call(client, "POST", "/v1/releases", unknown, expect=400)
        assert "unknown service 'nope'" in answer["error"]
        answer = await _call(client, "POST", "/v1/releases", {**release_body(), "services": {}}, expect=400)
        assert "at least two services" in answer["error"]
        # A member already deploying on its own: 409 naming its deployment; the other member is untouched.
        await _call(client, "POST", "/v1/services/web/deployments",
                    {"version": "v3", "endpoints": ["127.0.0.1:9105"], "strategy": {"steps": [10, 100], "step_seconds": LONG_STEP}}, expect=202)
        answer = await _call(client, "POST", "/v1/releases", release_body(), expect=409)
        assert "deployment web-2 of web is in progress" in answer["error"]
        assert await _call(client, "GET", "/v1/services/api/deployments") == before["api"]
        assert (await _call(client, "GET", "/v1/releases"))["releases"] == []
        await _call(client, "GET", "/v1/releases/release-1", expect=404)
        await _call(client, "GET", "/v1/releases/bogus", expect=404)


async def test_a_restart_resumes_the_release_from_its_stored_deadlines(tmp_path: Path) -> None:
    async with in_process(tmp_path) as (cp, client):
        await _two_services(client)
        rid = (await _call(client, "POST", "/v1/releases", release_body([10, 50, 100], step_seconds=2), expect=202))["id"]
        await _release_at(client, rid, phase="shifting")
    # The control plane was stopped mid-step; a new one on the same state goes on from there.
    async with in_process(tmp_path) as (cp, client):
        view = await _release_at(client, rid, status="complete")
        assert _weights(view) == {"api": 100, "web": 100}
        for name in ("api", "web"):
            service = await _call(client, "GET", f"/v1/services/{name}")
            assert service["traffic"]["weights"] == {"blue": 0, "green": 100}
        times = [[e["at"] for e in (await _call(client, "GET", f"/v1/deployments/{m}"))["history"] if e["status"] in ("shifting", "active")]
                 for m in ("api-2", "web-2")]
        assert times[0] == times[1]


async def test_release_responses_match_openapi(tmp_path: Path) -> None:
    from tests.test_admin_api import assert_documented_response

    async with in_process(tmp_path) as (cp, client):
        await _two_services(client)
        replies = [("POST", "/v1/releases", 202, await _call(client, "POST", "/v1/releases", release_body(), expect=202))]
        await _release_at(client, "release-1", phase="shifting")
        for method, path in [("GET", "/v1/releases/release-1"), ("GET", "/v1/releases"), ("POST", "/v1/releases/release-1/pause"),
                             ("POST", "/v1/releases/release-1/resume"), ("POST", "/v1/releases/release-1/promote"),
                             ("POST", "/v1/releases/release-1/abort")]:
            replies.append((method, path, 200, await _call(client, method, path)))
        for method, path, status, body in replies:
            assert_documented_response(method, path, status, body)


async def test_cli_release_create_watch_status_and_rollback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    from controlplane.cli import main

    async with in_process(tmp_path) as (cp, client):
        await _two_services(client)
        admin = str(client.make_url("")).rstrip("/")
        common = ["--admin", admin]
        code = await asyncio.to_thread(main, ["release", "create", *common, "--member", "web=v2@127.0.0.1:9102",
                                              "--member", "api=v2@127.0.0.1:9202", "--steps", "10,50,100",
                                              "--step-seconds", "600"])
        assert code == 0
        assert "release release-1 accepted (api, web)" in capsys.readouterr().out
        await _release_at(client, "release-1", phase="shifting")
        assert await asyncio.to_thread(main, ["release", "status", "release-1", *common]) == 0
        out = capsys.readouterr().out
        assert "release-1: in_progress (shifting)" in out and "blue 90% / green 10%" in out
        assert await asyncio.to_thread(main, ["release", "rollback", "release-1", *common]) == 0
        assert "release-1: rolled_back" in capsys.readouterr().out
        assert await asyncio.to_thread(main, ["release", "list", *common]) == 0
        assert "release-1: rolled_back" in capsys.readouterr().out
        assert await asyncio.to_thread(main, ["release", "create", *common, "--member", "web=v2@"]) == 2
        assert "expected NAME=VERSION[@IP:PORT" in capsys.readouterr().err


async def test_a_complete_release_frees_its_services_and_can_still_be_rolled_back_together(tmp_path: Path) -> None:
    async with in_process(tmp_path) as (cp, client):
        await _two_services(client)
        rid = (await _call(client, "POST", "/v1/releases", release_body(), expect=202))["id"]
        await _release_at(client, rid, phase="shifting")
        await _call(client, "POST", f"/v1/releases/{rid}/promote", full="true")
        done = await _release_at(client, rid, status="complete")
        assert _weights(done) == {"api": 100, "web": 100}
        assert (await _call(client, "GET", "/v1/services/web"))["release_group"] is None
        await _call(client, "POST", f"/v1/releases/{rid}/abort", expect=409)
        rolled = await _call(client, "POST", f"/v1/releases/{rid}/rollback")
        assert rolled["status"] == "rolled_back" and _weights(rolled) == {"api": 0, "web": 0}
        await _call(client, "POST", f"/v1/releases/{rid}/rollback")  # idempotent


async def test_a_member_failing_its_smoke_tests_fails_the_release_before_any_traffic(tmp_path: Path) -> None:
    async with in_process(tmp_path) as (cp, client):
        await _two_services(client)
        # No proxy serves the preview entry here, so web's check cannot pass; api has no check of its own.
        body = release_body(smoke={"checks": [{"path": "/web/healthz", "service": "web", "retries": 0, "timeout_seconds": 1}]})
        rid = (await _call(client, "POST", "/v1/releases", body, expect=202))["id"]
        view = await _release_at(client, rid, status="failed")
        assert view["reason"].startswith("web failed: smoke tests failed"), view["reason"]
        assert {m["service"]: m["status"] for m in view["members"]} == {"api": "failed", "web": "failed"}
        assert _weights(view) == {"api": 0, "web": 0}
        api = await _call(client, "GET", "/v1/deployments/api-2")
        assert [e["status"] for e in api["history"]].count("shifting") == 0 and "release-1: web failed" in api["history"][-1]["reason"]
        assert (await _call(client, "GET", "/v1/services/api"))["release_group"] is None
