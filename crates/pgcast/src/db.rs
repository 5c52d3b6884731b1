//! Every database connection pgcast makes goes through here, with the TLS connector of
//! [`tls_connector`]: one-off clients of the operator commands, query pools (the product's
//! [`pgcast_listener::pool`] on this URL) and the LISTEN connection. What is TLS and URL is
//! the binary's; what the pools and the listener do with a connection is `pgcast-listener`'s.
//!
//! ```text
//! DatabaseUrl (sslmode, sslrootcert) ──tls_connector──▶ MakeRustlsConnect (one verifier)
//!        │ ssl_mode: disable │ prefer │ require           │
//!        ▼                                               ▼
//! tokio-postgres: asks the server for TLS or not ──▶ rustls: handshake, verifies what
//!                                                    sslmode asks (nothing, chain, chain+name)
//! ```
//!
//! tokio-postgres decides whether to ask for TLS and whether plain is acceptable (its
//! `ssl_mode`); the connector decides what of the server's certificate is verified.

use std::future::poll_fn;
use std::sync::Arc;

use deadpool_postgres::Pool;
use pgcast_listener::{EventLog, Listener, CONNECT_TIMEOUT};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use rustls::{Error as TlsError, SignatureScheme};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Notification};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{DatabaseUrl, RootCerts, SslMode};
use crate::PgcastError;

/// Where pgcast's connections go.
///
/// Queries and pools use `url`. The connections that need a session of their own, the LISTEN
/// connection and migrations (which hold a session lock), use `listen_url` when it is given:
/// then `url` may go through a transaction pooler such as PgBouncer, where a LISTEN would hear
/// nothing (the pooler hands the session to other clients between transactions).
#[derive(Clone, Debug)]
pub struct Database {
    url: DatabaseUrl,
    listen_url: Option<DatabaseUrl>,
}

impl Database {
    /// Every connection to `url`.
    pub fn new(url: DatabaseUrl) -> Self {
        Database {
            url,
            listen_url: None,
        }
    }

    /// Sessions (LISTEN, migrations) to `listen_url` instead, when given.
    pub fn with_listen_url(mut self, listen_url: Option<DatabaseUrl>) -> Self {
        self.listen_url = listen_url;
        self
    }

    /// Queries and pools.
    pub fn url(&self) -> &DatabaseUrl {
        &self.url
    }

    /// The LISTEN connection and migrations: the listen URL, or the URL when none was given.
    pub fn listen_url(&self) -> &DatabaseUrl {
        self.listen_url.as_ref().unwrap_or(&self.url)
    }

    /// Whether a separate listen URL was given.
    pub(crate) fn has_listen_url(&self) -> bool {
        self.listen_url.is_some()
    }
}

impl From<DatabaseUrl> for Database {
    fn from(url: DatabaseUrl) -> Self {
        Database::new(url)
    }
}

impl From<tokio_postgres::Config> for Database {
    fn from(config: tokio_postgres::Config) -> Self {
        Database::new(config.into())
    }
}

/// The TLS connector of every connection to `url`: it verifies what `sslmode` asks of the
/// server's certificate, as libpq does:
///
/// | sslmode | no root certificates | `sslrootcert` (or `~/.postgresql/root.crt`) |
/// |---|---|---|
/// | `disable` | never used | never used |
/// | `prefer`, `require` | nothing verified | the chain |
/// | `verify-ca` | (refused when parsed) | the chain |
/// | `verify-full` | (refused when parsed) | the chain and the host name |
///
/// `sslrootcert=system` verifies against the operating system's trust store (only with
/// `verify-full`).
pub fn tls_connector(url: &DatabaseUrl) -> Result<MakeRustlsConnect, PgcastError> {
    // Explicit, not the process default: should another crate bring in a second provider,
    // the default would be ambiguous.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = url.tls();
    let roots = match &tls.roots {
        RootCerts::None => None,
        RootCerts::File { store, .. } => Some(Arc::clone(store)),
        RootCerts::System => Some(Arc::new(system_roots()?)),
    };
    let webpki = roots
        .map(|roots| {
            WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                .build()
                .map_err(|e| PgcastError::Tls(format!("could not set up verification: {e}")))
        })
        .transpose()?;
    let verifier = Verifier {
        webpki,
        check_name: tls.mode == SslMode::VerifyFull,
        algorithms: provider.signature_verification_algorithms,
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PgcastError::Tls(format!("could not set up TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// The operating system's trusted roots (`sslrootcert=system`).
fn system_roots() -> Result<RootCertStore, PgcastError> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_owned(), ToString::to_string);
        return Err(PgcastError::Tls(format!(
            "sslrootcert=system: no usable root certificate in the system's trust store ({why}); \
             install the ca-certificates package or name a PEM file in sslrootcert"
        )));
    }
    Ok(store)
}

/// Verifies what `sslmode` asks: nothing (no root certificates), the chain, or the chain and
/// the host name. The handshake signatures are always checked, so the server proves it holds
/// the key of the certificate it presents.
#[derive(Debug)]
struct Verifier {
    /// Chain and name verification against the root certificates; `None` when there are none.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    /// `verify-full`: a name mismatch fails. Otherwise only the chain counts.
    check_name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            // webpki verifies the chain (signatures, validity, usage) before the name, so a
            // name error means the chain was good: what verify-ca asks.
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Opens a connection named `application_name` (visible in `pg_stat_activity`); its connection
/// task runs on the current tokio runtime and ends when the client is dropped.
pub async fn connect(url: &DatabaseUrl, application_name: &str) -> Result<Client, PgcastError> {
    let config = session_config(url, application_name);
    let (client, connection) = config
        .connect(tls_connector(url)?)
        .await
        .map_err(|e| connect_error(url, e))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            // The client's next call fails with the same error; this only leaves a trace.
            tracing::debug!(%error, "database connection ended");
        }
    });
    Ok(client)
}

/// [`connect`], with the notifications the connection receives delivered on the returned
/// channel (a connection driven as a plain future drops them).
pub(crate) async fn connect_listening(
    url: &DatabaseUrl,
    application_name: &str,
) -> Result<(Client, mpsc::UnboundedReceiver<Notification>), PgcastError> {
    let config = session_config(url, application_name);
    let (client, mut connection) = config
        .connect(tls_connector(url)?)
        .await
        .map_err(|e| connect_error(url, e))?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(%error, "database connection ended");
                    return;
                }
            }
        }
    });
    Ok((client, rx))
}

fn session_config(url: &DatabaseUrl, application_name: &str) -> tokio_postgres::Config {
    let mut config = url.pg_config().clone();
    config.application_name(application_name);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config
}

/// A query pool of at most `max_size` connections to `url` ([`pgcast_listener::pool`]: every
/// statement bounded by a statement timeout unless the URL's `options` set one).
pub fn pool(url: &DatabaseUrl, max_size: usize) -> Result<Pool, PgcastError> {
    Ok(pgcast_listener::pool(
        url.pg_config().clone(),
        tls_connector(url)?,
        max_size,
    )?)
}

/// The LISTEN side of `url` (give it the session URL, [`Database::listen_url`]), reading the
/// log through `log`.
pub fn listener(
    url: &DatabaseUrl,
    log: EventLog,
) -> Result<Listener<MakeRustlsConnect>, PgcastError> {
    Ok(Listener::new(url.pg_config().clone(), log).with_tls(tls_connector(url)?))
}

/// A failed connection as one line: a TLS failure names the host, the `sslmode` and what did
/// not verify; anything else keeps tokio-postgres's error (and the server's message).
fn connect_error(url: &DatabaseUrl, error: tokio_postgres::Error) -> PgcastError {
    match tls_failure(url, &error) {
        Some(message) => PgcastError::Tls(message),
        None => PgcastError::Connect(error),
    }
}

fn tls_failure(url: &DatabaseUrl, error: &tokio_postgres::Error) -> Option<String> {
    // tokio-postgres has no public error kind; its TLS errors all read like this.
    if !error
        .to_string()
        .starts_with("error performing TLS handshake")
    {
        return None;
    }
    let cause = std::error::Error::source(error)?;
    let host = url.hosts();
    let mode = url.tls().mode;
    // tokio-rustls carries rustls's error inside an io::Error.
    let rustls_error = cause
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::get_ref)
        .and_then(|e| e.downcast_ref::<TlsError>());
    Some(match rustls_error {
        Some(TlsError::InvalidCertificate(e)) => format!(
            "certificate verify failed for host {host} (sslmode={mode}): {}",
            explain(e, url)
        ),
        Some(e) => format!("handshake with host {host} failed (sslmode={mode}): {e}"),
        None if cause.to_string() == "server does not support TLS" => format!(
            "host {host} does not accept TLS connections, which sslmode={mode} requires \
             (turn ssl on in its postgresql.conf, or use sslmode=prefer)"
        ),
        None => format!("handshake with host {host} failed (sslmode={mode}): {cause}"),
    })
}

/// What a certificate error means for the operator.
fn explain(error: &CertificateError, url: &DatabaseUrl) -> String {
    match error {
        CertificateError::UnknownIssuer => {
            let roots = match &url.tls().roots {
                RootCerts::File { path, .. } => format!("a CA of sslrootcert {}", path.display()),
                RootCerts::System => "a CA of the system's trust store".to_owned(),
                RootCerts::None => "a known CA".to_owned(),
            };
            format!("the server's certificate is not signed by {roots} (unknown issuer)")
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!(
                "{error}; connect with a name the certificate gives, or use sslmode=verify-ca \
                 to verify the chain only"
            )
        }
        other => other.to_string(),
    }
}
