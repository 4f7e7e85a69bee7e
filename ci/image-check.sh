#!/usr/bin/env bash
# image-check.sh: the listener's image run for real. It starts, reaches a Redis container by
# name on a private Docker network (so name resolution works inside it), answers /readyz, and
# stops cleanly and promptly on `docker stop`. Both images are built from this host's files.
set -euo pipefail
cd "$(dirname "$0")/.."
docker info >/dev/null 2>&1 || {
    echo "image-check: no Docker engine answers; start one (or install docker.io) to check the image" >&2
    exit 1
}
run=$$
listener_image=exchange-listener:check
redis_image=exchange-listener-redis:check
net=el-check-$run
cleanup() {
    docker rm -f "el-listener-$run" "el-redis-$run" >/dev/null 2>&1 || true
    docker network rm "$net" >/dev/null 2>&1 || true
}
trap cleanup EXIT

ci/image.sh "$listener_image"
ci/stage-rootfs.sh "$(command -v redis-server)" target/image/redis
docker build -q -t "$redis_image" -f docker/redis.Dockerfile target/image/redis >/dev/null
echo "image-check: listener image $(docker image inspect -f '{{.Size}}' "$listener_image" | awk '{printf "%.1f MiB", $1/1048576}')"

docker network create "$net" >/dev/null
docker run -d --name "el-redis-$run" --network "$net" --network-alias redis "$redis_image" >/dev/null
docker run -d --name "el-listener-$run" --network "$net" -p 127.0.0.1::8080 \
    -e EXCHANGE_LISTENER_REDIS_URL=redis://redis:6379/0 \
    -e EXCHANGE_LISTENER_SECRET_KEY="$(head -c32 /dev/urandom | base64)" \
    -e PodName=exchangelistener-0 \
    "$listener_image" >/dev/null
port=$(docker port "el-listener-$run" 8080/tcp | head -n1 | sed 's/.*://')
base=http://127.0.0.1:$port

for _ in $(seq 1 60); do
    curl -sf "$base/readyz" >/dev/null 2>&1 && break
    sleep 0.5
done
if ! curl -sf "$base/readyz" >/dev/null; then
    echo "image-check: the container never became ready; its log:" >&2
    docker logs "el-listener-$run" >&2
    exit 1
fi
status=$(curl -sf "$base/api/listeners/status")
echo "image-check: ready, status $status"
case $status in
    *'"Replica":"exchangelistener-0"'*) ;;
    *) echo "image-check: the replica id is not the pod name" >&2; exit 1 ;;
esac

started=$(date +%s)
docker stop -t 30 "el-listener-$run" >/dev/null
took=$(( $(date +%s) - started ))
code=$(docker inspect -f '{{.State.ExitCode}}' "el-listener-$run")
if [ "$code" != 0 ] || [ "$took" -gt 20 ]; then
    echo "image-check: docker stop took ${took}s, exit code $code; its log:" >&2
    docker logs "el-listener-$run" >&2
    exit 1
fi
echo "image-check: stopped cleanly in ${took}s"
