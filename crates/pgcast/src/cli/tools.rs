//! The operator commands' flags: `migrate`, `doctor`, `tail` and `token`.

use std::fmt;

use std::time::Duration;

use clap::Args;
use pgcast_events::{Position, Role, Topic};
use uuid::Uuid;

use crate::config::{format_duration, parse_claim, parse_role, parse_tail_topic, parse_ttl};

use super::*;

/// `pgcast migrate`.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Database to migrate.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Install only the realtime objects (schema pgcast) onto an application that owns its
    /// session_assignments table; skip the demo application tables.
    #[arg(long)]
    pub realtime_only: bool,
}

impl fmt::Display for MigrateArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "migrate database={} realtime_only={}",
            self.database, self.realtime_only
        )
    }
}

/// `pgcast doctor`.
#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// Database to check.
    #[command(flatten)]
    pub database: DatabaseArgs,
}

impl fmt::Display for DoctorArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "doctor database={}", self.database)
    }
}

/// `pgcast tail`.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// Database to read.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Print every retained event after this position first, then continue live. Without it,
    /// start with the next event committed.
    #[arg(long, value_name = "POSITION", value_parser = clap::value_parser!(i64).range(0..))]
    pub since: Option<Position>,
    /// Only events visible on this topic: assignments (default), mechanic:<uuid>,
    /// session:<uuid>, workshop:<uuid> or customer:<uuid>.
    // `--help` prints this text as it is; it is not HTML.
    #[allow(rustdoc::invalid_html_tags)]
    #[arg(long, value_name = "TOPIC", value_parser = parse_tail_topic)]
    pub topic: Option<Topic>,
}

impl fmt::Display for TailArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tail database={}", self.database)?;
        match self.since {
            Some(p) => write!(f, " since={p}")?,
            None => f.write_str(" since=live")?,
        }
        write!(f, " topic={}", self.topic.unwrap_or(Topic::Assignments))
    }
}

/// `pgcast token`.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// Secret to sign with.
    #[command(flatten)]
    pub secret: SecretArgs,
    /// User id (`sub` claim).
    #[arg(long, value_name = "UUID")]
    pub sub: Uuid,
    /// Role: mechanic, customer or service.
    #[arg(long, value_name = "ROLE", value_parser = parse_role)]
    pub role: Role,
    /// Workshop of a mechanic (`workshop_id` claim).
    #[arg(long, value_name = "UUID")]
    pub workshop: Option<Uuid>,
    /// How long the token is valid (e.g. 1h, 30m, 7d); at most 30d, since a token cannot be
    /// revoked before it expires.
    #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// Issuer to stamp in the `iss` claim (what `serve --jwt-issuer` expects). Default: none.
    #[arg(
        long = "jwt-issuer",
        env = "PGCAST_JWT_ISSUER",
        value_name = "ISSUER",
        value_parser = parse_claim
    )]
    pub jwt_issuer: Option<String>,
    /// Audience to stamp in the `aud` claim (what `serve --jwt-audience` expects). Default:
    /// none.
    #[arg(
        long = "jwt-audience",
        env = "PGCAST_JWT_AUDIENCE",
        value_name = "AUDIENCE",
        value_parser = parse_claim
    )]
    pub jwt_audience: Option<String>,
}

impl fmt::Display for TokenArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "token sub={} role={} ttl={} jwt_secret={}",
            self.sub,
            self.role.as_str(),
            format_duration(self.ttl),
            self.secret.jwt_secret
        )?;
        if let Some(w) = self.workshop {
            write!(f, " workshop={w}")?;
        }
        write_claims(f, self.jwt_issuer.as_deref(), self.jwt_audience.as_deref())
    }
}

/// ` jwt_issuer=… jwt_audience=…` for the summaries, each only when set.
pub(super) fn write_claims(
    f: &mut fmt::Formatter<'_>,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> fmt::Result {
    if let Some(issuer) = issuer {
        write!(f, " jwt_issuer={issuer}")?;
    }
    if let Some(audience) = audience {
        write!(f, " jwt_audience={audience}")?;
    }
    Ok(())
}
