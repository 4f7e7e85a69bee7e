# The listener's image built offline: the release binary and only what it needs at run time
# (its shared libraries, CA certificates, a user to run as), from a root file system that
# ci/image.sh stages from the host, so no base image has to be pulled (CI's machines reach no
# registry). With registry access, the Dockerfile at the top builds the same image from source.
#
#   ci/image.sh            # builds target/release/exchange-listener and the image
#
# The process is PID 1 and handles SIGTERM itself: `docker stop` and Kubernetes stop it
# cleanly (every mailbox unsubscribes, leases go back).
FROM scratch
COPY rootfs/ /
USER 10001:10001
ENV EXCHANGE_LISTENER_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/exchange-listener"]
