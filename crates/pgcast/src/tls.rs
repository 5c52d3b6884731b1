//! `https://` and `wss://` served by pgcast itself: a rustls server whose certificate chain and
//! key are read from PEM files at start, and read again on SIGHUP or when the files change.
//!
//! ```text
//!  accept ─▶ per-address cap and rate ─▶ FrameDeadline<TCP> ─▶ TLS handshake (--header-timeout)
//!         ─▶ hyper HTTP/1 (ALPN http/1.1, --header-timeout again for the request head) ─▶ router
//!                              ▲ each handshake takes the current pair from the resolver
//!  SIGHUP, or a file changed (checked every 10 s) ─▶ read both ─▶ a valid pair? swap : log, keep
//! ```
//!
//! One [`ServerConfig`] serves the whole process; its certificate comes from a resolver holding
//! the current pair, swapped under a lock on reload. Handshakes in progress and connections
//! already open keep the pair they started with; new handshakes get the new one. A new pair
//! that cannot be read, or whose key is not the certificate's, is logged and the old pair
//! stays: a half-finished rotation never takes the listener down.
//!
//! The frame deadline of the edge sits under TLS, on the TCP stream (see `edge.rs`): it sees
//! every byte the peer sends, so a peer that trickles one TLS record is cut off at
//! `--frame-timeout` like one that trickles a WebSocket frame in plain text. Above TLS it would
//! see nothing until the record was complete, and rustls buffers up to 16 KiB for that.

use std::fmt;
use std::future::Future;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use clap::Args;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{InconsistentKeys, ServerConfig};
use tokio::signal::unix::{signal, SignalKind};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::PgcastError;

/// Largest certificate or key file read: a chain of a few certificates is a few KiB.
const MAX_PEM_FILE: u64 = 1 << 20;
/// How often the files are checked for a change (their size, modification time and inode; a
/// Kubernetes secret volume swaps a symbolic link, which changes the inode).
const CHECK_EVERY: Duration = Duration::from_secs(10);

/// `serve`'s TLS listener: both flags or neither.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// PEM file with the certificate chain for https:// and wss:// on --listen: the server's
    /// certificate first, then its intermediates. With --tls-key, pgcast terminates TLS itself
    /// (plain HTTP to that port gets 400); without, it speaks plain HTTP, for a proxy that
    /// terminates TLS in front. Both files are read again on SIGHUP and when they change
    /// (checked every 10 s); a new pair that does not load is logged and the old one kept. A
    /// TLS handshake must finish within --header-timeout.
    #[arg(
        long = "tls-cert",
        env = "PGCAST_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key",
        value_parser = parse_cert_file
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM file with the private key of --tls-cert (PKCS#8, or RSA or EC in their own PEM
    /// blocks; not encrypted). Required with --tls-cert.
    #[arg(
        long = "tls-key",
        env = "PGCAST_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert",
        value_parser = parse_key_file
    )]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// The TLS server of these files, `None` without them, or why they do not go together (one
    /// line, exit status 2: e.g. the key is not the certificate's).
    pub fn server(&self) -> Result<Option<TlsServer>, String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => TlsServer::load_files(cert, key).map(Some),
            // clap's `requires` makes these impossible from the command line.
            (Some(_), None) => Err("--tls-cert needs --tls-key".to_owned()),
            (None, Some(_)) => Err("--tls-key needs --tls-cert".to_owned()),
            (None, None) => Ok(None),
        }
    }
}

/// ` tls_cert=<file> tls_key=<file>` when TLS is on; nothing otherwise.
impl fmt::Display for TlsArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            write!(f, " tls_cert={} tls_key={}", cert.display(), key.display())?;
        }
        Ok(())
    }
}

fn parse_cert_file(text: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(text);
    read_certs(&path)?;
    Ok(path)
}

fn parse_key_file(text: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(text);
    read_key(&path)?;
    Ok(path)
}

/// The crypto provider, explicitly ring (as for TLS to PostgreSQL): never an ambiguous
/// process default.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads `path`, at most [`MAX_PEM_FILE`] bytes.
fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_PEM_FILE + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read the file ({e})"))?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err("larger than 1 MiB: not a PEM file".to_owned());
    }
    Ok(bytes)
}

/// The certificates of a PEM file, in order; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM file ({e})"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned());
    }
    Ok(certs)
}

/// The first private key of a PEM file, loaded for signing.
fn read_key(path: &Path) -> Result<Arc<dyn SigningKey>, String> {
    let bytes = read_pem(path)?;
    let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => "holds no private key (-----BEGIN PRIVATE KEY-----, RSA \
                                     PRIVATE KEY or EC PRIVATE KEY; decrypt an encrypted key \
                                     first)"
            .to_owned(),
        e => format!("not a PEM file ({e})"),
    })?;
    provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("not a key pgcast can sign with ({e})"))
}

/// Reads both files and checks that the key is the certificate's.
fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain = read_certs(cert).map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    let signer = read_key(key).map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let pair = CertifiedKey::new(chain, signer);
    match pair.keys_match() {
        // (ring's keys all know their public key; `Unknown` would only mean "cannot tell".)
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {
            Ok(Arc::new(pair))
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(format!(
            "--tls-key {} is not the key of the certificate in --tls-cert {} (the first \
             certificate of the file must be the server's)",
            key.display(),
            cert.display()
        )),
        Err(e) => Err(format!(
            "--tls-cert {}: the first certificate is not usable ({e})",
            cert.display()
        )),
    }
}

/// The pair every new handshake gets; swapped by [`TlsServer::reload`].
#[derive(Debug)]
struct CurrentPair(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentPair {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// What identifies the files' contents without reading them: (device, inode, size,
/// modification time) of each, `None` where it cannot be read.
type Stamp = [Option<(u64, u64, u64, i64, i64)>; 2];

fn stamp(cert: &Path, key: &Path) -> Stamp {
    [cert, key].map(|path| {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
    })
}

/// pgcast's TLS server: the configuration of every handshake (TLS 1.2 and 1.3, ALPN
/// `http/1.1`, no client certificates) and the files its certificate comes from.
#[derive(Debug)]
pub struct TlsServer {
    cert: PathBuf,
    key: PathBuf,
    current: Arc<CurrentPair>,
    config: Arc<ServerConfig>,
    /// The files as they were at the last read, successful or not: a change starts a reload,
    /// and a bad pair is reported once, not at every check.
    seen: Mutex<Stamp>,
}

impl TlsServer {
    /// Reads the certificate chain and key; refuses files that cannot be read or parsed, and a
    /// key that is not the certificate's.
    pub fn load(cert: &Path, key: &Path) -> Result<TlsServer, PgcastError> {
        TlsServer::load_files(cert, key).map_err(PgcastError::Tls)
    }

    fn load_files(cert: &Path, key: &Path) -> Result<TlsServer, String> {
        let seen = stamp(cert, key);
        let pair = load_pair(cert, key)?;
        let current = Arc::new(CurrentPair(RwLock::new(pair)));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("could not set up TLS: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        // WebSockets upgrade over HTTP/1.1; a client that offers only h2 is refused in the
        // handshake, as RFC 7301 says, rather than misunderstood after it.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsServer {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current,
            config: Arc::new(config),
            seen: Mutex::new(seen),
        })
    }

    /// Reads both files again. On success new handshakes present the new pair; on failure
    /// (unreadable, unparsable, or a key that is not the certificate's) the current pair stays
    /// and the error says why. Blocking file reads: call it off the async threads.
    pub fn reload(&self) -> Result<(), PgcastError> {
        // Stamped before reading: a change during the read is seen by the next check.
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = stamp(&self.cert, &self.key);
        let pair = load_pair(&self.cert, &self.key).map_err(PgcastError::Tls)?;
        *self.current.0.write().unwrap_or_else(|e| e.into_inner()) = pair;
        Ok(())
    }

    /// True when the files differ from the last read.
    fn changed(&self) -> bool {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) != stamp(&self.cert, &self.key)
    }

    /// The acceptor of the edge's accept loop.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.clone())
    }

    /// Installs the SIGHUP handler now (a SIGHUP after this returns is seen) and returns the
    /// task that reloads the pair on SIGHUP and when the files change, until `stop`.
    pub(crate) fn reloader(
        self: &Arc<Self>,
        stop: CancellationToken,
    ) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
        let mut hangup = signal(SignalKind::hangup())?;
        let server = self.clone();
        Ok(async move {
            let mut every =
                tokio::time::interval_at(tokio::time::Instant::now() + CHECK_EVERY, CHECK_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let trigger = tokio::select! {
                    Some(()) = hangup.recv() => "SIGHUP",
                    _ = every.tick() => {
                        if !server.changed() {
                            continue;
                        }
                        "the files changed"
                    }
                    () = stop.cancelled() => return,
                };
                let reloading = server.clone();
                let cert = server.cert.display();
                let key = server.key.display();
                match tokio::task::spawn_blocking(move || reloading.reload()).await {
                    Ok(Ok(())) => tracing::info!(
                        %cert, %key, trigger,
                        "TLS certificate reloaded; new connections get it"
                    ),
                    Ok(Err(error)) => tracing::error!(
                        %error, trigger,
                        "TLS certificate not reloaded; new connections still get the previous one"
                    ),
                    Err(error) => tracing::error!(%error, "TLS certificate reload failed"),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    /// A self-signed certificate for `localhost` and its key, as PEM.
    fn self_signed() -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn current_cert(server: &TlsServer) -> CertificateDer<'static> {
        server.current.0.read().unwrap().cert[0].clone()
    }

    #[test]
    fn files_that_do_not_load_are_refused_with_the_flag_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, key_a) = self_signed();
        let (_, key_b) = self_signed();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let cert = write("cert.pem", &cert_a);
        let key = write("key.pem", &key_a);
        let other_key = write("other.pem", &key_b);
        let garbage = write(
            "garbage.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let missing = dir.path().join("missing.pem");
        TlsServer::load_files(&cert, &key).unwrap();
        for (cert, key, says) in [
            (&missing, &key, "--tls-cert"),
            (&key, &key, "holds no PEM certificate"),
            (&cert, &cert, "holds no private key"),
            (&cert, &other_key, "is not the key of the certificate"),
            (&garbage, &key, "not usable"),
            (&cert, &dir.path().to_path_buf(), "cannot read the file"),
        ] {
            let err = TlsServer::load_files(cert, key).unwrap_err();
            assert!(err.contains(says), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn a_reload_swaps_a_good_pair_in_and_keeps_the_old_one_on_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let (cert_a, key_a) = self_signed();
        std::fs::write(&cert, &cert_a).unwrap();
        std::fs::write(&key, &key_a).unwrap();
        let server = TlsServer::load(&cert, &key).unwrap();
        let first = current_cert(&server);
        assert!(!server.changed());

        // Half a rotation: the new certificate, the old key.
        let (cert_b, key_b) = self_signed();
        std::fs::write(&cert, &cert_b).unwrap();
        assert!(server.changed());
        let err = server.reload().unwrap_err().to_string();
        assert!(err.contains("is not the key"), "{err}");
        assert_eq!(current_cert(&server), first);
        assert!(
            !server.changed(),
            "a failed read is not retried until a change"
        );

        std::fs::write(&key, &key_b).unwrap();
        assert!(server.changed());
        server.reload().unwrap();
        assert_ne!(current_cert(&server), first);
        assert_eq!(
            current_cert(&server),
            CertificateDer::from_pem_slice(cert_b.as_bytes()).unwrap()
        );
    }
}
