# syntax=docker/dockerfile:1
# The Confab server image, and the default image of the Helm chart
# (helm/confab: repository "confab", tag = the chart's appVersion, which is
# the crate version):
#
#   docker build -t confab:0.1.0 .
#
# Runs `confab serve` as the non-root user 65532 (the UID the chart's pods
# run as). Settings come from CONFAB_* variables or flags after the image
# name, e.g.
#
#   docker run --rm --network host \
#     -e CONFAB_JWT_SECRET="$(head -c 32 /dev/urandom | base64)" \
#     -e CONFAB_PUBLIC_IP=203.0.113.7 confab:0.1.0
#
# Other subcommands: docker run --rm --entrypoint confab confab:0.1.0 token --help

ARG RUST_VERSION=1

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target caches speed up rebuilds; the binary is copied out
# of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin confab \
 && install -D -m 0755 target/release/confab /out/confab

# glibc and libgcc of Debian 12, like the builder; no shell, no package
# manager. The :nonroot tag's user is 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/confab /usr/local/bin/confab
USER 65532:65532
# Listen on every address: the server refuses to run without a JWT secret
# there (unless CONFAB_INSECURE=true), and binding all addresses also needs
# CONFAB_PUBLIC_IP, the address browsers reach the media port at.
ENV CONFAB_LISTEN=0.0.0.0:7880
# HTTP (web client, /ws, /healthz, /readyz, /metrics), the SFU's media port,
# the embedded STUN/TURN server (its relay ports are 49152-65535/udp).
EXPOSE 7880/tcp 7882/udp 3478/udp
ENTRYPOINT ["/usr/local/bin/confab", "serve"]
