"""The Prometheus analysis source's pure parts: templating, reading an answer, judging."""

from __future__ import annotations

import pytest

from controlplane.deploy.driver import judge
from controlplane.deploy.promql import render, value_of
from controlplane.deploy.spec import Analysis, PrometheusQuery, PrometheusSource, parse_analysis
from controlplane.errors import ValidationError

SOURCE = PrometheusSource("http://127.0.0.1:9090", (PrometheusQuery("errors", "x", max=5),))


def result(value: float | None = None, error: str | None = None, **bounds: float) -> dict[str, object]:
    return {"name": "errors", "query": "x", "value": value, "max": bounds.get("max"), "min": bounds.get("min"), "error": error}


def test_templating_fills_in_and_escapes() -> None:
    context = {"service": "shop", "environment": "green", "version": 'v2"} or vector(1) #'}
    rendered = render('sum(rate(errors{service="$service", env="${environment}", v="$version"}[$interval])) / $other', context, 29.6)
    assert rendered == 'sum(rate(errors{service="shop", env="green", v="v2\\"} or vector(1) #"}[30s])) / $other'


@pytest.mark.parametrize("data, expected", [
    ({"resultType": "vector", "result": [{"metric": {}, "value": [1, "3.5"]}]}, 3.5),
    ({"resultType": "scalar", "result": [1, "2"]}, 2.0),
])
def test_one_number(data: dict[str, object], expected: float) -> None:
    assert value_of(data) == expected


@pytest.mark.parametrize("data, problem", [
    ({"resultType": "vector", "result": []}, "no data"),
    ({"resultType": "vector", "result": [{"value": [1, "1"]}, {"value": [1, "2"]}]}, "2 series"),
    ({"resultType": "matrix", "result": []}, "a matrix result"),
    ({"resultType": "vector", "result": [{"value": [1, "NaN"]}]}, "NaN"),
])
def test_answers_that_are_not_one_number(data: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        value_of(data)


ENOUGH = {"requests": 100, "error_rate": 0.0, "p99_ms": 1.0}


def test_a_value_beyond_a_bound_breaches() -> None:
    analysis = Analysis(prometheus=SOURCE)
    assert judge(analysis, {**ENOUGH, "prometheus": [result(3, max=5)]}) == ("ok", None)
    assert judge(analysis, {**ENOUGH, "prometheus": [result(6, max=5)]}) == ("breach", "prometheus errors = 6 > max 5")
    assert judge(analysis, {**ENOUGH, "prometheus": [result(0.5, min=1)]}) == ("breach", "prometheus errors = 0.5 < min 1")


@pytest.mark.parametrize("policy, verdict", [("fail", "breach"), ("wait", "wait"), ("pass", "ok")])
def test_errors_reaching_prometheus_follow_no_data(policy: str, verdict: str) -> None:
    analysis = Analysis(no_data=policy, prometheus=SOURCE)
    got, reason = judge(analysis, {**ENOUGH, "prometheus": [result(error="cannot reach Prometheus at http://127.0.0.1:9090: ClientConnectorError")]})
    assert got == verdict
    if verdict != "ok":
        assert reason == "prometheus errors: cannot reach Prometheus at http://127.0.0.1:9090: ClientConnectorError"


@pytest.mark.parametrize("body, problem", [
    ({"url": "ftp://x", "queries": [{"name": "a", "query": "up", "max": 1}]}, "analysis.prometheus.url must be an http"),
    ({"url": "http://127.0.0.1:9090", "queries": []}, "analysis.prometheus.queries: give 1 to 20 queries"),
    ({"url": "http://127.0.0.1:9090", "queries": [{"name": "a", "query": "up"}]}, "analysis.prometheus.queries[0]: give max, min or both"),
    ({"url": "http://127.0.0.1:9090", "queries": [{"name": "a", "query": "up", "max": 1, "for_environment": "blue"}]}, "for_environment must be 'new' or 'old'"),
    ({"url": "http://127.0.0.1:9090", "queries": [{"name": "a", "query": "up", "max": 1}, {"name": "a", "query": "up", "min": 0}]}, "names must be unique"),
])
def test_bad_prometheus_specs_are_refused(body: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem.replace("(", r"\(").replace("[", r"\[")):
        parse_analysis({"prometheus": body})
