# The listener's image, built from source on any machine that reaches a registry:
#
#   docker build -t exchange-listener .
#
# A Rust stage builds the release binary; the image itself holds only that binary, the C
# runtime it links against, and CA certificates (distroless), and runs as a non-root user. The
# process is PID 1 and handles SIGTERM itself: `docker stop` and Kubernetes stop it cleanly
# (every mailbox unsubscribes, leases go back). Without registry access, ci/image.sh builds the
# same image from the host (docker/offline.Dockerfile).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p exchange-listener \
 && install -m 0755 target/release/exchange-listener /exchange-listener

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /exchange-listener /usr/local/bin/exchange-listener
USER 10001:10001
ENV EXCHANGE_LISTENER_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/exchange-listener"]
