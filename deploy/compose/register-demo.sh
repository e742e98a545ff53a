#!/bin/sh
# Registers service "demo" with blue v1 and green v2 (fixed IPs: EDS endpoints are IP addresses).
set -eu
api="http://controlplane:18001"
auth="Authorization: Bearer $(cat /run/secrets/bluegreen_admin_token)"
until curl -fsS "$api/healthz" >/dev/null; do sleep 1; done
curl -fsS -X PUT -H "$auth" "$api/v1/services/demo" -d '{"domains": ["*"], "prefix": "/"}' >/dev/null
curl -fsS -X PUT -H "$auth" "$api/v1/services/demo/environments/blue" -d '{"version": "v1", "endpoints": ["172.28.0.11:8080"]}' >/dev/null
curl -fsS -X PUT -H "$auth" "$api/v1/services/demo/environments/green" -d '{"version": "v2", "endpoints": ["172.28.0.12:8080"]}' >/dev/null
echo "service demo registered: blue v1 takes 100 %, green v2 is on the preview port"
