#!/bin/sh
# System packages the test suite needs, installed only when missing (Debian), quietly:
# - PostgreSQL server binaries for the migration tests (the tests start their own server on a
#   free loopback port; nothing else is configured);
# - etcd (etcd-server, and etcd-client for etcdctl) for the etcd store and replica tests (the
#   tests start their own 3-member cluster on loopback ports; the packaged service is not used);
# - chromium and chromium-driver for the dashboard's browser tests (tests/test_ui.py);
# - prometheus (with promtool) for the Grafana dashboard, alert rules and PromQL analysis tests.
set -e
missing=""
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$missing postgresql"
[ -x /usr/bin/chromium ] || missing="$missing chromium"
[ -x /usr/bin/chromedriver ] || missing="$missing chromium-driver"
{ [ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ]; } || missing="$missing prometheus"
command -v etcd >/dev/null 2>&1 || missing="$missing etcd-server"
command -v etcdctl >/dev/null 2>&1 || missing="$missing etcd-client"
if [ -z "$missing" ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "missing system packages:$missing; run 'apt-get install$missing' as root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086  # one word per package
apt-get install -y -qq --no-install-recommends $missing >/dev/null
