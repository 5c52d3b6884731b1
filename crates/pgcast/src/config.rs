//! Values of the command line that need more than clap's built-in parsing: a database URL and
//! a secret that must never be printed, durations, rates, topics and roles.
//!
//! Every parser here runs inside clap, so a bad value is rejected before anything connects or
//! binds, with one line naming the flag.

use std::fmt;
use std::time::Duration;

use pgcast_events::{Role, Topic};
use pgcast_gateway::MIN_SECRET_BYTES;
use tokio_postgres::config::Host;

/// A PostgreSQL connection string (URL or `key=value` form), validated when parsed.
///
/// `Display` and `Debug` never show the password: they render user, hosts, ports and database
/// from the parsed settings, so whatever the original string held cannot leak through them.
#[derive(Clone)]
pub struct DatabaseUrl {
    config: tokio_postgres::Config,
}

impl DatabaseUrl {
    /// Parses and validates a connection string.
    pub fn parse(text: &str) -> Result<DatabaseUrl, String> {
        let config: tokio_postgres::Config = text
            .parse()
            .map_err(|e| format!("not a PostgreSQL connection string ({e})"))?;
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            return Err("the connection string names no host".to_owned());
        }
        if config
            .get_hosts()
            .iter()
            .any(|h| matches!(h, Host::Tcp(name) if name.is_empty()))
        {
            return Err("the connection string has an empty host name".to_owned());
        }
        Ok(DatabaseUrl { config })
    }

    /// The connection settings.
    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.config
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.write_str("postgres://")?;
        if let Some(user) = c.get_user() {
            f.write_str(user)?;
            if c.get_password().is_some() {
                f.write_str(":<redacted>")?;
            }
            f.write_str("@")?;
        }
        let ports = c.get_ports();
        // `hostaddr` alone (no `host`) is a valid way to name the server.
        let hosts: Vec<String> = if c.get_hosts().is_empty() {
            c.get_hostaddrs().iter().map(ToString::to_string).collect()
        } else {
            c.get_hosts()
                .iter()
                .map(|host| match host {
                    Host::Tcp(name) => name.clone(),
                    Host::Unix(path) => format!("[{}]", path.display()),
                })
                .collect()
        };
        for (i, host) in hosts.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(host)?;
            // One port for every host, or one per host.
            if let Some(port) = ports.get(i).or(ports.first().filter(|_| ports.len() == 1)) {
                write!(f, ":{port}")?;
            }
        }
        if let Some(db) = c.get_dbname() {
            write!(f, "/{db}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

/// A secret (the JWT signing key). Printing it in any way shows `<redacted>`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Accepts a string of at least [`MIN_SECRET_BYTES`] (32) bytes: a shorter HS256 secret
    /// can be brute-forced offline from any one token. The error never contains the secret.
    pub fn parse(text: &str) -> Result<Secret, String> {
        if text.is_empty() {
            return Err("the secret is empty".to_owned());
        }
        if text.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the secret is {} bytes long; at least {MIN_SECRET_BYTES} are required \
                 (generate one with `openssl rand -hex 32`)",
                text.len()
            ));
        }
        Ok(Secret(text.to_owned()))
    }

    /// The secret's bytes, for signing and verifying.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A positive duration such as `24h`, `90s` or `1h 30m` (humantime syntax).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| format!("{e} (try e.g. 24h, 90s)"))?;
    if d.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    Ok(d)
}

/// Longest an edge timeout may be: far more than any client needs, and far from a timer's
/// overflow.
const MAX_EDGE_TIMEOUT: Duration = Duration::from_secs(3600);

/// A timeout of the edge (header read, frame): above zero, at most an hour.
pub(crate) fn parse_timeout(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d > MAX_EDGE_TIMEOUT {
        return Err("must be at most 1h".to_owned());
    }
    Ok(d)
}

/// Smallest client frame limit: an `auth` frame with the longest accepted token (8 KiB) must
/// fit.
pub(crate) const MIN_FRAME_BYTES: usize = 16 << 10;
/// Largest client frame limit.
pub(crate) const MAX_FRAME_BYTES: usize = 16 << 20;

/// A byte count such as `65536`, `64KiB`, `16MiB` or `1GiB`.
fn parse_bytes(text: &str) -> Result<usize, String> {
    const EXPECTED: &str = "expected bytes, e.g. 65536, 64KiB or 16MiB";
    let t = text.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(EXPECTED.to_owned()),
    };
    let n: usize = digits.parse().map_err(|_| EXPECTED.to_owned())?;
    n.checked_mul(scale).ok_or_else(|| "too large".to_owned())
}

/// A client frame limit: bytes between 16 KiB and 16 MiB.
pub(crate) fn parse_frame_bytes(text: &str) -> Result<usize, String> {
    Some(parse_bytes(text)?)
        .filter(|b| (MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(b))
        .ok_or_else(|| {
            "must be between 16KiB (an auth frame with the longest token must fit) and 16MiB"
                .to_owned()
        })
}

/// A browser origin as browsers send it in `Origin`: `scheme://host[:port]`, http or https,
/// no path, no trailing slash.
pub(crate) fn parse_origin(text: &str) -> Result<String, String> {
    const EXPECTED: &str =
        "expected an origin such as https://app.example or http://localhost:3000 \
         (scheme, host and port only)";
    let t = text.trim();
    let rest = t
        .strip_prefix("https://")
        .or_else(|| t.strip_prefix("http://"))
        .ok_or_else(|| EXPECTED.to_owned())?;
    let valid = !rest.is_empty()
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if !valid {
        return Err(EXPECTED.to_owned());
    }
    Ok(t.to_ascii_lowercase())
}

/// Smallest outgoing budget: a few of the largest event frames.
pub(crate) const MIN_OUTBOUND_BYTES: usize = 64 << 10;
/// Largest outgoing budget per connection.
pub(crate) const MAX_OUTBOUND_BYTES: usize = 1 << 30;

/// An outgoing budget per connection: bytes between 64 KiB and 1 GiB.
pub(crate) fn parse_outbound_bytes(text: &str) -> Result<usize, String> {
    Some(parse_bytes(text)?)
        .filter(|b| (MIN_OUTBOUND_BYTES..=MAX_OUTBOUND_BYTES).contains(b))
        .ok_or_else(|| "must be between 64KiB and 1GiB".to_owned())
}

/// Formats a byte count the way [`parse_bytes`] reads it.
pub(crate) fn format_bytes(bytes: usize) -> String {
    if bytes.trailing_zeros() >= 30 {
        format!("{}GiB", bytes >> 30)
    } else if bytes.trailing_zeros() >= 20 {
        format!("{}MiB", bytes >> 20)
    } else if bytes.trailing_zeros() >= 10 {
        format!("{}KiB", bytes >> 10)
    } else {
        bytes.to_string()
    }
}

/// Longest lifetime `pgcast token` mints (30 days; the refusal says so): a token cannot be revoked before its `exp` (short of
/// changing the secret, which revokes every token), so a lost one must stop working soon.
pub(crate) const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);

/// A token lifetime: a duration above zero and at most [`MAX_TOKEN_TTL`] (30 days).
pub(crate) fn parse_ttl(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d > MAX_TOKEN_TTL {
        return Err(
            "must be at most 30 days (a token cannot be revoked before it expires; \
                    mint a new one when it does)"
                .to_owned(),
        );
    }
    Ok(d)
}

/// A JWT `iss` or `aud` value: non-empty, printable, without surrounding whitespace (which
/// would make a token that looks right fail the exact comparison).
pub(crate) fn parse_claim(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if text.trim() != text || text.chars().any(char::is_control) {
        return Err("must not have surrounding whitespace or control characters".to_owned());
    }
    Ok(text.to_owned())
}

/// Formats a duration the way it is written on the command line (`24h`, `1h 30m`).
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Events per second for `demo --simulate`: a finite number above zero, at most 100,000.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .parse()
        .map_err(|_| "not a number of events per second".to_owned())?;
    if !(rate.is_finite() && rate > 0.0 && rate <= 100_000.0) {
        return Err("must be above 0 and at most 100000 events per second".to_owned());
    }
    Ok(rate)
}

/// A token role: `mechanic`, `customer` or `service`.
pub fn parse_role(text: &str) -> Result<Role, String> {
    [Role::Mechanic, Role::Customer, Role::Service]
        .into_iter()
        .find(|r| r.as_str() == text)
        .ok_or_else(|| "expected mechanic, customer or service".to_owned())
}

/// A topic `tail` can follow: any topic but `queue`, which is defined by a mechanic's identity
/// and so means nothing to an operator tool.
pub fn parse_tail_topic(text: &str) -> Result<Topic, String> {
    let topic: Topic = text.parse().map_err(|e| {
        format!("{e}; expected assignments, mechanic:<uuid>, session:<uuid>, workshop:<uuid> or customer:<uuid>")
    })?;
    if topic == Topic::Queue {
        return Err(QUEUE_NEEDS_MECHANIC.to_owned());
    }
    Ok(topic)
}

/// Why `tail` refuses `--topic queue`.
pub(crate) const QUEUE_NEEDS_MECHANIC: &str = "the queue topic is defined by a mechanic's \
     identity; follow mechanic:<uuid> or workshop:<uuid> instead";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_display_never_shows_the_password() {
        for (text, shown) in [
            (
                "postgres://app:hunter2@db.example:5433/shop",
                "postgres://app:<redacted>@db.example:5433/shop",
            ),
            (
                "postgresql://app@localhost/shop",
                "postgres://app@localhost:5432/shop",
            ),
            (
                "host=db port=6000 user=app password=hunter2 dbname=shop",
                "postgres://app:<redacted>@db:6000/shop",
            ),
            (
                "postgres://app:p%40ss@a:1,b:2/x",
                "postgres://app:<redacted>@a:1,b:2/x",
            ),
            (
                "hostaddr=10.0.0.7 user=app password=hunter2",
                "postgres://app:<redacted>@10.0.0.7",
            ),
        ] {
            let url = DatabaseUrl::parse(text).unwrap();
            assert_eq!(url.to_string(), shown);
            assert!(!format!("{url:?}").contains("hunter2"));
            assert!(!url.to_string().contains("p@ss"));
        }
        assert!(DatabaseUrl::parse("mysql://x").is_err());
        assert!(DatabaseUrl::parse("postgres://:5432/x").is_err());
    }

    #[test]
    fn secrets_print_redacted() {
        let text = "s3cret-that-is-at-least-32-bytes-long";
        let s = Secret::parse(text).unwrap();
        assert_eq!(s.to_string(), "<redacted>");
        assert!(!format!("{s:?}").contains("s3cret"));
        assert_eq!(s.expose(), text.as_bytes());
        assert!(Secret::parse("").is_err());
    }

    #[test]
    fn secrets_shorter_than_32_bytes_are_refused_without_showing_them() {
        let short = "sixteen-byte-key";
        let err = Secret::parse(short).map(|_| ()).unwrap_err();
        assert!(err.contains("16 bytes") && err.contains("32"), "{err}");
        assert!(!err.contains(short), "{err}");
        assert!(Secret::parse(&"k".repeat(31)).is_err());
        assert!(Secret::parse(&"k".repeat(32)).is_ok());
    }

    #[test]
    fn token_lifetimes_are_capped_at_30_days() {
        assert_eq!(parse_ttl("30d"), Ok(MAX_TOKEN_TTL));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["30d 1s", "31d", "100y", "0s", "later"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
        assert!(parse_ttl("100y").unwrap_err().contains("at most 30 days"));
    }

    #[test]
    fn claims_are_non_empty_and_trimmed() {
        assert_eq!(
            parse_claim("https://id.example/"),
            Ok("https://id.example/".to_owned())
        );
        for bad in ["", " pgcast", "pgcast ", "a\nb"] {
            assert!(parse_claim(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn origins_are_scheme_host_and_port() {
        assert_eq!(
            parse_origin("https://App.example"),
            Ok("https://app.example".to_owned())
        );
        assert!(parse_origin("http://localhost:3000").is_ok());
        assert!(parse_origin("http://[::1]:8080").is_ok());
        for bad in [
            "",
            "app.example",
            "https://",
            "https://app.example/",
            "https://app.example/path",
            "ftp://app.example",
            "https://a b",
            "*",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn edge_timeouts_and_frame_sizes() {
        assert_eq!(parse_timeout("2s"), Ok(Duration::from_secs(2)));
        for bad in ["0s", "2h", "100y", "x"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_frame_bytes("64KiB"), Ok(65_536));
        assert_eq!(parse_frame_bytes("65536"), Ok(65_536));
        assert_eq!(parse_frame_bytes("1MiB"), Ok(1 << 20));
        for bad in [
            "",
            "1KiB",
            "16383",
            "17MiB",
            "64kb",
            "-1",
            "99999999999999999999999",
        ] {
            assert!(parse_frame_bytes(bad).is_err(), "{bad}");
        }
        for bytes in [65_536, 1 << 20, 20_000] {
            assert_eq!(parse_frame_bytes(&format_bytes(bytes)), Ok(bytes));
        }
        assert_eq!(parse_outbound_bytes("16MiB"), Ok(16 << 20));
        assert_eq!(parse_outbound_bytes("1GiB"), Ok(1 << 30));
        for bad in ["32KiB", "2GiB", "16MB", "99999999999999999999GiB"] {
            assert!(parse_outbound_bytes(bad).is_err(), "{bad}");
        }
        for bytes in [64 << 10, 16 << 20, 1 << 30, 100_000] {
            assert_eq!(parse_outbound_bytes(&format_bytes(bytes)), Ok(bytes));
        }
    }

    #[test]
    fn durations_rates_roles_topics() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(format_duration(Duration::from_secs(86_400)), "1day");
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_rate("2.5"), Ok(2.5));
        for bad in ["0", "-1", "NaN", "inf", "1e9", "x"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_role("service"), Ok(Role::Service));
        assert!(parse_role("admin").is_err());
        assert!(parse_tail_topic("queue").is_err());
        assert_eq!(parse_tail_topic("assignments"), Ok(Topic::Assignments));
        assert!(parse_tail_topic("session:nope").is_err());
    }
}
