"""Prometheus queries as an analysis source: each query of ``analysis.prometheus`` is evaluated
once per analysis interval (``GET <url>/api/v1/query``) and judged next to Envoy's own figures
(see :func:`controlplane.deploy.driver.judge`). A query must answer one number: a scalar, or an
instant vector of one series (aggregate with sum(), max(), ...). Anything else, and any error
reaching Prometheus, is reported as the result's ``error`` and follows the ``no_data`` policy.
"""

from __future__ import annotations

import asyncio
import math
import string
from typing import Any, Mapping

import aiohttp

from .spec import PrometheusQuery, PrometheusSource


def _promql_string(value: str) -> str:
    """``value`` safe inside a double-quoted PromQL string (label matchers)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(query: str, context: Mapping[str, str], interval_seconds: float) -> str:
    """``query`` with $service, $environment, $version (escaped for PromQL strings) and
    $interval (a PromQL duration, e.g. "30s") filled in; other $names are left alone."""
    values = {k: _promql_string(v) for k, v in context.items()}
    values["interval"] = f"{max(1, round(interval_seconds))}s"
    return string.Template(query).safe_substitute(values)


def value_of(data: Mapping[str, Any]) -> float:
    """The one number of a /api/v1/query answer's ``data``; ValueError naming what is wrong."""
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        raw = result[1]
    elif kind == "vector":
        if not result:
            raise ValueError("no data (empty result)")
        if len(result) > 1:
            raise ValueError(f"{len(result)} series; aggregate the query to one (sum, max, ...)")
        raw = result[0]["value"][1]
    else:
        raise ValueError(f"a {kind} result; the query must give one number")
    number = float(raw)
    if math.isnan(number):
        raise ValueError("NaN (e.g. 0/0: no requests)")
    return number


async def evaluate(session: aiohttp.ClientSession, source: PrometheusSource, contexts: Mapping[str, Mapping[str, str]],
                   interval_seconds: float) -> list[dict[str, Any]]:
    """One result per query, in order: {name, query, value, max, min, error}."""
    return list(await asyncio.gather(*(_one(session, source, q, contexts[q.for_environment], interval_seconds)
                                       for q in source.queries)))


async def _one(session: aiohttp.ClientSession, source: PrometheusSource, query: PrometheusQuery,
               context: Mapping[str, str], interval_seconds: float) -> dict[str, Any]:
    text = render(query.query, context, interval_seconds)
    result: dict[str, Any] = {"name": query.name, "query": text, "value": None, "max": query.max, "min": query.min, "error": None}
    try:
        async with session.get(f"{source.url}/api/v1/query", params={"query": text}, allow_redirects=False,
                               timeout=aiohttp.ClientTimeout(total=source.timeout_seconds)) as response:
            body = await response.json(content_type=None)
            if response.status != 200 or body.get("status") != "success":
                raise ValueError(f"HTTP {response.status}: {body.get('error', 'no error message')}")
            result["value"] = value_of(body["data"])
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        result["error"] = f"cannot reach Prometheus at {source.url}: {type(exc).__name__}"
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        result["error"] = str(exc) or type(exc).__name__
    return result


def breach_of(result: Mapping[str, Any]) -> str | None:
    """Why ``result`` (with a value) breaches its bounds, or None."""
    value, name = result["value"], result["name"]
    if result.get("max") is not None and value > result["max"]:
        return f"prometheus {name} = {value:g} > max {result['max']:g}"
    if result.get("min") is not None and value < result["min"]:
        return f"prometheus {name} = {value:g} < min {result['min']:g}"
    return None
