//! Values of the command line that need more than clap's built-in parsing: a database URL and
//! a secret that must never be printed, durations, rates, topics and roles.
//!
//! Every parser here runs inside clap, so a bad value is rejected before anything connects or
//! binds, with one line naming the flag.
//!
//! Why one file of about 1,000 lines: some 46 small parsers, one per kind of value, with their
//! unit tests at the bottom; split by flag they would scatter the rules they share (units, upper
//! bounds, redaction).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pgcast_events::{Role, Topic};
use pgcast_gateway::MIN_SECRET_BYTES;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use tokio_postgres::config::Host;

/// A PostgreSQL connection string (URL or `key=value` form), validated when parsed, with
/// libpq's TLS settings (`sslmode`, `sslrootcert`) taken out of it.
///
/// `Display` and `Debug` never show the password: they render user, hosts, ports, database
/// and TLS settings from the parsed values, so whatever the original string held cannot leak
/// through them.
#[derive(Clone)]
pub struct DatabaseUrl {
    config: tokio_postgres::Config,
    tls: TlsOptions,
}

impl DatabaseUrl {
    /// Parses and validates a connection string. Where it sets no `sslmode` or `sslrootcert`,
    /// `PGSSLMODE` and `PGSSLROOTCERT` apply, as with libpq. A root certificate file is read
    /// here, so a missing or empty one is a bad value rather than a failed connection.
    pub fn parse(text: &str) -> Result<DatabaseUrl, String> {
        Self::parse_with_env(text, |name| std::env::var(name).ok())
    }

    /// [`parse`](Self::parse) with the environment given as a lookup (tests pass their own).
    fn parse_with_env(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<DatabaseUrl, String> {
        let (rest, ssl) = take_ssl_params(text)?;
        let mut config: tokio_postgres::Config = rest
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
        let mode = ssl
            .mode
            .or_else(|| env("PGSSLMODE").filter(|m| !m.is_empty()));
        let root = ssl
            .root_cert
            .or_else(|| env("PGSSLROOTCERT").filter(|r| !r.is_empty()));
        let tls = TlsOptions::resolve(mode.as_deref(), root.as_deref(), env("HOME").as_deref())?;
        let tcp_names = config.get_hosts().iter().any(|h| matches!(h, Host::Tcp(_)));
        // `hostaddr` alone is TCP too; only Unix socket hosts are not.
        let over_tcp = tcp_names || config.get_hosts().is_empty();
        if tls.mode >= SslMode::Require && over_tcp && !tcp_names {
            // tokio-postgres verifies (and sends SNI for) the `host` name; with `hostaddr`
            // alone it has none, and every TLS handshake would fail.
            return Err(format!(
                "sslmode={} needs a host name (host=…) for TLS; hostaddr alone is not enough",
                tls.mode
            ));
        }
        config.ssl_mode(tls.mode.tokio_postgres(over_tcp));
        Ok(DatabaseUrl { config, tls })
    }

    /// The connection settings (`ssl_mode` set from `sslmode`; the rest of TLS, such as
    /// `sslrootcert`, is kept beside them for the connector).
    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The TLS settings.
    pub(crate) fn tls(&self) -> &TlsOptions {
        &self.tls
    }

    /// The host names, comma-separated, as error messages name them.
    pub(crate) fn hosts(&self) -> String {
        let names: Vec<String> = if self.config.get_hosts().is_empty() {
            self.config
                .get_hostaddrs()
                .iter()
                .map(ToString::to_string)
                .collect()
        } else {
            self.config
                .get_hosts()
                .iter()
                .map(|host| match host {
                    Host::Tcp(name) => name.clone(),
                    Host::Unix(path) => path.display().to_string(),
                })
                .collect()
        };
        names.join(",")
    }
}

/// A configuration built in code (tests, the demo's own local PostgreSQL): TLS as
/// tokio-postgres's `ssl_mode` says (`disable`, `prefer` or `require`), no root certificates,
/// so nothing is verified.
impl From<tokio_postgres::Config> for DatabaseUrl {
    fn from(config: tokio_postgres::Config) -> Self {
        let mode = match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        };
        DatabaseUrl {
            config,
            tls: TlsOptions {
                mode,
                roots: RootCerts::None,
            },
        }
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
        // libpq's default (`prefer`, no root certificate) is left out, so a plain URL reads as
        // it was written.
        let mut sep = '?';
        if self.tls.mode != SslMode::Prefer {
            write!(f, "{sep}sslmode={}", self.tls.mode)?;
            sep = '&';
        }
        if self.tls.mode != SslMode::Disable {
            match &self.tls.roots {
                RootCerts::None => {}
                RootCerts::File { path, .. } => {
                    write!(f, "{sep}sslrootcert={}", path.display())?;
                }
                RootCerts::System => write!(f, "{sep}sslrootcert=system")?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

/// libpq's `sslmode`: whether a connection is encrypted, and what of the server's certificate
/// is verified. Ordered from weakest to strongest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, plain when it does not (libpq's default). The
    /// certificate is verified only against a root certificate file, when there is one.
    Prefer,
    /// TLS or no connection. The certificate is verified only against a root certificate
    /// file, when there is one (then as [`SslMode::VerifyCa`], as libpq does).
    Require,
    /// TLS, and the server's certificate chain must lead to a trusted root certificate.
    VerifyCa,
    /// As [`SslMode::VerifyCa`], and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<SslMode, String> {
        match text {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            "allow" => Err("sslmode=allow is not supported; use prefer (or disable)".to_owned()),
            other => Err(format!(
                "invalid sslmode {other:?}: expected disable, prefer, require, verify-ca or \
                 verify-full"
            )),
        }
    }

    /// What tokio-postgres is told: it knows only whether to attempt TLS and whether it is
    /// required; verification is the connector's business. libpq ignores `sslmode` on Unix
    /// sockets (PostgreSQL offers no TLS there), hence `over_tcp`.
    fn tokio_postgres(self, over_tcp: bool) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self {
            SslMode::Disable => Pg::Disable,
            _ if !over_tcp => Pg::Disable,
            SslMode::Prefer => Pg::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// The certificate authorities that verify the server (libpq's `sslrootcert`).
#[derive(Clone)]
pub(crate) enum RootCerts {
    /// No root certificate: nothing is verified (`prefer` and `require` only).
    None,
    /// The certificates of a PEM file, read when the connection string was parsed.
    File {
        path: PathBuf,
        store: Arc<RootCertStore>,
    },
    /// The operating system's trust store (`sslrootcert=system`), read when connecting.
    System,
}

/// The TLS half of a connection string.
#[derive(Clone)]
pub(crate) struct TlsOptions {
    pub(crate) mode: SslMode,
    pub(crate) roots: RootCerts,
}

/// Where libpq looks for root certificates when `sslrootcert` is not set.
const DEFAULT_ROOT_CERT: &str = ".postgresql/root.crt";

impl TlsOptions {
    /// libpq's rules: `sslrootcert=system` demands (and defaults to) `verify-full`; without
    /// `sslrootcert`, `~/.postgresql/root.crt` is used when it exists, and `verify-ca` and
    /// `verify-full` need it. Unlike libpq, an `sslrootcert` file that was named but does not
    /// exist is always an error, never a silent downgrade to no verification.
    fn resolve(
        mode: Option<&str>,
        root_cert: Option<&str>,
        home: Option<&str>,
    ) -> Result<TlsOptions, String> {
        let explicit = mode.map(SslMode::parse).transpose()?;
        if root_cert == Some("system") {
            let mode = explicit.unwrap_or(SslMode::VerifyFull);
            if mode != SslMode::VerifyFull {
                return Err(format!(
                    "weak sslmode \"{mode}\" may not be used with sslrootcert=system (use \
                     \"verify-full\")"
                ));
            }
            return Ok(TlsOptions {
                mode,
                roots: RootCerts::System,
            });
        }
        let mode = explicit.unwrap_or(SslMode::Prefer);
        let roots = match root_cert {
            _ if mode == SslMode::Disable => RootCerts::None,
            Some(path) => read_root_certs(Path::new(path))?,
            None => {
                let default = home.map(|h| Path::new(h).join(DEFAULT_ROOT_CERT));
                match default {
                    Some(path) if path.is_file() => read_root_certs(&path)?,
                    _ if mode >= SslMode::VerifyCa => {
                        return Err(format!(
                            "sslmode={mode} needs root certificates: set sslrootcert to a PEM \
                             file of the CA that signed the server's certificate (or \
                             sslrootcert=system for the system's trusted roots), or create \
                             ~/{DEFAULT_ROOT_CERT}"
                        ))
                    }
                    _ => RootCerts::None,
                }
            }
        };
        Ok(TlsOptions { mode, roots })
    }
}

/// Reads the certificates of a PEM file.
fn read_root_certs(path: &Path) -> Result<RootCerts, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("sslrootcert {}: not a PEM file ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "sslrootcert {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    let mut store = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        store.add(cert).map_err(|e| {
            format!(
                "sslrootcert {}: certificate {} is not usable as a root ({e})",
                path.display(),
                i + 1
            )
        })?;
    }
    Ok(RootCerts::File {
        path: path.to_path_buf(),
        store: Arc::new(store),
    })
}

/// The TLS parameters of a connection string, which tokio-postgres does not know.
#[derive(Debug, Default, PartialEq)]
struct SslParams {
    mode: Option<String>,
    root_cert: Option<String>,
}

/// Parameters that name a client certificate: not supported yet, and refused rather than
/// ignored (the server would refuse the connection with a less helpful message).
const CLIENT_CERT_PARAMS: [&str; 4] = ["sslcert", "sslkey", "sslpassword", "sslcertmode"];

/// Takes `sslmode` and `sslrootcert` out of a connection string, URL or `key=value` form,
/// leaving the rest as it was written for tokio-postgres to parse.
fn take_ssl_params(text: &str) -> Result<(String, SslParams), String> {
    let mut ssl = SslParams::default();
    let mut take = |key: &str, value: String| -> Result<bool, String> {
        match key {
            "sslmode" => ssl.mode = Some(value),
            "sslrootcert" => ssl.root_cert = Some(value),
            k if CLIENT_CERT_PARAMS.contains(&k) => {
                return Err(format!(
                    "{k}: client certificates are not supported yet (authenticate with a \
                     password, e.g. SCRAM)"
                ))
            }
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = match ["postgres://", "postgresql://"]
        .iter()
        .find_map(|p| text.strip_prefix(p).map(|_| p.len()))
    {
        Some(prefix) => take_url_params(text, prefix, &mut take)?,
        None => take_keyword_params(text, &mut take)?,
    };
    Ok((rest, ssl))
}

type Take<'a> = dyn FnMut(&str, String) -> Result<bool, String> + 'a;

/// The query of a URL: `?k=v&k=v`, after the credentials (as tokio-postgres finds them: up to
/// the first `@`) and the hosts.
fn take_url_params(text: &str, prefix: usize, take: &mut Take<'_>) -> Result<String, String> {
    let after_creds = text[prefix..].find('@').map_or(prefix, |i| prefix + i + 1);
    let Some(q) = text[after_creds..].find('?').map(|i| after_creds + i) else {
        return Ok(text.to_owned());
    };
    let mut kept = Vec::new();
    for pair in text[q + 1..].split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key)?;
        if !take(&key, percent_decode(value)?)? {
            kept.push(pair);
        }
    }
    let mut rest = text[..q].to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok(rest)
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                // The value is not shown: it may be a password.
                .ok_or_else(|| "bad percent-encoding in a parameter".to_owned())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a parameter is not UTF-8 once decoded".to_owned())
}

/// `key = value` pairs separated by whitespace; a value is bare (backslash escapes) or quoted
/// in `'…'` (backslash escapes), as libpq and tokio-postgres read them.
fn take_keyword_params(text: &str, take: &mut Take<'_>) -> Result<String, String> {
    let mut rest = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut chars);
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        skip_ws(&mut chars);
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            // Malformed: leave it to tokio-postgres, which says what is wrong.
            return Ok(text.to_owned());
        }
        skip_ws(&mut chars);
        let mut value = String::new();
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        loop {
            match chars.peek() {
                None => break,
                Some(&(_, '\'')) if quoted => {
                    chars.next();
                    break;
                }
                Some(&(_, c)) if !quoted && c.is_whitespace() => break,
                Some(&(_, '\\')) => {
                    chars.next();
                    if let Some((_, c)) = chars.next() {
                        value.push(c);
                    }
                }
                Some(&(_, c)) => {
                    value.push(c);
                    chars.next();
                }
            }
        }
        let end = chars.peek().map_or(text.len(), |&(i, _)| i);
        if !take(&key, value)? {
            rest.push_str(&text[start..end]);
            rest.push(' ');
        }
    }
    Ok(rest)
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

/// Longest log retention: ten years. PostgreSQL computes the pruning boundary as `now() -
/// retention`, which fails (and pruning with it, every run) before 4713 BC.
const MAX_RETENTION: Duration = Duration::from_secs(3650 * 86_400);

/// A log retention: above zero and at most ten years.
pub(crate) fn parse_retention(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d > MAX_RETENTION {
        return Err("must be at most 10 years (3650days)".to_owned());
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

/// `--outbound-bytes-total`: a byte count from 16 MiB to 64 GiB.
pub(crate) fn parse_outbound_bytes_total(text: &str) -> Result<usize, String> {
    Some(parse_bytes(text)?)
        .filter(|&b| ((16_u64 << 20)..=(64_u64 << 30)).contains(&(b as u64)))
        .ok_or_else(|| "must be between 16MiB and 64GiB".to_owned())
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
    // At least one event per 1,000 s: the simulator sleeps 1/rate between events.
    if !(rate.is_finite() && (0.001..=100_000.0).contains(&rate)) {
        return Err("must be at least 0.001 and at most 100000 events per second".to_owned());
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

    /// No environment: the tests below must not depend on the machine's PGSSLMODE or HOME.
    fn parse_bare(text: &str) -> Result<DatabaseUrl, String> {
        DatabaseUrl::parse_with_env(text, |_| None)
    }

    fn ca_file(dir: &Path) -> PathBuf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join("ca.pem");
        std::fs::write(&path, cert.pem()).unwrap();
        path
    }

    #[test]
    fn ssl_parameters_are_taken_out_of_urls_and_keyword_strings() {
        let (rest, ssl) = take_ssl_params(
            "postgres://app:p%40ss@db:5433/shop?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem\
             &application_name=x",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://app:p%40ss@db:5433/shop?application_name=x"
        );
        assert_eq!(ssl.mode.as_deref(), Some("verify-full"));
        assert_eq!(ssl.root_cert.as_deref(), Some("/etc/ca.pem"));
        let (rest, ssl) = take_ssl_params("postgresql://db/shop?sslmode=require").unwrap();
        assert_eq!(rest, "postgresql://db/shop");
        assert_eq!(ssl.mode.as_deref(), Some("require"));
        // A `?` in a password (before the `@`) is not the query.
        let (rest, ssl) = take_ssl_params("postgres://app:a?b@db/shop").unwrap();
        assert_eq!(rest, "postgres://app:a?b@db/shop");
        assert_eq!(ssl, SslParams::default());

        let (rest, ssl) = take_ssl_params(
            "host=db sslmode = 'verify-ca' password='it\\'s' sslrootcert=/a\\ b.pem dbname=x",
        )
        .unwrap();
        assert_eq!(ssl.mode.as_deref(), Some("verify-ca"));
        assert_eq!(ssl.root_cert.as_deref(), Some("/a b.pem"));
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_password(), Some(&b"it's"[..]));
        assert_eq!(config.get_dbname(), Some("x"));

        for client_cert in [
            "postgres://db/x?sslcert=/c.pem",
            "host=db sslkey=/k.pem",
            "host=db sslpassword=x",
        ] {
            let err = parse_bare(client_cert).unwrap_err();
            assert!(err.contains("not supported yet"), "{err}");
        }
    }

    #[test]
    fn sslmode_follows_libpq() {
        let url = parse_bare("postgres://db/x").unwrap();
        assert_eq!(url.tls().mode, SslMode::Prefer);
        assert_eq!(
            url.pg_config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Prefer
        );
        for (text, mode, pg) in [
            (
                "disable",
                SslMode::Disable,
                tokio_postgres::config::SslMode::Disable,
            ),
            (
                "require",
                SslMode::Require,
                tokio_postgres::config::SslMode::Require,
            ),
        ] {
            let url = parse_bare(&format!("postgres://db/x?sslmode={text}")).unwrap();
            assert_eq!(url.tls().mode, mode);
            assert_eq!(url.pg_config().get_ssl_mode(), pg);
        }
        let err = parse_bare("postgres://db/x?sslmode=allow").unwrap_err();
        assert!(err.contains("not supported"), "{err}");
        let err = parse_bare("postgres://db/x?sslmode=verify").unwrap_err();
        assert!(err.contains("verify-full"), "{err}");
        // Verification needs root certificates, which a bare environment does not have.
        let err = parse_bare("postgres://db/x?sslmode=verify-full").unwrap_err();
        assert!(err.contains("sslrootcert"), "{err}");
        // sslrootcert=system means verify-full, and refuses anything weaker.
        let url = parse_bare("postgres://db/x?sslrootcert=system").unwrap();
        assert_eq!(url.tls().mode, SslMode::VerifyFull);
        let err = parse_bare("postgres://db/x?sslrootcert=system&sslmode=require").unwrap_err();
        assert_eq!(
            err,
            "weak sslmode \"require\" may not be used with sslrootcert=system (use \"verify-full\")"
        );
        // libpq ignores sslmode on Unix sockets, where PostgreSQL offers no TLS.
        let url = parse_bare("host=/run/postgresql sslmode=require").unwrap();
        assert_eq!(
            url.pg_config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
        let err = parse_bare("hostaddr=10.0.0.7 sslmode=require").unwrap_err();
        assert!(err.contains("host name"), "{err}");
    }

    #[test]
    fn root_certificates_are_read_when_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca_file(dir.path());
        let text = format!(
            "postgres://app:hunter2@db/x?sslmode=verify-full&sslrootcert={}",
            ca.display()
        );
        let url = parse_bare(&text).unwrap();
        assert!(matches!(&url.tls().roots, RootCerts::File { path, .. } if *path == ca));
        assert_eq!(
            url.to_string(),
            format!(
                "postgres://app:<redacted>@db:5432/x?sslmode=verify-full&sslrootcert={}",
                ca.display()
            )
        );
        let missing = dir.path().join("missing.pem");
        let err = parse_bare(&format!(
            "postgres://db/x?sslrootcert={}",
            missing.display()
        ))
        .unwrap_err();
        assert!(
            err.starts_with(&format!("sslrootcert {}", missing.display())),
            "{err}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err =
            parse_bare(&format!("postgres://db/x?sslrootcert={}", empty.display())).unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");
        // With a root certificate, require verifies the chain (libpq's verify-ca).
        let url = parse_bare(&format!(
            "host=db sslmode=require sslrootcert='{}'",
            ca.display()
        ))
        .unwrap();
        assert!(matches!(url.tls().roots, RootCerts::File { .. }));
    }

    #[test]
    fn pgsslmode_and_pgsslrootcert_apply_where_the_string_is_silent() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca_file(dir.path());
        let ca_text = ca.display().to_string();
        let env = |name: &str| match name {
            "PGSSLMODE" => Some("verify-ca".to_owned()),
            "PGSSLROOTCERT" => Some(ca_text.clone()),
            _ => None,
        };
        let url = DatabaseUrl::parse_with_env("postgres://db/x", env).unwrap();
        assert_eq!(url.tls().mode, SslMode::VerifyCa);
        assert!(matches!(url.tls().roots, RootCerts::File { .. }));
        let url = DatabaseUrl::parse_with_env("postgres://db/x?sslmode=disable", env).unwrap();
        assert_eq!(url.tls().mode, SslMode::Disable);
        assert_eq!(url.to_string(), "postgres://db:5432/x?sslmode=disable");
        // libpq's default root certificate file, under HOME.
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".postgresql")).unwrap();
        std::fs::copy(&ca, home.path().join(DEFAULT_ROOT_CERT)).unwrap();
        let home_text = home.path().display().to_string();
        let url = DatabaseUrl::parse_with_env("postgres://db/x?sslmode=verify-full", |name| {
            (name == "HOME").then(|| home_text.clone())
        })
        .unwrap();
        assert!(url.to_string().ends_with(".postgresql/root.crt"), "{url}");
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
        assert_eq!(parse_rate("0.001"), Ok(0.001));
        for bad in ["0", "-1", "NaN", "inf", "1e9", "x", "1e-20", "0.0009"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_retention("3650days"),
            Ok(Duration::from_secs(3650 * 86_400))
        );
        for bad in ["3651days", "7000y", "0s"] {
            assert!(parse_retention(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_role("service"), Ok(Role::Service));
        assert!(parse_role("admin").is_err());
        assert!(parse_tail_topic("queue").is_err());
        assert_eq!(parse_tail_topic("assignments"), Ok(Topic::Assignments));
        assert!(parse_tail_topic("session:nope").is_err());
    }
}
