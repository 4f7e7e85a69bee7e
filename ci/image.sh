#!/usr/bin/env bash
# image.sh [TAG]: builds the release binary and the listener's image (default tag
# exchange-listener:dev) from a root file system staged on this host
# (docker/offline.Dockerfile); no registry needed.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-exchange-listener:dev}
ci/release-build.sh
ctx=target/image/listener
mkdir -p "$ctx"
ci/stage-rootfs.sh target/release/exchange-listener "$ctx"
docker build -q -t "$tag" -f docker/offline.Dockerfile "$ctx" >/dev/null
echo "built $tag"
