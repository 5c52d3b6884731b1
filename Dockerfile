# pgcast in a container: `docker compose up` (see docker-compose.yml) runs it next to PostgreSQL.
# Not exercised by CI here (no Docker engine); `cargo test` is what CI runs.

# Build stage. The bookworm variant of rust:1, so that the binary links against the same glibc
# as the runtime image below.
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p pgcast

# Runtime stage: just the binary. TLS to PostgreSQL is not supported, so no CA bundle is needed.
FROM debian:bookworm-slim
COPY --from=builder /src/target/release/pgcast /usr/local/bin/pgcast
RUN useradd --system --no-create-home --uid 10001 pgcast
USER pgcast
EXPOSE 8080
# DATABASE_URL and PGCAST_JWT_SECRET come from the environment (every flag has a variable).
ENTRYPOINT ["pgcast"]
CMD ["serve", "--listen", "0.0.0.0:8080", "--migrate"]
