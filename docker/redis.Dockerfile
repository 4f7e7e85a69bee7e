# A Redis image for tests and the harness, from the host's redis-server (no registry needed):
# ci/image-check.sh builds it with the root file system ci/stage-rootfs.sh lays out.
FROM scratch
COPY rootfs/ /
USER 10001:10001
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", "/tmp"]
