//! The command line without a database: validation errors are one line and a non-zero exit,
//! the printed configuration never shows a secret, and `token` mints verifiable tokens.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{pgcast, run, Run};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

const SECRET: &str = "s3cret-never-printed-and-32-bytes-long";
/// Too short to be accepted (16 bytes), and never printed either.
const SHORT_SECRET: &str = "s3cret-16-bytes!";
const SUB: &str = "6a0c5a7e-4b53-4d7e-9a57-0e3d1c0b6f10";
const PASSWORD: &str = "hunter2-never-printed";

fn url_with_password() -> String {
    format!("postgres://app:{PASSWORD}@127.0.0.1:1/shop")
}

/// A usage error: exit status 2, nothing on stdout, exactly one line on stderr naming `flag`.
fn assert_usage_error(out: &Run, flag: &str) {
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert_eq!(out.stderr.lines().count(), 1, "one line: {:?}", out.stderr);
    assert!(out.stderr.starts_with("error: "), "{}", out.stderr);
    assert!(out.stderr.contains(flag), "names {flag}: {}", out.stderr);
    assert_no_secrets(out);
}

fn assert_no_secrets(out: &Run) {
    for text in [&out.stdout, &out.stderr] {
        assert!(!text.contains(SECRET), "secret printed: {text}");
        assert!(!text.contains(SHORT_SECRET), "short secret printed: {text}");
        assert!(!text.contains(PASSWORD), "password printed: {text}");
    }
}

#[tokio::test]
async fn bad_values_are_one_line_and_a_non_zero_exit() {
    let url = url_with_password();
    let serve = |extra: &[&str]| {
        let mut cmd = pgcast(["serve", "--database-url", &url, "--jwt-secret", SECRET]);
        cmd.args(extra);
        cmd
    };
    assert_usage_error(&run(serve(&["--retention", "soon"])).await, "--retention");
    assert_usage_error(&run(serve(&["--retention", "0s"])).await, "--retention");
    assert_usage_error(&run(serve(&["--listen", "localhost"])).await, "--listen");
    assert_usage_error(
        &run(serve(&["--listen", "127.0.0.1:99999"])).await,
        "--listen",
    );

    // From the environment too.
    let mut cmd = serve(&[]);
    cmd.env("PGCAST_LISTEN", "nowhere");
    assert_usage_error(&run(cmd).await, "--listen");
    let mut cmd = pgcast(["doctor"]);
    cmd.env("DATABASE_URL", "mysql://root@db/shop");
    assert_usage_error(&run(cmd).await, "--database-url");

    // Missing required values.
    assert_usage_error(&run(pgcast(["doctor"])).await, "--database-url");
    let mut cmd = pgcast(["serve"]);
    cmd.env("DATABASE_URL", &url);
    assert_usage_error(&run(cmd).await, "--jwt-secret");

    // Subcommand-specific values.
    let mut cmd = pgcast(["tail", "--topic", "queue"]);
    cmd.env("DATABASE_URL", &url);
    assert_usage_error(&run(cmd).await, "--topic");
    let mut cmd = pgcast(["tail", "--since=-5"]);
    cmd.env("DATABASE_URL", &url);
    assert_usage_error(&run(cmd).await, "--since");
    assert_usage_error(
        &run(pgcast(["demo", "--simulate", "0"])).await,
        "--simulate",
    );
    assert_usage_error(
        &run(pgcast(["demo", "--simulate", "1e-20"])).await,
        "--simulate",
    );
    let mut cmd = pgcast(["serve", "--retention", "7000y"]);
    cmd.env("DATABASE_URL", &url)
        .env("PGCAST_JWT_SECRET", SECRET);
    assert_usage_error(&run(cmd).await, "--retention");
    let token = |role: &str| {
        pgcast([
            "token",
            "--jwt-secret",
            SECRET,
            "--sub",
            "6a0c5a7e-4b53-4d7e-9a57-0e3d1c0b6f10",
            "--role",
            role,
        ])
    };
    assert_usage_error(&run(token("admin")).await, "--role");
    let mut cmd = token("service");
    cmd.args(["--ttl", "forever"]);
    assert_usage_error(&run(cmd).await, "--ttl");
}

#[tokio::test]
async fn printed_configuration_hides_the_secret_and_the_password() {
    // Through flags.
    let url = url_with_password();
    let out = run(pgcast([
        "serve",
        "--database-url",
        &url,
        "--jwt-secret",
        SECRET,
    ]))
    .await;
    assert_eq!(out.code, Some(1), "serve is not wired yet: {}", out.stderr);
    assert!(
        out.stderr.starts_with(
            "pgcast serve listen=127.0.0.1:8080 database=postgres://app:<redacted>@127.0.0.1:1/shop \
             jwt_secret=<redacted> retention=1day migrate=false header_timeout=10s max_connections_per_ip=1000 connection_rate_per_ip=20 \
             connection_burst_per_ip=100 max_unauthenticated=5000 max_unauthenticated_per_ip=250 \
             max_frame_bytes=64KiB frame_timeout=10s outbound_bytes=16MiB outbound_bytes_total=1GiB \
             replay_window=10000 \
             max_concurrent_reads=8 allowed_origins=any max_connections=20000 \
             max_subscriptions=32 client_frames_per_second=50 auth_timeout=10s \
             heartbeat_interval=20s snapshot_limit=10000 replay_scan_limit=1000000\n"
        ),
        "{}",
        out.stderr
    );
    assert_no_secrets(&out);

    // Through the environment, and in --help, which shows variables.
    for args in [
        &["serve"][..],
        &["serve", "--help"][..],
        &["migrate", "--help"][..],
    ] {
        let mut cmd = pgcast([]);
        cmd.args(args)
            .env("DATABASE_URL", &url)
            .env("PGCAST_JWT_SECRET", SECRET)
            .env("PGCAST_RETENTION", "90m")
            .env("PGCAST_LISTEN", "127.0.0.1:0")
            .env("PGCAST_MIGRATE", "true");
        let out = run(cmd).await;
        assert_no_secrets(&out);
        if args.len() == 1 {
            assert!(
                out.stderr.contains("listen=127.0.0.1:0")
                    && out.stderr.contains("retention=1h 30m")
                    && out.stderr.contains("migrate=true"),
                "environment read: {}",
                out.stderr
            );
        }
    }

    // Commands that connect and fail.
    for command in ["migrate", "doctor"] {
        let mut cmd = pgcast([command]);
        cmd.env("DATABASE_URL", &url);
        let out = run(cmd).await;
        assert_eq!(out.code, Some(1), "{}", out.stderr);
        assert!(out.stderr.contains("<redacted>"), "{}", out.stderr);
        assert_no_secrets(&out);
    }
}

fn decode(token: &str, secret: &str) -> jsonwebtoken::errors::Result<Value> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    jsonwebtoken::decode::<Value>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .map(|data| data.claims)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

#[tokio::test]
async fn token_prints_only_a_verifiable_token() {
    let sub = "6a0c5a7e-4b53-4d7e-9a57-0e3d1c0b6f10";
    let workshop = "1f7d3f0e-2c1b-4e55-8a9e-3b2c1d0e9f87";
    let mut cmd = pgcast([
        "token",
        "--sub",
        sub,
        "--role",
        "mechanic",
        "--workshop",
        workshop,
        "--ttl",
        "2h",
    ]);
    cmd.env("PGCAST_JWT_SECRET", SECRET);
    let out = run(cmd).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    let lines: Vec<_> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.stdout);

    let claims = decode(lines[0], SECRET).expect("valid token");
    assert_eq!(claims["sub"], sub);
    assert_eq!(claims["role"], "mechanic");
    assert_eq!(claims["workshop_id"], workshop);
    let exp = claims["exp"].as_i64().expect("exp");
    assert!((exp - (now() + 7200)).abs() <= 60, "exp {exp}");
    assert!(decode(lines[0], "another secret").is_err());

    // Default ttl 1h, no workshop claim.
    let out = run(pgcast([
        "token",
        "--jwt-secret",
        SECRET,
        "--sub",
        sub,
        "--role",
        "service",
    ]))
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let claims = decode(out.stdout.trim_end(), SECRET).expect("valid token");
    assert_eq!(claims["role"], "service");
    assert!(claims.get("workshop_id").is_none(), "{claims}");
    let exp = claims["exp"].as_i64().expect("exp");
    assert!((exp - (now() + 3600)).abs() <= 60, "exp {exp}");
}

#[tokio::test]
async fn token_refuses_a_workshop_for_other_roles() {
    let out = run(pgcast([
        "token",
        "--jwt-secret",
        SECRET,
        "--sub",
        "6a0c5a7e-4b53-4d7e-9a57-0e3d1c0b6f10",
        "--role",
        "customer",
        "--workshop",
        "1f7d3f0e-2c1b-4e55-8a9e-3b2c1d0e9f87",
    ]))
    .await;
    // Flags that parse but do not go together: a bad command line, as clap's own refusals.
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stdout.is_empty());
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("--workshop"), "{}", out.stderr);
}

#[tokio::test]
async fn short_secrets_are_refused_before_anything_binds() {
    // A port we hold: had serve got as far as binding, it would fail with "could not listen"
    // and exit status 1; had it got as far as the database, also 1.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let listen = held.local_addr().expect("address").to_string();
    let url = url_with_password();
    let out = run(pgcast([
        "serve",
        "--database-url",
        &url,
        "--listen",
        &listen,
        "--jwt-secret",
        SHORT_SECRET,
    ]))
    .await;
    assert_usage_error(&out, "--jwt-secret");
    assert!(
        out.stderr.contains("16 bytes") && out.stderr.contains("at least 32"),
        "says why: {}",
        out.stderr
    );
    assert!(!out.stderr.contains("pgcast serve"), "{}", out.stderr);

    // The same from the environment, and for every command that takes a secret.
    let mut cmd = pgcast(["serve"]);
    cmd.env("DATABASE_URL", &url)
        .env("PGCAST_LISTEN", &listen)
        .env("PGCAST_JWT_SECRET", SHORT_SECRET);
    assert_usage_error(&run(cmd).await, "--jwt-secret");
    let mut cmd = pgcast(["token", "--sub", SUB, "--role", "service"]);
    cmd.env("PGCAST_JWT_SECRET", SHORT_SECRET);
    assert_usage_error(&run(cmd).await, "--jwt-secret");
    // 31 bytes are not enough; 32 are.
    let token = |secret: &str| {
        pgcast([
            "token",
            "--jwt-secret",
            secret,
            "--sub",
            SUB,
            "--role",
            "service",
        ])
    };
    assert_eq!(run(token(&"k".repeat(31))).await.code, Some(2));
    assert_eq!(run(token(&"k".repeat(32))).await.code, Some(0));
    drop(held);
}

#[tokio::test]
async fn token_lifetimes_are_capped_at_30_days() {
    let token = |ttl: &str| {
        pgcast([
            "token",
            "--jwt-secret",
            SECRET,
            "--sub",
            SUB,
            "--role",
            "service",
            "--ttl",
            ttl,
        ])
    };
    for too_long in ["100y", "31d", "30d 1s"] {
        let out = run(token(too_long)).await;
        assert_usage_error(&out, "--ttl");
        assert!(out.stderr.contains("at most 30 days"), "{}", out.stderr);
    }
    let out = run(token("30d")).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let claims = decode(out.stdout.trim_end(), SECRET).expect("valid token");
    let exp = claims["exp"].as_i64().expect("exp");
    assert!((exp - (now() + 30 * 86_400)).abs() <= 60, "exp {exp}");
}

#[tokio::test]
async fn token_stamps_issuer_and_audience() {
    let issuer = "https://id.example";
    let audience = "pgcast-prod";
    let bound = |iss: &str, aud: &str| {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.set_issuer(&[iss]);
        validation.set_audience(&[aud]);
        validation
    };
    let verify = |token: &str, validation: &Validation| {
        jsonwebtoken::decode::<Value>(
            token,
            &DecodingKey::from_secret(SECRET.as_bytes()),
            validation,
        )
        .map(|data| data.claims)
    };

    // Through flags.
    let out = run(pgcast([
        "token",
        "--jwt-secret",
        SECRET,
        "--sub",
        SUB,
        "--role",
        "service",
        "--jwt-issuer",
        issuer,
        "--jwt-audience",
        audience,
    ]))
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let token = out.stdout.trim_end();
    let claims = verify(token, &bound(issuer, audience)).expect("bound token");
    assert_eq!(claims["iss"], issuer);
    assert_eq!(claims["aud"], audience);
    assert_eq!(claims["sub"], SUB);
    assert!(verify(token, &bound("https://evil.example", audience)).is_err());
    assert!(verify(token, &bound(issuer, "another-service")).is_err());

    // Through the environment (what `serve` reads too).
    let mut cmd = pgcast(["token", "--sub", SUB, "--role", "customer"]);
    cmd.env("PGCAST_JWT_SECRET", SECRET)
        .env("PGCAST_JWT_ISSUER", issuer)
        .env("PGCAST_JWT_AUDIENCE", audience);
    let out = run(cmd).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let claims = verify(out.stdout.trim_end(), &bound(issuer, audience)).expect("bound token");
    assert_eq!(claims["role"], "customer");

    // Without them, no such claims.
    let out = run(pgcast([
        "token",
        "--jwt-secret",
        SECRET,
        "--sub",
        SUB,
        "--role",
        "service",
    ]))
    .await;
    let claims = decode(out.stdout.trim_end(), SECRET).expect("valid token");
    assert!(
        claims.get("iss").is_none() && claims.get("aud").is_none(),
        "{claims}"
    );

    // An empty value is a usage error, not a token nobody accepts.
    let out = run(pgcast([
        "token",
        "--jwt-secret",
        SECRET,
        "--sub",
        SUB,
        "--role",
        "service",
        "--jwt-audience",
        "",
    ]))
    .await;
    assert_usage_error(&out, "--jwt-audience");
}

#[tokio::test]
async fn serve_shows_issuer_and_audience_in_its_summary() {
    let url = url_with_password();
    let out = run(pgcast([
        "serve",
        "--database-url",
        &url,
        "--jwt-secret",
        SECRET,
        "--jwt-issuer",
        "https://id.example",
        "--jwt-audience",
        "pgcast-prod",
    ]))
    .await;
    // The database is unreachable: the summary is printed, then the connection fails.
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.starts_with(
            "pgcast serve listen=127.0.0.1:8080 database=postgres://app:<redacted>@127.0.0.1:1/shop \
             jwt_secret=<redacted> jwt_issuer=https://id.example jwt_audience=pgcast-prod \
             retention=1day migrate=false header_timeout=10s max_connections_per_ip=1000 connection_rate_per_ip=20 \
             connection_burst_per_ip=100 max_unauthenticated=5000 max_unauthenticated_per_ip=250 \
             max_frame_bytes=64KiB frame_timeout=10s outbound_bytes=16MiB outbound_bytes_total=1GiB \
             replay_window=10000 \
             max_concurrent_reads=8 allowed_origins=any max_connections=20000 \
             max_subscriptions=32 client_frames_per_second=50 auth_timeout=10s \
             heartbeat_interval=20s snapshot_limit=10000 replay_scan_limit=1000000\n"
        ),
        "{}",
        out.stderr
    );
    assert_no_secrets(&out);
}

/// Every flag of `serve` is in its `--help` with its environment variable, and in the README's
/// configuration table.
#[tokio::test]
async fn every_serve_flag_is_in_help_and_the_readme() {
    const README: &str = include_str!("../../../README.md");
    let out = run(pgcast(["serve", "--help"])).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let flags: Vec<&str> = out
        .stdout
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches([',', '.', ')', ':', ';']))
        .filter(|w| !matches!(*w, "--help" | "--version"))
        .collect();
    assert!(flags.len() > 20, "{}", out.stdout);
    for flag in flags {
        assert!(
            README.contains(&format!("`{flag}")),
            "{flag} is not in the README's configuration table"
        );
    }
    for env in [
        "PGCAST_OUTBOUND_BYTES",
        "PGCAST_REPLAY_WINDOW",
        "PGCAST_MAX_CONCURRENT_READS",
        "PGCAST_ALLOWED_ORIGINS",
        "PGCAST_MAX_CONNECTIONS",
        "PGCAST_MAX_SUBSCRIPTIONS",
        "PGCAST_CLIENT_FRAMES_PER_SECOND",
        "PGCAST_AUTH_TIMEOUT",
        "PGCAST_HEARTBEAT_INTERVAL",
        "PGCAST_SNAPSHOT_LIMIT",
    ] {
        assert!(out.stdout.contains(env), "{env} missing from --help");
        assert!(README.contains(env), "{env} missing from the README");
    }
}
