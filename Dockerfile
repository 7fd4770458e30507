# syntax=docker/dockerfile:1
# KeyCycleProxy (kcp) container image: a release build of kcp-server on a distroless,
# non-root runtime (glibc and CA certificates, no shell, no curl).
#
#   docker build -t kcp .
#   docker run -p 8080:8080 -e OPENAI_KEYS=sk-... -e KCP_AUTH__CLIENT_KEYS=a-long-token kcp
#
# The image's config (/etc/kcp/config.toml, from deploy/kcp/config.toml) binds 0.0.0.0:8080
# for clients and 0.0.0.0:9090 for /metrics and the status page. Reachable from outside its
# loopback, the proxy is open to anyone who can reach it unless clients must present a token:
# set KCP_AUTH__CLIENT_KEYS (or mount a config with [auth] client_keys). Mount your own
# config over /etc/kcp/config.toml; `docker kill -s HUP` reloads it.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p kcp-server \
    && install -D -m 0755 target/release/kcp-server /out/kcp-server

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/kcp-server /usr/local/bin/kcp-server
COPY deploy/kcp/config.toml /etc/kcp/config.toml
USER nonroot:nonroot
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
# The binary asks its own /health; no curl in the image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/kcp-server", "healthcheck", "--addr", "127.0.0.1:8080"]
ENTRYPOINT ["/usr/local/bin/kcp-server"]
CMD ["--config", "/etc/kcp/config.toml"]
