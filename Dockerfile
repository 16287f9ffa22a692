# dotmac-gitops, built from this repository; the image runs the daemon.
#
#   docker build -t dotmac-gitops .
#   docker run --rm -p 9090:9090 -e DOTMAC_GIT_TOKEN=... dotmac-gitops \
#       daemon --repo https://git.example.net/platform/tenants.git --listen 0.0.0.0:9090 --auto-apply
#
# Stage 1 compiles the release binary (libgit2 and SQLite are built from vendored sources,
# TLS is rustls: no OpenSSL). Stage 2 is a small Debian with `git` and `ssh` (the daemon fetches
# remote repositories through the git command line) and CA certificates, running as a
# non-root user.

FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin dotmac-gitops \
 && strip target/release/dotmac-gitops

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends git openssh-client ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/dotmac --create-home dotmac \
 && mkdir -p /var/cache/dotmac-gitops \
 && chown dotmac:dotmac /var/cache/dotmac-gitops
COPY --from=build /src/target/release/dotmac-gitops /usr/local/bin/dotmac-gitops
USER 10001:10001
# Live stores and the embedded state (mount a volume here), and the clone cache.
ENV DOTMAC_STATE_DIR=/var/lib/dotmac/state \
    XDG_CACHE_HOME=/var/cache
EXPOSE 9090
ENTRYPOINT ["dotmac-gitops"]
CMD ["daemon", "--listen", "0.0.0.0:9090", "--log-format", "json"]
