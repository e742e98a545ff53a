#!/bin/sh
# Builds the Go programs of the peer comparison into bench/.bin/ (gitignored):
#   bench/.bin/gcp    the go-control-plane peer server (bench/peers/gcp)
#   bench/.bin/simgo  the Go fleet simulator (bench/simgo)
# Modules come from the Go module proxy, pinned by each go.sum. Never run by the tests or CI.
set -eu
bench=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$bench/.bin"
(cd "$bench/peers/gcp" && go build -trimpath -o "$bench/.bin/gcp" .)
(cd "$bench/simgo" && go build -trimpath -o "$bench/.bin/simgo" .)
echo "built $bench/.bin/gcp $bench/.bin/simgo"
