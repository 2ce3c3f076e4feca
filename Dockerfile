# roost homeserver image. Build: `docker build -t roost .` from the repository root.
# Run:   docker run -d --name roost -p 4433:4433/udp -v roost-data:/var/lib/roost roost
# With a configuration file: -v /etc/roost:/etc/roost:ro and append
#   serve --config /etc/roost/roost.toml --data /var/lib/roost
# (see README.md "Deploy").

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p roost-server -p roost-cli

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/roost \
       --shell /usr/sbin/nologin roost \
    && mkdir -p /var/lib/roost \
    && chown roost:roost /var/lib/roost \
    && chmod 0700 /var/lib/roost
COPY --from=build /src/target/release/roost /usr/local/bin/roost
COPY --from=build /src/target/release/roost-cli /usr/local/bin/roost-cli
USER roost
VOLUME ["/var/lib/roost"]
# QUIC for clients and peers; /metrics and /health over HTTP.
EXPOSE 4433/udp 9090/tcp
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["curl", "--fail", "--silent", "--max-time", "4", "http://127.0.0.1:9090/health"]
ENTRYPOINT ["roost"]
CMD ["serve", "--data", "/var/lib/roost", "--listen", "0.0.0.0:4433", "--metrics", "0.0.0.0:9090"]
