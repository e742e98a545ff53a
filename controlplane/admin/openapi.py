"""OpenAPI 3.1 description of the admin API, served at /v1/openapi.json.

tests/test_admin_api.py keeps it true: every route the server has is documented here and
every documented route exists, and live responses carry the documented required fields.
"""

from __future__ import annotations

from typing import Any

from .auth import OPEN, ROUTE_ROLES

_ERROR = {"$ref": "#/components/schemas/Error"}
_SERVICE = {"$ref": "#/components/schemas/Service"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": _json(_ERROR, "Bad input; nothing was changed. The message names the problem."),
    "401": _json(_ERROR, "Missing or wrong bearer token."),
    "404": _json(_ERROR, "Unknown service."),
    "409": _json(_ERROR, "Valid request that the current state does not allow; nothing was changed."),
    "413": _json(_ERROR, "Body larger than 1 MiB."),
    "503": _json(_ERROR, "The state store failed (the message names the cause, e.g. 'disk full'); nothing was changed. "
                 "For a change, also: stored (`stored: true`, `store_revision`) but not yet pushed to the proxies "
                 "because publishing is failing; it is pushed once publishing recovers."),
}

_WAIT_PARAMS = [
    {
        "name": "wait",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": ["converged"]},
        "description": "Answer only once every healthy proxy of the service's fleets has ACKed the change "
        "(or the timeout passed); lagging and rejecting proxies are named in convergence.lagging / .rejecting and not "
        "waited for, unless the service sets require_all_proxies. The response's convergence.seconds is the measured time.",
    },
    {
        "name": "timeout",
        "in": "query",
        "required": False,
        "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 300, "default": 10},
        "description": "Seconds to wait with wait=converged.",
    },
]

_READY = {
    "type": "object",
    "required": ["status", "published_revision"],
    "properties": {
        "status": {"type": "string", "enum": ["ready", "not ready"]},
        "published_revision": {"type": "integer"},
        "store_revision": {"type": "integer"},
        "error": {"type": "string"},
    },
}

_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[a-z0-9]([a-z0-9-]{0,46}[a-z0-9])?$"}}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}, "description": "Deployment id, '<service>-<n>'."}
_ENV = {"name": "env", "in": "path", "required": True, "schema": {"type": "string", "enum": ["blue", "green"]}}


def _mutation(summary: str, body: dict[str, Any] | None, params: list[dict[str, Any]], *, body_required: bool = True) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": params + _WAIT_PARAMS,
        "responses": {
            "200": _json(_SERVICE, "The resulting service state, including xds_version and convergence."),
            "202": _json(_SERVICE, "Stored and being pushed, but wait=converged timed out before every proxy ACKed."),
            **_ERRORS,
        },
    }
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": body}}}
    return op


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "bluegreen control plane admin API",
        "version": "1",
        "description": "Register services and their blue/green environments, move traffic, watch the fleet converge.",
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}, "stored": {"type": "boolean"}, "store_revision": {"type": "integer"}},
            },
            "Deployment": {
                "type": ["object", "null"],
                "required": ["id", "service", "version", "environment", "status", "deployed_at", "activated_at"],
                "properties": {
                    "id": {"type": "string"},
                    "service": {"type": "string"},
                    "version": {"type": "string"},
                    "environment": {"type": "string", "enum": ["blue", "green"]},
                    "status": {
                        "type": "string",
                        "enum": ["deploying", "ready", "shifting", "active", "draining", "standby", "failed", "rolled_back", "decommissioned"],
                    },
                    "deployed_at": {"type": "string", "format": "date-time"},
                    "activated_at": {"type": ["string", "null"], "format": "date-time"},
                    "updated_at": {"type": ["string", "null"], "format": "date-time"},
                    "spec": {"type": ["object", "null"], "description": "The deployment request with defaults filled in (null for a version registered by hand)."},
                    "step": {"type": "integer", "description": "Index into strategy.steps of the weight in force; -1 before the shift."},
                    "deadline": {"type": ["string", "null"], "format": "date-time", "description": "End of the current timed phase (step, bake, drain, standby)."},
                    "paused_remaining": {"type": ["number", "null"], "description": "Seconds left of the phase while paused."},
                    "awaiting_promote": {"type": "boolean"},
                    "baking": {"type": "boolean"},
                    "failures": {"type": "integer", "description": "Consecutive analysis intervals that breached a threshold."},
                    "intervals_judged": {"type": "integer", "description": "Analysis intervals judged (ok or breach) in the current step or bake."},
                    "no_data_intervals": {"type": "integer", "description": "Consecutive analysis intervals with fewer than min_requests requests."},
                    "extended": {"type": "boolean", "description": "The current step or bake went on past its deadline to be judged; the history says why."},
                    "analysis": {"type": ["object", "null"], "description": "Latest analysis figures."},
                    "intervals": {"type": "array", "items": {"type": "object"},
                                  "description": "Figures of the last analysis intervals (at most 30, oldest first), each with `at` (epoch seconds) and `verdict`."},
                    "reason": {"type": ["string", "null"]},
                    "counterpart": {"type": ["string", "null"], "description": "Deployment id of the other environment this one replaces or serves as standby for."},
                    "hooks_pending": {"type": "boolean"},
                    "waiting_for": {"type": ["string", "null"], "description": "What a due decommission waits for, e.g. 'proxies still routing to blue: edge-2'."},
                    "phase": {"type": ["string", "null"], "enum": ["mirror", "targeting", "scaling", None],
                              "description": "Before the steps: mirror (ready; shadow traffic only) or targeting (shifting at step -1; matching requests only); scaling: waiting for capacity (docs/capacity.md)."},
                    "baseline_capacity": {"type": ["integer", "null"], "description": "Capacity that served 100 % when the deployment started (the capacity guard's reference)."},
                    "scaling_step": {"type": ["integer", "null"], "description": "The step a scaling phase waits to shift to."},
                    "history": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["at", "status", "actor", "reason"],
                            "properties": {
                                "at": {"type": "string", "format": "date-time"},
                                "status": {"type": "string"},
                                "actor": {"type": "string", "enum": ["api", "automatic"]},
                                "reason": {"type": "string"},
                            },
                        },
                    },
                },
            },
            "Environment": {
                "type": "object",
                "required": ["version", "endpoints", "weight", "deployment"],
                "properties": {
                    "version": {"type": ["string", "null"]},
                    "endpoints": {"type": "array", "items": {"oneOf": [{"type": "string", "description": "IP:PORT or [IPv6]:PORT"}, {"type": "object", "additionalProperties": False, "required": ["address"], "properties": {"address": {"type": "string"}, "weight": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1}}}]}},
                    "weight": {"type": "integer", "minimum": 0, "maximum": 100},
                    "deployment": {"$ref": "#/components/schemas/Deployment"},
                },
            },
            "Convergence": {
                "type": "object",
                "required": ["fleets", "proxies", "acked", "lagging", "rejecting", "converged"],
                "properties": {
                    "fleets": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["fleet", "generation", "proxies", "acked", "lagging", "rejecting", "converged"],
                            "properties": {
                                "fleet": {"type": "string"},
                                "generation": {"type": "integer"},
                                "proxies": {"type": "integer"},
                                "acked": {"type": "integer"},
                                "lagging": {"type": "array", "items": {"type": "string"}},
                                "rejecting": {"type": "array", "items": {"type": "string"}},
                                "converged": {"type": "boolean"},
                            },
                        },
                    },
                    "proxies": {"type": "integer", "description": "Connected proxies of the fleets serving the service."},
                    "acked": {"type": "integer", "description": "How many of them hold the current configuration."},
                    "lagging": {"type": "array", "items": {"type": "string"}, "description": "Node ids of proxies not converged within convergence.lagging_after_seconds; not waited for."},
                    "rejecting": {"type": "array", "items": {"type": "string"}, "description": "Node ids of proxies whose last answer was a NACK; not waited for."},
                    "converged": {"type": "boolean", "description": "Every proxy the policy waits for (every proxy with require_all_proxies) holds the current configuration."},
                    "seconds": {"type": ["number", "null"], "description": "With wait=converged: change accepted -> last proxy ACKed."},
                    "timed_out_after": {"type": "number"},
                },
            },
            "Service": {
                "type": "object",
                "required": ["name", "domains", "prefix", "drain_seconds", "standby_seconds", "environments", "traffic", "xds_version", "convergence"],
                "properties": {
                    "name": {"type": "string"},
                    "domains": {"type": "array", "items": {"type": "string"}},
                    "prefix": {"type": "string"},
                    "drain_seconds": {"type": "integer"},
                    "standby_seconds": {"type": "integer"},
                    "require_all_proxies": {"type": "boolean"},
                    "release_group": {"type": ["string", "null"], "description": "The release (docs/releases.md) holding this service; "
                                      "while set, deploying or steering it alone answers 409."},
                    "affinity": {"oneOf": [{"$ref": "#/components/schemas/Affinity"}, {"type": "null"}]},
                    "notifications": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"webhooks": {"type": "array", "items": {"$ref": "#/components/schemas/Webhook"}}},
                        "description": "The service's own deployment event webhooks, besides the config file's (docs/notifications.md)."},
                    "environments": {
                        "type": "object",
                        "required": ["blue", "green"],
                        "properties": {"blue": {"$ref": "#/components/schemas/Environment"}, "green": {"$ref": "#/components/schemas/Environment"}},
                    },
                    "traffic": {
                        "type": "object",
                        "required": ["weights", "active", "idle", "previous"],
                        "properties": {
                            "weights": {"$ref": "#/components/schemas/Weights"},
                            "active": {"type": "string", "enum": ["blue", "green"]},
                            "idle": {"type": "string", "enum": ["blue", "green"]},
                            "previous": {"type": ["string", "null"], "enum": ["blue", "green", None]},
                        },
                    },
                    "xds_version": {"type": "string", "description": "Content hash of everything the proxies get for this service."},
                    "store_revision": {"type": "integer"},
                    "convergence": {"$ref": "#/components/schemas/Convergence"},
                },
            },
            "Weights": {
                "type": "object",
                "required": ["blue", "green"],
                "additionalProperties": False,
                "properties": {"blue": {"type": "integer", "minimum": 0, "maximum": 100}, "green": {"type": "integer", "minimum": 0, "maximum": 100}},
                "description": "Integers summing to 100.",
            },
            "ServiceSpec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "domains": {"type": "array", "items": {"type": "string"}, "minItems": 1, "default": ["*"]},
                    "prefix": {"type": "string", "pattern": "^/", "default": "/"},
                    "drain_seconds": {"type": "integer", "minimum": 0, "maximum": 86400, "default": 60},
                    "require_all_proxies": {"type": "boolean", "default": False,
                                            "description": "Gates wait for every connected proxy, lagging and rejecting ones too."},
                    "standby_seconds": {"type": "integer", "minimum": 0, "maximum": 2592000, "default": 1800},
                    "affinity": {"oneOf": [{"$ref": "#/components/schemas/Affinity"}, {"type": "null"}],
                                 "description": "Session affinity for this service's stepped shifts (a deployment may set its own); null: none."},
                    "notifications": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"webhooks": {"type": "array", "items": {"$ref": "#/components/schemas/Webhook"}}},
                        "description": "The service's own deployment event webhooks, besides the config file's (docs/notifications.md)."},
                },
            },
            "Affinity": {
                "type": "object",
                "additionalProperties": False,
                "description": "Pins each client to the environment it was drawn for during a stepped shift (docs/affinity.md).",
                "properties": {
                    "cookie": {"type": "string", "default": "bluegreen-env", "maxLength": 64},
                    "ttl_seconds": {"type": "integer", "minimum": 1, "maximum": 2592000, "default": 3600},
                },
            },
            "Webhook": {
                "type": "object",
                "additionalProperties": False,
                "required": ["url"],
                "properties": {
                    "url": {"type": "string", "description": "http(s) URL; must pass the config's webhooks.allowed."},
                    "secret_file": {"type": ["string", "null"], "description": "File on the control plane's host holding the HMAC-SHA256 key (X-Bluegreen-Signature)."},
                    "format": {"type": "string", "enum": ["json", "slack"], "default": "json"},
                    "events": {"type": "array", "items": {"type": "string", "enum": ["started", "smoke_passed", "smoke_failed", "step", "paused",
                                                                                      "promoted", "rolled_back", "failed", "active", "decommissioned"]},
                               "description": "Events to send; empty or absent: all."},
                    "timeout_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 60, "default": 5},
                },
            },
            "EnvironmentSpec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["version", "endpoints"],
                "properties": {
                    "version": {"type": "string"},
                    "endpoints": {"type": "array", "items": {"oneOf": [{"type": "string", "description": "IP:PORT or [IPv6]:PORT"}, {"type": "object", "additionalProperties": False, "required": ["address"], "properties": {"address": {"type": "string"}, "weight": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1}}}]}, "maxItems": 1000},
                },
            },
            "DeploymentRequest": {
                "type": "object",
                "required": ["version"],
                "description": "endpoints is required unless the idle environment's endpoints come from an endpoint source; "
                               "then it must be left out (409 otherwise) and the source's last good endpoints are used.",
                "additionalProperties": False,
                "properties": {
                    "version": {"type": "string"},
                    "endpoints": {"type": "array", "items": {"oneOf": [{"type": "string", "description": "IP:PORT or [IPv6]:PORT"}, {"type": "object", "additionalProperties": False, "required": ["address"], "properties": {"address": {"type": "string"}, "weight": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1}}}]}, "minItems": 1},
                    "scale": {
                        "type": "object",
                        "additionalProperties": False,
                        "description": "Capacity guard and scale hooks (docs/capacity.md).",
                        "properties": {
                            "webhooks": {"type": "array", "items": {"type": "object", "required": ["url"], "properties": {
                                "url": {"type": "string"}, "timeout_seconds": {"type": "number", "default": 5}}}},
                            "commands": {"type": "array", "items": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
                            "timeout_seconds": {"type": "number", "default": 300},
                            "on_timeout": {"type": "string", "enum": ["fail", "rollback"], "default": "fail"},
                            "headroom_percent": {"type": "number", "default": 0},
                            "standby_capacity": {"oneOf": [{"type": "number", "minimum": 0, "maximum": 100},
                                                           {"type": "string", "pattern": "^\\s*[0-9]{1,3}(\\.[0-9]+)?\\s*%\\s*$"}],
                                                 "default": 0, "description": "Warm pool after decommission, percent of the baseline capacity: 50 or \"50%\"."},
                            "standby_capacity_percent": {"type": "number", "minimum": 0, "maximum": 100, "deprecated": True,
                                                         "description": "Deprecated alias of standby_capacity (a number); not both."},
                            "command_timeout_seconds": {"type": "number", "default": 60},
                        },
                    },
                    "strategy": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "steps": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 100}, "default": [100],
                                      "description": "Strictly increasing, ending at 100. [100] is the atomic switch."},
                            "step_seconds": {"type": "number", "default": 30},
                            "bake_seconds": {"type": "number", "default": 60},
                            "auto_promote": {"type": "boolean", "default": True},
                        },
                    },
                    "smoke": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "checks": {"type": "array", "items": {"type": "object", "properties": {
                                "method": {"type": "string", "default": "GET"}, "path": {"type": "string", "default": "/"},
                                "headers": {"type": "object"}, "expect_status": {"type": "integer", "default": 200},
                                "body_contains": {"type": "string"}, "timeout_seconds": {"type": "number", "default": 2},
                                "retries": {"type": "integer", "default": 3}}}},
                            "commands": {"type": "array", "items": {"type": "array", "items": {"type": "string"}},
                                         "description": "argv lists; run with BLUEGREEN_PREVIEW_URL in the environment; exit 0 passes."},
                            "webhooks": {"type": "array", "items": {"type": "object", "required": ["url"], "properties": {"url": {"type": "string"}, "timeout_seconds": {"type": "number"}}}},
                            "command_timeout_seconds": {"type": "number", "default": 60},
                        },
                    },
                    "analysis": {
                        "type": ["object", "null"],
                        "additionalProperties": False,
                        "properties": {
                            "interval_seconds": {"type": "number", "default": 5},
                            "max_error_rate": {"type": "number", "default": 0.01},
                            "max_p99_ms": {"type": ["number", "null"], "default": 500},
                            "min_requests": {"type": "integer", "default": 20},
                            "no_data": {"type": "string", "enum": ["wait", "fail", "pass"], "default": "wait"},
                            "failure_limit": {"type": "integer", "default": 2},
                            "no_data_limit": {"type": "integer", "default": 10,
                                              "description": "With no_data wait: this many intervals in a row without min_requests requests, and each one after, count as a breach."},
                            "prometheus": {
                                "type": ["object", "null"],
                                "additionalProperties": False,
                                "required": ["url", "queries"],
                                "description": "PromQL queries judged each interval next to Envoy's figures (docs/prometheus.md). The URL must pass the config's analysis.prometheus_allowed; errors and empty answers follow no_data.",
                                "properties": {
                                    "url": {"type": "string"},
                                    "timeout_seconds": {"type": "number", "default": 5},
                                    "queries": {"type": "array", "minItems": 1, "maxItems": 20, "items": {
                                        "type": "object", "additionalProperties": False, "required": ["name", "query"],
                                        "properties": {
                                            "name": {"type": "string"},
                                            "query": {"type": "string", "description": "PromQL giving one number; $service, $environment, $version and $interval are filled in."},
                                            "max": {"type": ["number", "null"]},
                                            "min": {"type": ["number", "null"]},
                                            "for_environment": {"type": "string", "enum": ["new", "old"], "default": "new"},
                                        }}},
                                },
                            },
                        },
                    },
                    "decommission": {"type": "object", "properties": {"webhooks": {"type": "array", "items": {"type": "object"}}}},
                    "migrations": {"$ref": "#/components/schemas/Migrations"},
                    "convergence": {
                        "type": ["object", "null"],
                        "additionalProperties": False,
                        "properties": {"require_all_proxies": {"type": ["boolean", "null"], "description": "Gates wait for every connected proxy; null: the service's setting."}},
                    },
                    "affinity": {"oneOf": [{"$ref": "#/components/schemas/Affinity"}, {"type": "null"}],
                                 "description": "Session affinity during the steps; null: the service's setting."},
                    "mirror": {
                        "type": ["object", "null"],
                        "additionalProperties": False,
                        "description": "After the smoke tests: copy this share of production requests to the new version, judged by the analysis (required), before any user is served by it (docs/mirroring.md).",
                        "properties": {
                            "percent": {"type": "number", "exclusiveMinimum": 0, "maximum": 100, "default": 10},
                            "seconds": {"type": "number", "minimum": 0.1, "default": 60},
                        },
                    },
                    "target": {
                        "type": ["object", "null"],
                        "additionalProperties": False,
                        "description": "First phase of the shift: requests with all these headers (exact values) and the cookie go to the new version, for seconds or until promoted (docs/targeting.md).",
                        "properties": {
                            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                            "cookie": {"type": ["object", "null"], "additionalProperties": False, "required": ["name", "value"],
                                       "properties": {"name": {"type": "string"}, "value": {"type": "string"}}},
                            "seconds": {"type": "number", "minimum": 0.1, "default": 300},
                        },
                    },
                },
            },
            "Migrations": {
                "type": ["object", "null"],
                "required": ["directory", "database"],
                "additionalProperties": False,
                "description": "An expand/contract migration set: expand files are linted when the request arrives and applied before the smoke tests.",
                "properties": {
                    "directory": {"type": "string", "description": "Directory of NNNN_name.expand.sql / NNNN_name.contract.sql files, on the control plane's host."},
                    "database": {"type": "string", "description": "postgresql:// URL; its password is hidden in responses."},
                    "locking": {"type": "string", "enum": ["warning", "error"], "default": "warning"},
                },
            },
            "Proxy": {
                "type": "object",
                "required": ["stream_id", "node_id", "fleet", "protocol", "connected_since", "converged", "types"],
                "properties": {
                    "stream_id": {"type": "integer", "description": "Unique within its replica."},
                    "replica": {"type": "string", "description": "The replica the proxy is connected to (GET /v1/cluster)."},
                    "worker": {"type": "integer", "minimum": 0,
                               "description": "The xDS worker process of that replica serving the stream (GET /v1/cluster); absent when the replica serves xDS itself (--xds-workers 1)."},
                    "node_id": {"type": "string"},
                    "fleet": {"type": "string"},
                    "protocol": {"type": "string", "enum": ["sotw", "delta"]},
                    "connected_since": {"type": "string", "format": "date-time"},
                    "generation": {"type": "integer"},
                    "converged": {"type": "boolean"},
                    "state": {"type": "string", "enum": ["converged", "pending", "lagging", "rejecting"],
                              "description": "pending: behind within the grace period (waited for); lagging: behind for longer; rejecting: NACKed the latest config."},
                    "types": {
                        "type": "object",
                        "description": "Keyed by cds, eds, lds, rds, and vhds (the route tables' virtual hosts, Delta proxies with xds.route_split vhds).",
                        "additionalProperties": {
                            "type": "object",
                            "required": ["type_url", "acked_version", "sent_version", "pending", "responses", "nacks", "last_nack"],
                            "properties": {
                                "type_url": {"type": "string"},
                                "subscribed": {},
                                "acked_version": {"type": ["string", "null"]},
                                "sent_version": {"type": ["string", "null"]},
                                "pending": {"type": "boolean"},
                                "responses": {"type": "integer"},
                                "nacks": {"type": "integer"},
                                "last_nack": {
                                    "type": ["object", "null"],
                                    "properties": {"version": {"type": "string"}, "message": {"type": "string"}, "at": {"type": "string"}},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/healthz": {
            "get": {
                "summary": "Liveness: the process answers. Never needs the token. Restart the process only if this fails.",
                "security": [],
                "responses": {
                    "200": _json({"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}, "The event loop is alive."),
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: the store answers and the proxies are served its newest state. Never needs the token.",
                "security": [],
                "responses": {
                    "200": _json(_READY, "Ready: the newest stored state is published."),
                    "503": _json(_READY, "Not ready; `error` names why (store unreachable, publishing failing, published revision behind). Proxies keep their last config."),
                },
            }
        },
        "/metrics": {"get": {"summary": "Prometheus exposition.", "responses": {"200": {"description": "text/plain; version=0.0.4"}}}},
        "/v1/openapi.json": {"get": {"summary": "This document.", "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        "/v1/services": {
            "get": {
                "summary": "Every service with its state and convergence.",
                "responses": {"200": _json({"type": "object", "required": ["services"], "properties": {"services": {"type": "array", "items": _SERVICE}, "store_revision": {"type": "integer"}}}, "Services.")},
            }
        },
        "/v1/services/{name}": {
            "get": {
                "summary": "One service. With wait=converged, answers once the fleet holds its current state.",
                "parameters": [_NAME] + _WAIT_PARAMS,
                "responses": {"200": _json(_SERVICE, "The service."), "202": _json(_SERVICE, "wait=converged timed out."), **_ERRORS},
            },
            "put": _mutation(
                "Create a service or update its settings. Environments and traffic are not touched.",
                {"$ref": "#/components/schemas/ServiceSpec"},
                [_NAME],
            ),
        },
        "/v1/services/{name}/environments/{env}": {
            "put": _mutation(
                "Register a version and its endpoints in one environment. A new version is refused (409) in an environment taking traffic; "
                "so is any write to an environment whose endpoints come from an endpoint source (the message names it).",
                {"$ref": "#/components/schemas/EnvironmentSpec"},
                [_NAME, _ENV],
            )
        },
        "/v1/services/{name}/traffic": {
            "put": _mutation(
                "Set the traffic split. Both weights, integers 0-100, summing to 100.",
                {"type": "object", "required": ["weights"], "additionalProperties": False, "properties": {"weights": {"$ref": "#/components/schemas/Weights"}}},
                [_NAME],
            )
        },
        "/v1/services/{name}/switch": {
            "post": _mutation(
                "Atomic switch: 100% to the idle environment (or the one named in 'to').",
                {"type": "object", "additionalProperties": False, "properties": {"to": {"type": "string", "enum": ["blue", "green"]}}},
                [_NAME],
                body_required=False,
            )
        },
        "/v1/services/{name}/rollback": {
            "post": _mutation(
                "100% back to the stable environment of an unfinished shift, or to the previously active one after a switch.",
                None,
                [_NAME],
            )
        },
        "/v1/services/{name}/deployments": {
            "post": {
                "summary": "Deploy a version to the idle environment: smoke tests through the preview entry, then the shift "
                "(steps, analysis, automatic rollback), drain, standby and decommission of the old environment.",
                "parameters": [_NAME],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/DeploymentRequest"}}}},
                "responses": {
                    "202": _json({"type": "object", "required": ["id", "deployment"], "properties": {"id": {"type": "string"}, "deployment": {"$ref": "#/components/schemas/Deployment"}}}, "Accepted; the workflow runs in the background."),
                    **_ERRORS,
                },
            },
            "get": {
                "summary": "Deployment records of a service, newest first.",
                "parameters": [_NAME],
                "responses": {
                    "200": _json({"type": "object", "required": ["deployments"], "properties": {"deployments": {"type": "array", "items": {"$ref": "#/components/schemas/Deployment"}}}}, "Records."),
                    **_ERRORS,
                },
            }
        },
        "/v1/services/{name}/migrations/contract": {
            "post": {
                "summary": "Apply a migration set's contract files, refused (409, naming the environment and its standby_until) while a version that may need the old schema can still take traffic.",
                "parameters": [_NAME],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Migrations"}}}},
                "responses": {
                    "200": _json({"type": "object", "required": ["service", "phase", "applied", "skipped"], "properties": {
                        "service": {"type": "string"}, "phase": {"type": "string"}, "applied": {"type": "array", "items": {"type": "string"}},
                        "skipped": {"type": "array", "items": {"type": "string"}}, "expanded_by": {"type": ["string", "null"]}}}, "Applied."),
                    **_ERRORS,
                    "502": _json(_ERROR, "A contract file failed in the database; the files before it stay applied and recorded."),
                },
            }
        },
        "/v1/deployments/{id}": {
            "get": {
                "summary": "One deployment with its history (time, actor, reason of every transition), timers and analysis figures.",
                "parameters": [_ID],
                "responses": {"200": _json({"$ref": "#/components/schemas/Deployment"}, "The deployment."), **_ERRORS},
            }
        },
        "/v1/deployments/{id}/promote": {
            "post": {
                "summary": 'Skip the remaining steps and go to 100 % (also ends a hold before 100 % when auto_promote is false).',
                "parameters": [_ID],
                "responses": {"200": _json({"$ref": "#/components/schemas/Deployment"}, "The deployment after the command."), **_ERRORS},
            }
        },
        "/v1/deployments/{id}/pause": {
            "post": {
                "summary": 'Stop the step or bake timer (analysis also pauses); idempotent.',
                "parameters": [_ID],
                "responses": {"200": _json({"$ref": "#/components/schemas/Deployment"}, "The deployment after the command."), **_ERRORS},
            }
        },
        "/v1/deployments/{id}/resume": {
            "post": {
                "summary": 'Restart the timer with the time that was left; idempotent.',
                "parameters": [_ID],
                "responses": {"200": _json({"$ref": "#/components/schemas/Deployment"}, "The deployment after the command."), **_ERRORS},
            }
        },
        "/v1/deployments/{id}/rollback": {
            "post": {
                "summary": '100 % back to the environment the deployment replaced, at once.',
                "parameters": [_ID],
                "responses": {"200": _json({"$ref": "#/components/schemas/Deployment"}, "The deployment after the command."), **_ERRORS},
            }
        },
        "/v1/deployments/{id}/abort": {
            "post": {
                "summary": 'Before production traffic: mark failed. After: roll back.',
                "parameters": [_ID],
                "responses": {"200": _json({"$ref": "#/components/schemas/Deployment"}, "The deployment after the command."), **_ERRORS},
            }
        },
        "/v1/deployments/{id}/decommission": {
            "post": {
                "summary": 'End the standby of the replaced environment now (id of the deployment or of its standby record). '
                           'Refused (409, naming them) while a connected proxy still routes production traffic to it, unless force=true.',
                "parameters": [_ID, {"name": "force", "in": "query", "required": False, "schema": {"type": "string", "enum": ["true", "false"], "default": "false"},
                                     "description": "Decommission even while proxies still route to the environment; the history records it."}],
                "responses": {"200": _json({"$ref": "#/components/schemas/Deployment"}, "The deployment after the command."), **_ERRORS},
            }
        },
        "/v1/whoami": {
            "get": {
                "summary": "The calling token's name and role (the dashboard hides the buttons a viewer may not use; the server enforces roles anyway).",
                "responses": {"200": _json({"type": "object", "required": ["name", "role"], "properties": {
                    "name": {"type": "string"}, "role": {"type": "string", "enum": ["viewer", "operator", "admin"]}}}, "The token's identity.")},
            }
        },
        "/v1/events": {
            "get": {
                "summary": "Live feed (text/event-stream) for the dashboard: an event `hello` at once, then `change` (data: "
                           "`{\"store_revision\", \"proxies\"}`) at most every 200 ms after the stored state or the proxies' "
                           "convergence changed, and a comment line every 15 s. Read it with fetch() and the Authorization header.",
                "responses": {"200": {"description": "text/event-stream; one JSON object per `data:` line"}},
            }
        },
        "/ui": {
            "get": {
                "summary": "The web dashboard (HTML). Carries no data: the page calls the API with the token from `#token=...` or the one it asks for.",
                "responses": {"200": {"description": "text/html"}},
            }
        },
        "/ui/{file}": {
            "get": {
                "summary": "The dashboard's static files (JavaScript, CSS), shipped in the package.",
                "parameters": [{"name": "file", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The file"}, "404": _json(_ERROR, "No such file.")},
            }
        },
        "/v1/proxies": {
            "get": {
                "summary": "Connected proxies: node, fleet, per-type ACKed version, last NACK, connected since.",
                "responses": {"200": _json({"type": "object", "required": ["proxies"], "properties": {"proxies": {"type": "array", "items": {"$ref": "#/components/schemas/Proxy"}}}}, "Proxies.")},
            }
        },
        "/v1/cluster": {
            "get": {
                "summary": "The replicas sharing this store (etcd), and the leader that runs the deployment workflow.",
                "description": "Without etcd: one replica, the leader. A replica's row vanishes within its lease TTL after it dies.",
                "responses": {
                    "200": _json({
                        "type": "object", "required": ["leader", "replicas"],
                        "properties": {
                            "leader": {"type": ["string", "null"], "description": "Replica id of the leader; null during an election."},
                            "replicas": {"type": "array", "items": {
                                "type": "object",
                                "required": ["id", "xds", "admin", "connected_proxies", "store_revision", "last_seen"],
                                "properties": {
                                    "id": {"type": "string"},
                                    "xds": {"type": "string", "description": "xDS address (HOST:PORT)"},
                                    "admin": {"type": "string", "description": "admin API address (HOST:PORT)"},
                                    "connected_proxies": {"type": "integer", "minimum": 0},
                                    "store_revision": {"type": "integer", "description": "config revision this replica has published"},
                                    "last_seen": {"type": "number", "description": "Unix time of its last heartbeat"},
                                    "workers": {"type": "array", "description": "Its xDS worker processes (docs/workers.md); empty when it serves xDS itself.", "items": {
                                        "type": "object", "required": ["worker", "pid", "ready", "connected_proxies", "restarts"],
                                        "properties": {
                                            "worker": {"type": "integer", "minimum": 0},
                                            "pid": {"type": ["integer", "null"], "description": "null before its first start"},
                                            "ready": {"type": "boolean", "description": "serving on the xDS port; false while it restarts"},
                                            "connected_proxies": {"type": "integer", "minimum": 0},
                                            "restarts": {"type": "integer", "minimum": 0, "description": "times it was restarted after dying"},
                                        },
                                    }},
                                },
                            }},
                        },
                    }, "Leader and replicas."),
                    "503": _json(_ERROR, "The state store is unreachable; the message names it."),
                },
            }
        },
        "/v1/endpoint-sources": {
            "get": {
                "summary": "The configured endpoint sources (file, DNS), what each owns, and how it fares.",
                "description": "A source owns the endpoints of its service/environment pairs: API writes to them answer 409 "
                               "naming it. A failed round keeps the last good endpoints (docs/endpoint-sources.md).",
                "responses": {
                    "200": _json({
                        "type": "object", "required": ["sources"],
                        "properties": {"sources": {"type": "array", "items": {
                            "type": "object",
                            "required": ["name", "kind", "allow_empty", "last_update", "last_error", "last_error_at", "errors", "owns"],
                            "properties": {
                                "name": {"type": "string"},
                                "kind": {"type": "string", "enum": ["file", "dns"]},
                                "allow_empty": {"type": "boolean"},
                                "last_update": {"type": ["string", "null"], "description": "Last successful round (ISO 8601)"},
                                "last_error": {"type": ["string", "null"], "description": "Error of the last round; null once a round succeeds"},
                                "last_error_at": {"type": ["string", "null"]},
                                "errors": {"type": "integer", "minimum": 0, "description": "Failed rounds since start"},
                                "owns": {"type": "array", "items": {
                                    "type": "object",
                                    "required": ["service", "environment", "endpoints", "reported_at", "applied_at", "pending"],
                                    "properties": {
                                        "service": {"type": "string"},
                                        "environment": {"type": "string", "enum": ["blue", "green"]},
                                        "endpoints": {"type": ["array", "null"], "description": "Last good endpoints; null: none yet"},
                                        "reported_at": {"type": ["string", "null"]},
                                        "applied_at": {"type": ["string", "null"], "description": "Last write to the store"},
                                        "pending": {"type": ["string", "null"], "description": "Why the last good set is not in the store yet"},
                                    },
                                }},
                            },
                            "additionalProperties": True,
                        }}},
                    }, "Every configured source (kind-specific fields: path, format, poll_seconds; name, type, port, interval_seconds, nameservers)."),
                },
            }
        },
    },
}


def _secure(document: dict[str, Any]) -> None:
    """Every operation names the role it needs (from the one table in auth.py) and the errors
    the security checks answer with."""
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            role = ROUTE_ROLES[(method.upper(), path)]
            if role is OPEN:
                op["security"] = []
                continue
            op["x-required-role"] = role.label
            op["description"] = (op.get("description", "") + f" Needs a token with role {role.label} or higher.").strip()
            responses = op.setdefault("responses", {})
            responses.setdefault("401", _json(_ERROR, "Missing or wrong bearer token."))
            responses.setdefault("403", _json(_ERROR, f"The token's role is below {role.label}; the message names the role needed."))
            responses.setdefault("421", _json(_ERROR, "The Host header names a host this admin API does not answer to (admin.hosts)."))
            if method in ("post", "put"):
                responses.setdefault("415", _json(_ERROR, "A body (or a Content-Type) other than application/json."))


_RELEASE = {"$ref": "#/components/schemas/Release"}
_RELEASE_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^release-[0-9]+$"},
               "description": "Release id, 'release-<n>'."}
_RELEASE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A release group (docs/releases.md): one deployment per member service, moved in lockstep.",
    "required": ["id", "status", "phase", "services", "members", "spec", "created_at", "updated_at", "history"],
    "properties": {
        "id": {"type": "string"},
        "status": {"type": "string", "enum": ["in_progress", "complete", "failed", "rolled_back"]},
        "phase": {"type": "string", "description": "deploying, ready, shifting, awaiting_promote, paused, baking while in progress; the status once over."},
        "services": {"type": "array", "items": {"type": "string"}},
        "members": {"type": "array", "items": {
            "type": "object",
            "required": ["service", "deployment", "version", "environment", "status", "step", "weights"],
            "properties": {
                "service": {"type": "string"}, "deployment": {"type": "string"}, "version": {"type": "string"},
                "environment": {"type": "string", "enum": ["blue", "green"]}, "status": {"type": "string"},
                "step": {"type": "integer"}, "baking": {"type": "boolean"}, "paused": {"type": "boolean"},
                "awaiting_promote": {"type": "boolean"}, "deadline": {"type": ["string", "null"]},
                "weights": {"type": "object", "properties": {"blue": {"type": "integer"}, "green": {"type": "integer"}}},
                "analysis": {"type": ["object", "null"]}, "reason": {"type": ["string", "null"]},
            },
        }},
        "spec": {"type": "object"},
        "created_at": {"type": "string"},
        "updated_at": {"type": "string"},
        "reason": {"type": ["string", "null"]},
        "history": {"type": "array", "items": {"type": "object", "required": ["at", "status", "actor", "reason"]}},
    },
}
_RELEASE_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["services"],
    "properties": {
        "services": {"type": "object", "minProperties": 2, "maxProperties": 32,
                     "description": "service name -> {version, endpoints} of its new version (2 to 32 services: each "
                                    "step is one store transaction). Leave endpoints out for a member whose idle "
                                    "environment an endpoint source owns: they come from the source (409 if given).",
                     "additionalProperties": {"type": "object", "required": ["version"],
                                              "properties": {"version": {"type": "string"}, "endpoints": {"type": "array"}}}},
        "strategy": {"type": "object"}, "smoke": {"type": "object", "description": "As a deployment's; a check or webhook may name "
                                                                                     "the member it tests with 'service' (none: every member)."},
        "analysis": {"type": "object"}, "decommission": {"type": "object"}, "convergence": {"type": "object"},
        "affinity": {"type": "object"},
    },
}
OPENAPI["components"]["schemas"]["Release"] = _RELEASE_SCHEMA
_RELEASE_ACTIONS = {
    "promote": "Every member to its next step (full=true: to 100 %; step=N: to that step), in one transaction.",
    "pause": "Stop the step or bake timer of every member; idempotent.",
    "resume": "Restart every member's timer with the time that was left; idempotent.",
    "rollback": "Every member 100 % back to the version it replaced, in one transaction (members still verifying fail).",
    "abort": "Before production traffic: every member failed. After: roll every member back.",
}
OPENAPI["paths"].update({
    "/v1/releases": {
        "get": {
            "summary": "Release groups, newest first.",
            "responses": {"200": _json({"type": "object", "required": ["releases"], "properties": {
                "releases": {"type": "array", "items": _RELEASE}}}, "Releases."), **_ERRORS},
        },
        "post": {
            "summary": "Release several services together: one deployment per member, smoke-tested, then shifted, judged and "
                       "rolled back in lockstep (every step is one store transaction, so one route-table version). "
                       "409 (naming it) if a member is deploying, held by another release or split by hand.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _RELEASE_REQUEST}}},
            "responses": {"202": _json({"type": "object", "required": ["id", "release"], "properties": {
                "id": {"type": "string"}, "release": _RELEASE}}, "Accepted; the members are being verified."), **_ERRORS},
        },
    },
    "/v1/releases/{id}": {
        "get": {
            "summary": "One release group: status, per-member state, weights and analysis, and its history.",
            "parameters": [_RELEASE_ID],
            "responses": {"200": _json(_RELEASE, "The release."), **_ERRORS},
        }
    },
    **{f"/v1/releases/{{id}}/{action}": {"post": {
        "summary": summary,
        "parameters": [_RELEASE_ID] + ([
            {"name": "full", "in": "query", "required": False, "schema": {"type": "string", "enum": ["true", "false"]}},
            {"name": "step", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}}] if action == "promote" else []),
        "responses": {"200": _json(_RELEASE, "The release after the command."), **_ERRORS},
    }} for action, summary in _RELEASE_ACTIONS.items()},
})

_secure(OPENAPI)
