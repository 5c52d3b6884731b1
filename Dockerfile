# pgcast in a container: `docker compose up` (see docker-compose.yml) runs it next to PostgreSQL.
# Not exercised by CI here (no Docker engine); `cargo test` is what CI runs.

# Build stage. The bookworm variant of rust:1, so that the binary links against the same glibc
# as the runtime image below.
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p pgcast

# Runtime stage: the binary and the CA bundle that `sslrootcert=system` (TLS to a managed
# PostgreSQL) verifies against.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /src/target/release/pgcast /usr/local/bin/pgcast
RUN useradd --system --no-create-home --uid 10001 pgcast
USER pgcast
EXPOSE 8080
# DATABASE_URL and PGCAST_JWT_SECRET come from the environment (every flag of `serve` has a
# variable).
ENTRYPOINT ["pgcast"]
CMD ["serve", "--listen", "0.0.0.0:8080", "--migrate"]
