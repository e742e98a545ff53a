#!/bin/sh
# System packages the test suite needs, installed only when missing (Debian):
# PostgreSQL server binaries for the migration tests (the tests start their own server on a
# free loopback port; nothing else is configured).
set -e
if ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "PostgreSQL server binaries are missing: run 'apt-get install postgresql' as root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
