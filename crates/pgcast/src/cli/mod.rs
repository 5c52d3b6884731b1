//! The command line (`README.md#commands`, `README.md#configuration`): one typed struct per
//! subcommand, each flag also readable from its environment variable where the README names
//! one. Parsing validates every value, so a bad one is reported before anything connects or
//! binds.
//!
//! Each struct's `Display` is the configuration summary printed at start: secrets and database
//! passwords show as `<redacted>`.
//!
//! One file per group of flags: [`database`] (URLs and the secret), [`identity`] (token
//! verification), [`serve`] (`serve` and `demo`), [`tools`] (the operator commands).

use std::fmt;

use clap::{Parser, Subcommand};

mod database;
mod identity;
mod serve;
mod tools;

pub use database::*;
pub(crate) use identity::*;
pub use serve::*;
pub use tools::*;

/// pgcast: PostgreSQL changes of session_assignments, delivered as typed events to WebSocket
/// clients, with nothing lost.
#[derive(Debug, Parser)]
#[command(name = "pgcast", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr: `text` (for people; coloured only when stderr is a terminal) or
    /// `json` (one object per line with timestamp, level, target, message, fields and spans,
    /// for log shippers).
    #[arg(
        long,
        global = true,
        env = "PGCAST_LOG_FORMAT",
        default_value = "text",
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands. Parsed once per process, so `serve`'s many flags making one variant large
/// costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the listener and the WebSocket gateway against a database.
    Serve(ServeArgs),
    /// Start a local PostgreSQL with demo data and serve it (the quickest way to try pgcast).
    Demo(DemoArgs),
    /// Apply pending migrations.
    Migrate(MigrateArgs),
    /// Check the realtime objects, the NOTIFY queue, the event log and listeners; exits
    /// non-zero when unhealthy.
    Doctor(DoctorArgs),
    /// Print typed events as JSON lines (the wire `event` frame), from a position or live.
    Tail(TailArgs),
    /// Mint a JWT for a user (prints only the token).
    Token(TokenArgs),
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Serve(a) => a.fmt(f),
            Command::Demo(a) => a.fmt(f),
            Command::Migrate(a) => a.fmt(f),
            Command::Doctor(a) => a.fmt(f),
            Command::Tail(a) => a.fmt(f),
            Command::Token(a) => a.fmt(f),
        }
    }
}

/// Flags whose values must never be printed, not even when they are refused: a secret that is
/// too short, or a connection string with a password and a typo, is still someone's secret.
const HIDDEN_VALUES: [&str; 3] = ["--jwt-secret", "--database-url", "--listen-database-url"];

/// Renders a clap error as one line (`error: … for '--retention <DURATION>': …`), without the
/// usage block and the "try --help" hint that clap appends. A refused value of
/// `--jwt-secret` or `--database-url` shows as `<redacted>`, and so does an unexpected
/// argument's value: a connection string or secret given without its flag (or after a
/// mistyped one) is still someone's secret. An unexpected flag's name is shown.
pub fn one_line_error(err: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let mut text = err.to_string();
    if let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        err.get(ContextKind::InvalidArg),
        err.get(ContextKind::InvalidValue),
    ) {
        if HIDDEN_VALUES
            .iter()
            .any(|flag| arg.split_whitespace().next() == Some(flag))
        {
            text = text.replace(&format!("'{value}'"), "'<redacted>'");
        }
    }
    if err.kind() == ErrorKind::UnknownArgument {
        if let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) {
            let shown = match arg.split_once('=') {
                Some((flag, _)) if flag.starts_with('-') => format!("{flag}=<redacted>"),
                _ if arg.starts_with('-') => arg.clone(),
                _ => "<redacted>".to_owned(),
            };
            text = text.replace(&format!("'{arg}'"), &format!("'{shown}'"));
        }
    }
    let first_paragraph = text.split("\n\n").next().unwrap_or_default();
    first_paragraph
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Limits;
    use clap::CommandFactory;
    use pgcast_gateway::{Algorithm, RoleMap};
    use std::time::Duration;

    const SECRET: &str = "s3cret-of-at-least-thirty-two-bytes";
    const SUB: &str = "6a0c5a7e-4b53-4d7e-9a57-0e3d1c0b6f10";

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn summaries_redact_secrets() {
        let cli = Cli::try_parse_from([
            "pgcast",
            "serve",
            "--database-url",
            "postgres://app:hunter2@db/shop",
            "--jwt-secret",
            SECRET,
        ])
        .unwrap();
        let shown = cli.command.to_string();
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
        assert!(shown.contains("listen=127.0.0.1:8080"), "{shown}");
        assert!(shown.contains("retention=1day"), "{shown}");
        assert!(!format!("{cli:?}").contains("hunter2"));
        assert!(!format!("{cli:?}").contains("s3cret"));
    }

    #[test]
    fn limit_flags_default_to_the_limits_defaults_and_show_in_the_summary() {
        let parse = |extra: &[&str]| {
            let mut args = vec![
                "pgcast",
                "serve",
                "--database-url",
                "postgres://app@db/shop",
                "--jwt-secret",
                SECRET,
            ];
            args.extend(extra);
            match Cli::try_parse_from(args).unwrap().command {
                Command::Serve(serve) => serve,
                _ => unreachable!(),
            }
        };
        let serve = parse(&[]);
        // The flags' defaults are the library's defaults.
        assert_eq!(
            format!("{:?}", serve.limits.limits()),
            format!("{:?}", Ok::<_, String>(Limits::default()))
        );
        let shown = serve.to_string();
        assert!(
            shown.contains(
                "header_timeout=10s max_connections_per_ip=1000 connection_rate_per_ip=20 \
                 connection_burst_per_ip=100 max_unauthenticated=5000 \
                 max_unauthenticated_per_ip=250 max_frame_bytes=64KiB frame_timeout=10s"
            ),
            "{shown}"
        );
        let serve = parse(&["--max-connections-per-ip", "0", "--max-frame-bytes", "1MiB"]);
        let shown = serve.to_string();
        assert!(shown.contains("max_connections_per_ip=off"), "{shown}");
        assert!(shown.contains("max_frame_bytes=1MiB"), "{shown}");
        let serve = parse(&[
            "--max-unauthenticated",
            "10",
            "--max-unauthenticated-per-ip",
            "10",
        ]);
        let err = serve.limits.limits().unwrap_err();
        assert!(err.contains("--max-unauthenticated-per-ip (10)"), "{err}");
        for (flag, bad) in [
            ("--header-timeout", "0s"),
            ("--header-timeout", "2h"),
            ("--frame-timeout", "soon"),
            ("--max-frame-bytes", "1KiB"),
            ("--connection-burst-per-ip", "0"),
            ("--max-unauthenticated", "0"),
            ("--max-connections-per-ip", "1.5"),
            ("--connection-rate-per-ip", "fast"),
        ] {
            let err = Cli::try_parse_from([
                "pgcast",
                "serve",
                "--database-url",
                "postgres://app@db/shop",
                "--jwt-secret",
                SECRET,
                flag,
                bad,
            ])
            .unwrap_err();
            assert_eq!(err.exit_code(), 2, "{flag} {bad}");
            assert!(one_line_error(&err).contains(flag), "{flag} {bad}");
        }
    }

    #[test]
    fn summaries_show_issuer_and_audience() {
        for command in ["serve", "token"] {
            let mut args = vec!["pgcast", command, "--jwt-secret", SECRET];
            if command == "serve" {
                args.extend(["--database-url", "postgres://app@db/shop"]);
            } else {
                args.extend(["--sub", SUB, "--role", "service"]);
            }
            args.extend([
                "--jwt-issuer",
                "https://id.example",
                "--jwt-audience",
                "pgcast",
            ]);
            let shown = Cli::try_parse_from(args).unwrap().command.to_string();
            assert!(
                shown.contains(" jwt_issuer=https://id.example jwt_audience=pgcast"),
                "{shown}"
            );
        }
    }

    #[test]
    fn refused_secrets_are_not_echoed() {
        let short = "sixteen-byte-key";
        let err = Cli::try_parse_from(["pgcast", "token", "--jwt-secret", short, "--sub", SUB])
            .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert_eq!(err.exit_code(), 2);
        let line = one_line_error(&err);
        assert!(!line.contains(short), "{line}");
        assert!(
            line.starts_with("error: invalid value '<redacted>' for '--jwt-secret <SECRET>'"),
            "{line}"
        );
        assert!(line.contains("at least 32"), "{line}");
        let err = Cli::try_parse_from([
            "pgcast",
            "doctor",
            "--database-url",
            "postgres://app:hunter2@:5432/shop",
        ])
        .unwrap_err();
        let line = one_line_error(&err);
        assert!(!line.contains("hunter2"), "{line}");
        assert!(line.contains("--database-url"), "{line}");
        // Other values are still shown: they help and are not secret.
        let err = Cli::try_parse_from([
            "pgcast",
            "token",
            "--jwt-secret",
            SECRET,
            "--sub",
            SUB,
            "--role",
            "service",
            "--ttl",
            "100y",
        ])
        .unwrap_err();
        let line = one_line_error(&err);
        assert!(line.contains("'100y'") && line.contains("--ttl"), "{line}");
    }

    #[test]
    fn unexpected_arguments_are_not_echoed() {
        // A connection string without its flag.
        let url = "postgres://app:hunter2@db/shop";
        let err = Cli::try_parse_from(["pgcast", "doctor", url]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
        let line = one_line_error(&err);
        assert!(!line.contains("hunter2"), "{line}");
        assert!(line.contains("'<redacted>'"), "{line}");
        // A mistyped flag with its value: the flag is named, the value is not.
        let err =
            Cli::try_parse_from(["pgcast", "token", &format!("--jwt-secrt={SECRET}")]).unwrap_err();
        let line = one_line_error(&err);
        assert!(!line.contains(SECRET), "{line}");
        assert!(line.contains("--jwt-secrt"), "{line}");
        // A mistyped flag alone is shown as it is.
        let err = Cli::try_parse_from(["pgcast", "tail", "--sinse", "3"]).unwrap_err();
        let line = one_line_error(&err);
        assert!(line.contains("'--sinse'"), "{line}");
    }

    #[test]
    fn errors_fit_on_one_line() {
        let err =
            Cli::try_parse_from(["pgcast", "token", "--jwt-secret", SECRET, "--role", "admin"])
                .unwrap_err();
        let line = one_line_error(&err);
        assert!(!line.contains('\n'));
        assert!(line.starts_with("error:"), "{line}");
        // (No flag here has an environment variable, so the outcome does not depend on it.)
        let err = Cli::try_parse_from([
            "pgcast",
            "token",
            "--jwt-secret",
            SECRET,
            "--role",
            "service",
        ])
        .unwrap_err();
        let line = one_line_error(&err);
        assert!(line.contains("--sub"), "{line}");
    }

    /// An Ed25519 public key (RFC 8410 §10.1).
    const ED25519_PEM: &str = "-----BEGIN PUBLIC KEY-----\n\
        MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n\
        -----END PUBLIC KEY-----\n";

    fn serve_with(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
        let mut args = vec![
            "pgcast",
            "serve",
            "--database-url",
            "postgres://app@db/shop",
        ];
        args.extend(extra);
        Cli::try_parse_from(args).map(|cli| match cli.command {
            Command::Serve(serve) => serve,
            _ => unreachable!(),
        })
    }

    #[test]
    fn exactly_one_key_source_is_required() {
        let err = serve_with(&[]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let line = one_line_error(&err);
        for flag in ["--jwt-secret", "--jwt-public-key", "--jwt-jwks-url"] {
            assert!(line.contains(flag), "{line}");
        }
        let err = serve_with(&[
            "--jwt-secret",
            SECRET,
            "--jwt-jwks-url",
            "https://id.example/jwks.json",
        ])
        .unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let line = one_line_error(&err);
        assert!(line.contains("cannot be used with"), "{line}");
        assert!(!line.contains(SECRET), "{line}");
    }

    #[test]
    fn identity_flags_reach_the_gateway_and_the_summary() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("idp.pem");
        std::fs::write(&pem, ED25519_PEM).unwrap();
        let serve = serve_with(&[
            "--jwt-public-key",
            pem.to_str().unwrap(),
            "--claim-role",
            "/realm_access/roles",
            "--claim-workshop",
            "/https:~1~1garage.example~1workshop",
            "--role-map",
            "garage-mechanic=mechanic,backend=service",
        ])
        .unwrap();
        let gateway = serve.gateway_limits().unwrap().gateway;
        let key = gateway.jwt_public_key.as_ref().unwrap();
        assert_eq!(key.algorithm(), Algorithm::EdDSA);
        assert!(gateway.jwt_jwks.is_none() && gateway.jwt_secret.is_empty());
        assert_eq!(gateway.jwt_claims.role.as_str(), "/realm_access/roles");
        assert_eq!(
            gateway.jwt_claims.roles,
            RoleMap::parse("garage-mechanic=mechanic,backend=service").unwrap()
        );
        pgcast_gateway::TokenVerifier::from_config(&gateway).unwrap();
        let shown = serve.to_string();
        assert!(
            shown.contains(&format!(
                "jwt_public_key={} jwt_algorithm=EdDSA claim_sub=/sub \
                 claim_role=/realm_access/roles \
                 claim_workshop=/https:~1~1garage.example~1workshop \
                 role_map=garage-mechanic=mechanic,backend=service",
                pem.display()
            )),
            "{shown}"
        );

        let serve = serve_with(&[
            "--jwt-jwks-url",
            "https://id.example/.well-known/jwks.json",
            "--jwt-jwks-min-refresh",
            "5s",
            "--jwt-algorithm",
            "ES256",
            "--jwt-issuer",
            "https://id.example/",
        ])
        .unwrap();
        let gateway = serve.gateway_limits().unwrap().gateway;
        let jwks = gateway.jwt_jwks.as_ref().unwrap();
        assert_eq!(jwks.url(), "https://id.example/.well-known/jwks.json");
        assert_eq!(jwks.settings().min_refresh, Duration::from_secs(5));
        assert_eq!(jwks.settings().max_age, Duration::from_secs(600));
        assert_eq!(jwks.settings().algorithm, Some(Algorithm::ES256));
        let shown = serve.to_string();
        assert!(
            shown.contains(
                "jwt_jwks_url=https://id.example/.well-known/jwks.json \
                 jwt_issuer=https://id.example/ jwt_algorithm=ES256 jwt_jwks_max_age=10m \
                 jwt_jwks_min_refresh=5s claim_sub=/sub claim_role=/role \
                 claim_workshop=/workshop_id role_map=none"
            ),
            "{shown}"
        );

        // A secret with pgcast's own claims: nothing more to say.
        let shown = serve_with(&["--jwt-secret", SECRET]).unwrap().to_string();
        assert!(
            shown.contains("jwt_secret=<redacted> retention="),
            "{shown}"
        );
        let shown = serve_with(&["--jwt-secret", SECRET, "--claim-sub", "/uid"])
            .unwrap()
            .to_string();
        assert!(
            shown.contains(
                "jwt_secret=<redacted> jwt_algorithm=HS256 claim_sub=/uid claim_role=/role \
                 claim_workshop=/workshop_id role_map=none retention="
            ),
            "{shown}"
        );
    }

    #[test]
    fn bad_identity_values_exit_2_with_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("private.pem");
        std::fs::write(
            &private,
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
             -----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let huge = dir.path().join("huge.pem");
        std::fs::write(&huge, vec![b'A'; 100 << 10]).unwrap();
        for (flag, bad, why) in [
            ("--jwt-public-key", "/nonexistent/idp.pem", "cannot read"),
            ("--jwt-public-key", private.to_str().unwrap(), "private key"),
            ("--jwt-public-key", huge.to_str().unwrap(), "64 KiB"),
            ("--jwt-jwks-url", "ftp://id.example/jwks", "http"),
            ("--jwt-jwks-url", "jwks.json", "URL"),
            (
                "--jwt-jwks-url",
                "https://u:p@id.example/jwks",
                "credentials",
            ),
            ("--jwt-algorithm", "HS256", "HMAC"),
            ("--jwt-algorithm", "none", "RS256"),
            ("--jwt-jwks-min-refresh", "2h", "1h"),
            ("--jwt-jwks-max-age", "0s", "zero"),
            ("--jwt-jwks-max-age", "30d", "7d"),
            ("--claim-sub", "sub", "JSON pointer"),
            ("--claim-role", "/a~2", "~0"),
            ("--claim-workshop", "", "JSON pointer"),
            ("--role-map", "admin=root", "not a pgcast role"),
            ("--role-map", "a=service,a=mechanic", "twice"),
        ] {
            let mut args = vec![flag, bad];
            // A key source, unless the flag is one.
            if !matches!(flag, "--jwt-public-key" | "--jwt-jwks-url") {
                args.extend(["--jwt-secret", SECRET]);
            }
            let err = serve_with(&args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{flag} {bad}");
            let line = one_line_error(&err);
            assert!(
                line.contains(flag) && line.contains(why),
                "{flag} {bad}: {line}"
            );
            assert!(!line.contains('\n'));
        }
        // Flags that parse but do not go together: refused before anything starts.
        let serve = serve_with(&["--jwt-secret", SECRET, "--jwt-algorithm", "RS256"]).unwrap();
        let err = serve.gateway_limits().unwrap_err();
        assert!(err.contains("--jwt-algorithm"), "{err}");
        let pem = dir.path().join("idp.pem");
        std::fs::write(&pem, ED25519_PEM).unwrap();
        let serve = serve_with(&[
            "--jwt-public-key",
            pem.to_str().unwrap(),
            "--jwt-algorithm",
            "ES256",
        ])
        .unwrap();
        let err = serve.gateway_limits().unwrap_err();
        assert!(err.contains("--jwt-algorithm ES256 does not fit"), "{err}");
    }
}
