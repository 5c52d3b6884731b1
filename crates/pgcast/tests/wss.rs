//! `wss://` through `pgcast serve --tls-cert --tls-key`, against the built binary: certificates
//! from CAs made here (rcgen), clients on tokio-rustls trusting one CA or another.
//!
//! - A `wss://` client connects, authenticates, subscribes and receives an event; `/readyz`
//!   answers over `https://`; ALPN is `http/1.1`; plain `ws://` and `http://` to the port get a
//!   400 and a client trusting another CA is refused; SIGTERM closes the socket with 1001.
//! - SIGHUP with a new certificate: new connections present it (a client trusting only the
//!   new CA connects, one trusting only the old one does not), open connections stay; a key
//!   that is not the certificate's keeps the old pair; files replaced without a signal are
//!   picked up by the periodic check.
//! - A stalled or trickled handshake is closed within the header timeout, and it counts
//!   against the per-address cap like any connection.
//! - A TLS record trickled after authentication is closed at the frame timeout: the deadline
//!   sees the bytes under TLS.
//! - Bad files and half a pair exit 2 with one line, before binding.

mod common;
mod running;

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{migrated_db, pgcast, run};
use pgcast_events::Role;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use running::{connect_from, serve_command, token, Next, Process, Ws, POLL, SECRET, WAIT};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// What `serve` logs when it accepts TLS connections.
const READY: &str = "pgcast ready on https://";

/// A CA and a certificate for `localhost` it signed, with the certificate's key.
struct Authority {
    ca: Certificate,
    ca_key: KeyPair,
}

/// A server certificate (PEM) and its key (PEM).
struct Leaf {
    cert: String,
    key: String,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = params.self_signed(&ca_key).expect("self-sign the CA");
        Authority { ca, ca_key }
    }

    /// A certificate for `localhost`.
    fn leaf(&self) -> Leaf {
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("sign the server certificate");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A client configuration that trusts this CA only, offering `alpn`.
    fn client(&self, alpn: &[&str]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca.der().to_vec()))
            .expect("add the CA");
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(config)
    }
}

/// The certificate and key files `serve` is given, in a directory of their own.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(leaf: &Leaf) -> Files {
        let files = Files {
            dir: tempfile::tempdir().expect("temporary directory"),
        };
        files.replace(Some(&leaf.cert), Some(&leaf.key));
        files
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// Replaces the files given, each atomically (written aside, then renamed over the old one,
    /// as a secret volume or a careful deploy script does).
    fn replace(&self, cert: Option<&str>, key: Option<&str>) {
        for (path, text) in [(self.cert(), cert), (self.key(), key)] {
            if let Some(text) = text {
                let aside = path.with_extension("new");
                let mut file = std::fs::File::create(&aside).expect("create");
                file.write_all(text.as_bytes()).expect("write");
                file.sync_all().expect("sync");
                std::fs::rename(&aside, &path).expect("rename");
            }
        }
    }

    /// `--tls-cert <cert> --tls-key <key>`.
    fn flags(&self) -> [String; 4] {
        [
            "--tls-cert".to_owned(),
            self.cert().display().to_string(),
            "--tls-key".to_owned(),
            self.key().display().to_string(),
        ]
    }
}

/// `pgcast serve` with TLS, ready: its ready line says `https://` and `/readyz` answers 200
/// over TLS.
struct TlsServe {
    process: Process,
    addr: SocketAddr,
}

impl TlsServe {
    async fn start(url: &str, files: &Files, trust: &Authority, extra: &[&str]) -> TlsServe {
        let mut cmd = serve_command(url, "127.0.0.1:0", SECRET);
        cmd.env_remove("PGCAST_TLS_CERT")
            .env_remove("PGCAST_TLS_KEY")
            .args(files.flags())
            .args(extra);
        let mut process = Process::spawn(cmd);
        let stderr = process.wait_stderr(|text| text.contains(READY)).await;
        let (_, rest) = stderr.split_once(READY).expect("ready line");
        let addr = rest
            .split_whitespace()
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in the ready line: {stderr}"));
        assert!(
            rest.contains(&format!("(WebSocket wss://{addr}/ws)")),
            "{stderr}"
        );
        let server = TlsServe { process, addr };
        let deadline = Instant::now() + WAIT;
        loop {
            match https_get(addr, trust.client(&["http/1.1"]), "/readyz").await {
                Ok((200, _)) => break,
                other => assert!(
                    Instant::now() < deadline,
                    "/readyz over https: {other:?}; stderr:\n{}",
                    server.process.stderr()
                ),
            }
            tokio::time::sleep(POLL).await;
        }
        server
    }

    /// A TLS connection to the server as `localhost`, trusting `config`'s roots.
    async fn tls(&self, config: Arc<ClientConfig>) -> Result<TlsStream<TcpStream>, String> {
        tls_connect(self.addr, config).await
    }

    /// A `wss://` client trusting `ca`, authenticated as a new `service` user.
    async fn wss(&self, ca: &Authority) -> Result<Wss, String> {
        let tls = self.tls(ca.client(&["http/1.1"])).await?;
        let mut ws = Wss::upgrade(format!("wss://localhost:{}/ws", self.addr.port()), tls).await?;
        ws.send(json!({"type": "auth", "token": token(SECRET.as_bytes(), Role::Service)}))
            .await;
        let ready = ws.recv().await;
        assert_eq!(ready["type"], "ready", "{ready}");
        Ok(ws)
    }
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<TlsStream<TcpStream>, String> {
    let connect = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from("localhost").expect("server name");
        TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))
    };
    tokio::time::timeout(WAIT, connect)
        .await
        .unwrap_or_else(|_| Err(format!("no TLS handshake within {WAIT:?}")))
}

/// `GET path` over HTTP/1.0 in TLS → (status, body).
async fn https_get(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    path: &str,
) -> Result<(u16, String), String> {
    let mut tls = tls_connect(addr, config).await?;
    let exchange = async {
        tls.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        // The server may end without close_notify; what came before it counts.
        let _ = tls.read_to_end(&mut response).await;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(WAIT, exchange)
        .await
        .map_err(|_| format!("GET {path}: no response within {WAIT:?}"))?
        .map_err(|e| format!("GET {path}: {e}"))?;
    parse_response(&response).ok_or_else(|| format!("GET {path}: not HTTP: {response:?}"))
}

fn parse_response(response: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// A WebSocket client over TLS: the test kit's protocol client on a rustls stream.
type Wss = Ws<TlsStream<TcpStream>>;

/// Waits until the server closes `stream` (EOF or reset); `Err` if it is still open after
/// `limit`.
async fn closed<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut sink = Vec::new();
    match tokio::time::timeout(limit, stream.read_to_end(&mut sink)).await {
        Ok(_) => Ok(started.elapsed()),
        Err(_) => Err(format!("still open after {limit:?}")),
    }
}

/// The handshake error of a client that does not trust the server's certificate.
async fn refused(server: &TlsServe, ca: &Authority) -> String {
    match server.tls(ca.client(&["http/1.1"])).await {
        Ok(_) => panic!("a client trusting another CA completed the handshake"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wss_client_connects_authenticates_and_receives_an_event() {
    let (db, admin) = migrated_db().await;
    let ca = Authority::new("pgcast wss test CA");
    let other = Authority::new("pgcast other CA");
    let files = Files::new(&ca.leaf());
    let mut server = TlsServe::start(db.url(), &files, &ca, &[]).await;
    let addr = server.addr;

    // The summary names the files.
    let stderr = server.process.stderr();
    assert!(
        stderr.contains(&format!(
            "pgcast serve listen=127.0.0.1:0 tls_cert={} tls_key={} database=",
            files.cert().display(),
            files.key().display()
        )),
        "{stderr}"
    );

    // ALPN: http/1.1, whatever else the client offers; a client that wants h2 only is refused.
    let tls = server
        .tls(ca.client(&["h2", "http/1.1"]))
        .await
        .expect("handshake offering h2 and http/1.1");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    drop(tls);
    let err = server.tls(ca.client(&["h2"])).await.err();
    assert!(err.is_some(), "a client offering only h2 got a connection");

    // The wss client: auth, subscribe, an event.
    let mut ws = server.wss(&ca).await.expect("wss:// connects");
    ws.send(json!({"type": "subscribe", "id": "a", "topic": "assignments"}))
        .await;
    let subscribed = ws.recv().await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    admin
        .execute(
            "INSERT INTO session_assignments (session_id, status, customer_name) \
             VALUES (gen_random_uuid(), 'queued', 'Over TLS')",
            &[],
        )
        .await
        .expect("insert");
    let event = ws.recv().await;
    assert_eq!(event["type"], "event", "{event}");
    assert_eq!(event["event"], "assignment.created", "{event}");
    assert_eq!(event["assignment"]["customer_name"], "Over TLS", "{event}");

    // Plain ws:// and http:// to the TLS port get a 400 that says why.
    let plain = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await;
    assert!(plain.is_err(), "ws:// to the TLS port upgraded");
    let (status, body) = running::http_get(addr, "/readyz").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("speaks TLS"), "{body}");

    // A client that trusts another CA does not get through.
    let err = refused(&server, &other).await;
    assert!(err.contains("UnknownIssuer"), "{err}");

    // Shutdown closes the wss socket with 1001, as it does plain ones.
    server.process.signal("TERM");
    match ws.next(WAIT).await {
        next if next.close_code() == Some(1001) => {}
        other => panic!("expected close 1001, got {other:?}"),
    }
    let status = server.process.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{}", server.process.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_changed_files_give_new_connections_the_new_certificate() {
    let (db, _admin) = migrated_db().await;
    let first = Authority::new("pgcast first CA");
    let second = Authority::new("pgcast second CA");
    let third = Authority::new("pgcast third CA");
    let first_leaf = first.leaf();
    let files = Files::new(&first_leaf);
    let mut server = TlsServe::start(db.url(), &files, &first, &[]).await;
    let mut open = server.wss(&first).await.expect("wss with the first CA");
    refused(&server, &second).await;

    // Half a rotation: the second CA's certificate with the first key. Not loaded; the first
    // pair stays.
    let second_leaf = second.leaf();
    files.replace(Some(&second_leaf.cert), None);
    server.process.signal("HUP");
    let stderr = server
        .process
        .wait_stderr(|text| text.contains("TLS certificate not reloaded"))
        .await;
    assert!(
        stderr.contains("is not the key of the certificate"),
        "{stderr}"
    );
    server
        .wss(&first)
        .await
        .expect("the first pair still serves after a bad reload");
    refused(&server, &second).await;

    // The whole second pair: new connections present it.
    files.replace(None, Some(&second_leaf.key));
    server.process.signal("HUP");
    server
        .process
        .wait_stderr(|text| text.contains("TLS certificate reloaded"))
        .await;
    let mut new = server.wss(&second).await.expect("wss with the second CA");
    new.ping().await;
    let err = refused(&server, &first).await;
    assert!(err.contains("UnknownIssuer"), "{err}");
    // The connection made with the first certificate carries on.
    open.ping().await;

    // Files replaced without a signal: the periodic check (every 10 s) picks them up.
    let third_leaf = third.leaf();
    files.replace(Some(&third_leaf.cert), Some(&third_leaf.key));
    let started = Instant::now();
    loop {
        match server.wss(&third).await {
            Ok(mut ws) => {
                ws.ping().await;
                break;
            }
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(35),
                "the third certificate is not served {:?} after the files changed: {e}; \
                 stderr:\n{}",
                started.elapsed(),
                server.process.stderr()
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("changed files served after {:?}", started.elapsed());
    refused(&server, &second).await;
    assert!(
        server
            .process
            .stderr()
            .contains("trigger=\"the files changed\""),
        "{}",
        server.process.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_are_closed_at_the_header_timeout_and_count_per_address() {
    const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
    let (db, _admin) = migrated_db().await;
    let ca = Authority::new("pgcast slow-handshake CA");
    let files = Files::new(&ca.leaf());
    let server = TlsServe::start(
        db.url(),
        &files,
        &ca,
        &[
            "--header-timeout",
            "2s",
            "--max-connections-per-ip",
            "3",
            "--connection-rate-per-ip",
            "0",
        ],
    )
    .await;
    let addr = server.addr;
    let slow = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7));

    // Three connections from one address stall their handshakes: one sends nothing, one half a
    // ClientHello record, one trickles bytes of one.
    let started = Instant::now();
    let mut silent = connect_from(slow, addr).await.expect("connect");
    let mut half = connect_from(slow, addr).await.expect("connect");
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
        .await
        .expect("half a ClientHello");
    let mut trickle = connect_from(slow, addr).await.expect("connect");
    let trickling = tokio::spawn(async move {
        let mut sent = 0;
        for byte in [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]
            .into_iter()
            .chain(std::iter::repeat(0x03))
        {
            if trickle.write_all(&[byte]).await.is_err() {
                break;
            }
            sent += 1;
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(200), trickle.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                _ => {}
            }
        }
        sent
    });

    // They hold the address's three slots: a fourth from it is closed at once, unread; another
    // address is served meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut fourth = connect_from(slow, addr).await.expect("connect");
    let took = closed(&mut fourth, HEADER_TIMEOUT)
        .await
        .expect("the fourth connection of a full address is closed");
    assert!(
        took < Duration::from_millis(1500),
        "refused only after {took:?}"
    );
    let mut other = server.wss(&ca).await.expect("another address connects");
    other.ping().await;

    // Each stalled handshake is closed at the header timeout of its accept.
    let limit = HEADER_TIMEOUT + Duration::from_secs(3);
    for (name, stream) in [("silent", &mut silent), ("half", &mut half)] {
        let left = limit.saturating_sub(started.elapsed());
        closed(stream, left)
            .await
            .unwrap_or_else(|e| panic!("{name} handshake: {e}"));
    }
    let sent = tokio::time::timeout(limit, trickling)
        .await
        .expect("the trickled handshake is closed in time")
        .expect("trickle task");
    let all = started.elapsed();
    assert!(
        all >= HEADER_TIMEOUT - Duration::from_millis(100),
        "closed before the header timeout: {all:?}"
    );
    eprintln!("stalled handshakes closed after {all:?} (the trickler sent {sent} bytes)");

    // Their slots are free again.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut stream = connect_from(slow, addr).await.expect("connect");
        let tls = TlsConnector::from(ca.client(&["http/1.1"]))
            .connect(
                ServerName::try_from("localhost").expect("name"),
                &mut stream,
            )
            .await;
        if tls.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the address stays refused");
        tokio::time::sleep(POLL).await;
    }
}

/// A masked WebSocket text frame of `payload` (client to server).
fn client_frame(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [7u8, 1, 2, 3];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_record_held_back_is_closed_at_the_frame_timeout() {
    let (db, _admin) = migrated_db().await;
    let ca = Authority::new("pgcast trickle CA");
    let files = Files::new(&ca.leaf());
    let server = TlsServe::start(db.url(), &files, &ca, &["--frame-timeout", "1s"]).await;

    // An idle connection that sends whole frames stays past the frame timeout.
    let mut idle = server.wss(&ca).await.expect("wss");
    // A connection that sends one record of a ping frame but its last byte: the server has
    // ciphertext and no whole message.
    let mut ws = server.wss(&ca).await.expect("wss");
    ws.ping().await;
    let (tcp, conn) = ws.ws.get_mut().get_mut();
    conn.writer()
        .write_all(&client_frame(br#"{"type":"ping","id":"held"}"#))
        .expect("encrypt");
    let mut record = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut record).expect("the record");
    }
    tcp.write_all(&record[..record.len() - 1])
        .await
        .expect("all but the last byte");
    let started = Instant::now();
    match ws.next(Duration::from_secs(5)).await {
        Next::Close(_) | Next::Ended => {}
        other => panic!("expected the connection to end, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "closed only after {took:?}");
    eprintln!("held-back TLS record closed after {took:?}");
    for _ in 0..3 {
        idle.ping().await;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    idle.ping().await;
}

#[tokio::test]
async fn bad_tls_files_exit_2_with_one_line_before_binding() {
    let ca = Authority::new("pgcast bad-files CA");
    let leaf = ca.leaf();
    let files = Files::new(&leaf);
    let other = Files::new(&ca.leaf());
    let dir = files.dir.path();
    let missing = dir.join("missing.pem");
    let cert = files.cert();
    let key = files.key();
    let other_key = other.key();
    // A port that is taken: a server that bound before checking would fail on it instead.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = taken.local_addr().expect("address").to_string();
    let p = |path: &Path| path.display().to_string();
    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (
            vec![
                "--tls-cert".into(),
                p(&missing),
                "--tls-key".into(),
                p(&key),
            ],
            "--tls-cert",
            "cannot read the file",
        ),
        (
            vec!["--tls-cert".into(), p(dir), "--tls-key".into(), p(&key)],
            "--tls-cert",
            "cannot read the file",
        ),
        (
            vec!["--tls-cert".into(), p(&key), "--tls-key".into(), p(&key)],
            "--tls-cert",
            "holds no PEM certificate",
        ),
        (
            vec!["--tls-cert".into(), p(&cert), "--tls-key".into(), p(&cert)],
            "--tls-key",
            "holds no private key",
        ),
        (
            vec![
                "--tls-cert".into(),
                p(&cert),
                "--tls-key".into(),
                p(&other_key),
            ],
            "--tls-key",
            "is not the key of the certificate",
        ),
        (vec!["--tls-cert".into(), p(&cert)], "--tls-key", "required"),
        (vec!["--tls-key".into(), p(&key)], "--tls-cert", "required"),
    ];
    for (args, flag, says) in cases {
        let mut cmd = pgcast([
            "serve",
            "--listen",
            &listen,
            "--database-url",
            "postgres://pgcast@127.0.0.1:1/none",
            "--jwt-secret",
            SECRET,
        ]);
        cmd.env_remove("PGCAST_TLS_CERT")
            .env_remove("PGCAST_TLS_KEY")
            .args(&args);
        let out = run(cmd).await;
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.stderr);
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {}", out.stderr);
        assert!(
            lines[0].starts_with("error:") && lines[0].contains(flag) && lines[0].contains(says),
            "{args:?}: {}",
            lines[0]
        );
    }
    // The same through the environment.
    let mut cmd = pgcast([
        "serve",
        "--listen",
        &listen,
        "--database-url",
        "postgres://pgcast@127.0.0.1:1/none",
        "--jwt-secret",
        SECRET,
    ]);
    cmd.env("PGCAST_TLS_CERT", &cert)
        .env("PGCAST_TLS_KEY", &other_key);
    let out = run(cmd).await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("is not the key of the certificate"),
        "{}",
        out.stderr
    );
    drop(taken);
}
