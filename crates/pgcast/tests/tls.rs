//! TLS to PostgreSQL and the listen connection, against real servers: a private cluster started
//! with `ssl = on`, a server certificate for `localhost` signed by a CA made here, and a
//! `pg_hba.conf` that accepts TLS connections only (`hostssl`).
//!
//! | sslmode (and roots) | outcome |
//! |---|---|
//! | `verify-full`, the CA, host `localhost` | connects, encrypted, `doctor` says verified |
//! | `verify-full`, the CA, host `127.0.0.1` | refused: the certificate does not name it |
//! | `verify-full`/`verify-ca`/`require`, another CA | refused: unknown issuer |
//! | `verify-ca`, the CA, host `127.0.0.1` | connects: the chain is enough |
//! | `require`, no roots | connects, encrypted, not verified |
//! | `disable` | refused by the server (`hostssl` only) |
//! | `prefer` | encrypted here; plain against a server without TLS |
//! | `require` against a server without TLS | refused |
//!
//! Then `serve` and `tail` over verified TLS, and `doctor`'s LISTEN probe through a "pooler"
//! that drops notifications, fixed by `--listen-database-url`.

mod common;
mod running;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::{pgcast, run, Run};
use pgcast::{DatabaseUrl, PgcastError};
use pgcast_testkit::{ClusterOptions, PgCluster};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use running::{serve_command, Process, Server, SECRET};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

/// Accepts TLS only, except on the Unix socket (where PostgreSQL never offers TLS).
const HBA: &str = "\
local   all all              trust
hostssl all all 127.0.0.1/32 trust
hostssl all all ::1/128      trust
";

/// The cluster with TLS, shared by the tests of this file (each uses a database of its own).
struct TlsCluster {
    cluster: PgCluster,
    /// The CA that signed the server's certificate.
    ca: PathBuf,
    /// A CA that signed nothing the server has.
    other_ca: PathBuf,
}

fn ca(name: &str) -> (Certificate, KeyPair) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (params.self_signed(&key).expect("self-sign the CA"), key)
}

fn tls_cluster() -> &'static TlsCluster {
    static CLUSTER: OnceLock<TlsCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let (ca_cert, ca_key) = ca("pgcast test CA");
        let (other_cert, _) = ca("pgcast other CA");
        let server_key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server_cert = params
            .signed_by(&server_key, &ca_cert, &ca_key)
            .expect("sign the server certificate");
        // The CA files live in the data directory too: removed with the cluster.
        let cluster = PgCluster::start_with(
            ClusterOptions::new()
                .file("server.crt", server_cert.pem())
                .file("server.key", server_key.serialize_pem())
                .file("test-ca.pem", ca_cert.pem())
                .file("other-ca.pem", other_cert.pem())
                .file("pg_hba.conf", HBA)
                .setting("ssl", "on")
                .setting("ssl_cert_file", "server.crt")
                .setting("ssl_key_file", "server.key"),
        )
        .expect("start a cluster with ssl = on");
        let dir = cluster.data_dir().to_path_buf();
        TlsCluster {
            cluster,
            ca: dir.join("test-ca.pem"),
            other_ca: dir.join("other-ca.pem"),
        }
    })
}

impl TlsCluster {
    /// `postgres://postgres@<host>:<port>/<db>?<params>`.
    fn url(&self, host: &str, db: &str, params: &str) -> String {
        format!(
            "postgres://postgres@{host}:{}/{db}?{params}",
            self.cluster.port()
        )
    }

    fn verify_full(&self, db: &str) -> String {
        self.url(
            "localhost",
            db,
            &format!("sslmode=verify-full&sslrootcert={}", self.ca.display()),
        )
    }

    /// A new database, created over a verified TLS connection (the test kit's own
    /// connections are plain, which this server refuses).
    async fn create_database(&self) -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("tls_{}_{n}", std::process::id());
        let url = DatabaseUrl::parse(&self.verify_full("postgres")).expect("URL");
        let admin = pgcast::connect(&url, "tls-test").await.expect("connect");
        // Identifiers cannot be bind parameters; the name is ours and only `[a-z0-9_]`.
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        name
    }

    /// A migrated database of its own.
    async fn migrated_database(&self) -> String {
        let db = self.create_database().await;
        let out = run(command([
            "migrate",
            "--database-url",
            &self.verify_full(&db),
        ]))
        .await;
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        db
    }
}

/// The binary with no libpq variables from the machine, and a HOME without
/// `~/.postgresql/root.crt`.
fn command<const N: usize>(args: [&str; N]) -> Command {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    let home = HOME.get_or_init(|| tempfile::tempdir().expect("empty HOME"));
    let mut cmd = pgcast(args);
    for var in ["PGSSLMODE", "PGSSLROOTCERT", "PGCAST_LISTEN_DATABASE_URL"] {
        cmd.env_remove(var);
    }
    cmd.env("HOME", home.path());
    cmd
}

async fn doctor(url: &str) -> Run {
    run(command(["doctor", "--database-url", url])).await
}

/// The detail of `doctor`'s line for check `name`.
fn check_line<'a>(out: &'a Run, name: &str) -> &'a str {
    out.stdout
        .lines()
        .find(|line| {
            line.get(6..6 + name.len()) == Some(name) && line[6 + name.len()..].starts_with(' ')
        })
        .unwrap_or_else(|| panic!("no {name} line in:\n{}\n{}", out.stdout, out.stderr))
}

/// A refused connection: exit status 1 and one line on stderr.
fn refused(out: &Run) -> &str {
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in:\n{}", out.stderr));
    assert!(!out.stdout.contains("healthy"), "{}", out.stdout);
    line
}

#[tokio::test]
async fn verify_full_with_the_ca_connects_encrypted_and_verified() {
    let tls = tls_cluster();
    let db = tls.migrated_database().await;
    let out = doctor(&tls.verify_full(&db)).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let line = check_line(&out, "tls");
    assert!(line.starts_with("ok "), "{line}");
    assert!(line.contains("encrypted: TLSv1."), "{line}");
    assert!(
        line.contains("certificate and host name are verified"),
        "{line}"
    );
    // The summary shows the TLS settings, not the password.
    assert!(
        out.stderr.contains(&format!(
            "sslmode=verify-full&sslrootcert={}",
            tls.ca.display()
        )),
        "{}",
        out.stderr
    );

    // The key=value form says the same.
    let keywords = format!(
        "host=localhost port={} user=postgres dbname={db} sslmode=verify-full sslrootcert='{}'",
        tls.cluster.port(),
        tls.ca.display()
    );
    let out = doctor(&keywords).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
}

#[tokio::test]
async fn verify_full_refuses_a_host_name_the_certificate_does_not_give() {
    let tls = tls_cluster();
    let db = tls.create_database().await;
    let params = format!("sslmode=verify-full&sslrootcert={}", tls.ca.display());
    let out = doctor(&tls.url("127.0.0.1", &db, &params)).await;
    let line = refused(&out);
    assert!(
        line.starts_with(
            "error: TLS: certificate verify failed for host 127.0.0.1 (sslmode=verify-full): \
             certificate not valid for name \"127.0.0.1\""
        ),
        "{line}"
    );
    assert!(line.contains("localhost"), "{line}");

    // verify-ca checks the chain only: the same connection is accepted.
    let params = format!("sslmode=verify-ca&sslrootcert={}", tls.ca.display());
    let out = run(command([
        "migrate",
        "--database-url",
        &tls.url("127.0.0.1", &db, &params),
    ]))
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = doctor(&tls.url("127.0.0.1", &db, &params)).await;
    let line = check_line(&out, "tls");
    assert!(
        line.contains("chain is verified, not its host name"),
        "{line}"
    );
}

#[tokio::test]
async fn a_certificate_of_another_ca_is_refused() {
    let tls = tls_cluster();
    let db = tls.create_database().await;
    // require with a root certificate verifies the chain, as libpq does.
    for mode in ["verify-full", "verify-ca", "require"] {
        let params = format!("sslmode={mode}&sslrootcert={}", tls.other_ca.display());
        let out = doctor(&tls.url("localhost", &db, &params)).await;
        let line = refused(&out);
        assert_eq!(
            line,
            format!(
                "error: TLS: certificate verify failed for host localhost (sslmode={mode}): the \
                 server's certificate is not signed by a CA of sslrootcert {} (unknown issuer)",
                tls.other_ca.display()
            )
        );
    }

    // The library says the same, as its own error.
    let url = DatabaseUrl::parse(&tls.url(
        "localhost",
        &db,
        &format!("sslmode=verify-full&sslrootcert={}", tls.other_ca.display()),
    ))
    .expect("URL");
    match pgcast::connect(&url, "tls-test").await {
        Err(PgcastError::Tls(message)) => assert!(message.contains("unknown issuer"), "{message}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[tokio::test]
async fn require_encrypts_without_verifying() {
    let tls = tls_cluster();
    let db = tls.migrated_database().await;
    let out = doctor(&tls.url("127.0.0.1", &db, "sslmode=require")).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let line = check_line(&out, "tls");
    assert!(line.contains("encrypted: TLSv1."), "{line}");
    assert!(
        line.contains("certificate is not verified (sslmode=require"),
        "{line}"
    );
}

#[tokio::test]
async fn disable_is_refused_by_a_hostssl_only_server() {
    let tls = tls_cluster();
    let db = tls.create_database().await;
    let out = doctor(&tls.url("localhost", &db, "sslmode=disable")).await;
    let line = refused(&out);
    assert!(
        line.starts_with("error: could not connect to the database: "),
        "{line}"
    );
    assert!(line.contains("no pg_hba.conf entry for host"), "{line}");
    assert!(line.contains("no encryption"), "{line}");
}

#[tokio::test]
async fn prefer_uses_tls_when_the_server_offers_it_and_require_insists() {
    let tls = tls_cluster();
    let db = tls.migrated_database().await;
    // libpq's default: no sslmode at all.
    let out = doctor(&tls.url("localhost", &db, "")).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(
        check_line(&out, "tls").contains("encrypted: TLSv1."),
        "{}",
        out.stdout
    );

    // The shared test cluster has no TLS: prefer connects in plain, require refuses.
    let (plain, _client) = common::migrated_db().await;
    let out = doctor(plain.url()).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let line = check_line(&out, "tls");
    assert!(
        line.starts_with("ok ") && line.contains("not encrypted (sslmode=prefer)"),
        "{line}"
    );
    let out = doctor(&format!("{}?sslmode=require", plain.url())).await;
    let line = refused(&out);
    assert_eq!(
        line,
        "error: TLS: host 127.0.0.1 does not accept TLS connections, which sslmode=require \
         requires (turn ssl on in its postgresql.conf, or use sslmode=prefer)"
    );
}

#[tokio::test]
async fn pgsslmode_and_pgsslrootcert_apply_to_a_url_without_them() {
    let tls = tls_cluster();
    let db = tls.migrated_database().await;
    let url = tls.url("localhost", &db, "");
    let mut cmd = command(["doctor", "--database-url", &url]);
    cmd.env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &tls.ca);
    let out = run(cmd).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(check_line(&out, "tls").contains("host name are verified"));

    let mut cmd = command(["doctor", "--database-url", &url]);
    cmd.env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &tls.other_ca);
    let line = refused(&run(cmd).await).to_owned();
    assert!(line.contains("unknown issuer"), "{line}");
}

#[tokio::test]
async fn tls_settings_that_cannot_work_are_bad_values() {
    let tls = tls_cluster();
    for (params, expected) in [
        (
            "sslcert=/etc/client.pem",
            "client certificates are not supported yet",
        ),
        (
            "sslrootcert=system&sslmode=require",
            "weak sslmode \"require\" may not be used with sslrootcert=system",
        ),
        (
            "sslmode=verify-full",
            "sslmode=verify-full needs root certificates",
        ),
        (
            "sslrootcert=/nonexistent/ca.pem",
            "sslrootcert /nonexistent/ca.pem: ",
        ),
        ("sslmode=allow", "sslmode=allow is not supported"),
    ] {
        let url = tls.url("localhost", "x", &format!("password=hunter2&{params}"));
        let out = run(command(["doctor", "--database-url", &url])).await;
        assert_eq!(out.code, Some(2), "{params}: {}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        assert!(out.stderr.contains(expected), "{params}: {}", out.stderr);
        assert!(!out.stderr.contains("hunter2"), "{}", out.stderr);
    }
}

#[tokio::test]
async fn serve_and_tail_run_over_verified_tls() {
    let tls = tls_cluster();
    let db = tls.migrated_database().await;
    let url = tls.verify_full(&db);

    let mut cmd = serve_command(&url, "127.0.0.1:0", SECRET);
    cmd.env_remove("PGSSLMODE").env_remove("PGSSLROOTCERT");
    let server = Server::ready(Process::spawn(cmd)).await;
    let mut cmd = command(["tail", "--database-url", &url]);
    cmd.env_remove("RUST_LOG");
    let mut tail = Process::spawn(cmd);

    // Every connection of both (this server accepts nothing else): listeners (serve's
    // `pgcast-listener`, tail's `pgcast-tail`) and pools.
    let admin = pgcast::connect(&DatabaseUrl::parse(&url).expect("URL"), "tls-test")
        .await
        .expect("connect");
    let query =
        "SELECT count(*) FILTER (WHERE a.application_name ~ '^pgcast-(listener|tail)(:[0-9]+)?$'), \
                        count(*) FILTER (WHERE NOT s.ssl) \
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.datname = current_database()";
    let deadline = tokio::time::Instant::now() + running::WAIT;
    loop {
        let row = admin.query_one(query, &[]).await.expect("pg_stat_ssl");
        let (listeners, plain): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(plain, 0, "a plain session on a hostssl-only server");
        if listeners == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{listeners} listeners; tail stderr:\n{}",
            tail.stderr()
        );
        tokio::time::sleep(running::POLL).await;
    }
    let id: uuid::Uuid = admin
        .query_one(
            "INSERT INTO session_assignments (session_id, status) \
             VALUES (gen_random_uuid(), 'queued') RETURNING id",
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    let id = id.to_string();
    tail.wait_stdout(|out| out.contains(&id)).await;
    assert_eq!(server.get("/readyz").await.0, 200);
}

/// A stand-in for a transaction pooler in front of PostgreSQL: it forwards everything but the
/// notifications (`NotificationResponse`, type `A`), which is what a LISTEN through PgBouncer
/// in transaction mode gets. Like a pooler without TLS, it answers an SSLRequest with `N`.
async fn notification_dropping_proxy(upstream: u16) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = proxy(client, upstream).await;
            });
        }
    });
    port
}

async fn proxy(mut client: TcpStream, upstream: u16) -> std::io::Result<()> {
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let mut first = [0u8; 8];
    client.read_exact(&mut first).await?;
    let mut server = TcpStream::connect(("127.0.0.1", upstream)).await?;
    if first == SSL_REQUEST {
        client.write_all(b"N").await?;
    } else {
        server.write_all(&first).await?;
    }
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upward = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    });
    // Server messages: a type byte, then a length that counts itself.
    loop {
        let mut header = [0u8; 5];
        if server_read.read_exact(&mut header).await.is_err() {
            break;
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        server_read.read_exact(&mut body).await?;
        if header[0] == b'A' {
            continue;
        }
        client_write.write_all(&header).await?;
        client_write.write_all(&body).await?;
    }
    upward.abort();
    Ok(())
}

#[tokio::test]
async fn doctor_finds_a_listen_that_hears_nothing_and_listen_database_url_fixes_it() {
    let (db, _client) = common::migrated_db().await;
    let pooler = notification_dropping_proxy(db.port()).await;
    let pooled = format!("postgres://postgres@127.0.0.1:{pooler}/{}", db.name());

    let out = doctor(&pooled).await;
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    let line = check_line(&out, "listen probe");
    assert!(line.starts_with("FAIL"), "{line}");
    assert!(
        line.contains("a LISTEN through --database-url heard nothing within 5s of a NOTIFY"),
        "{line}"
    );
    assert!(line.contains("--listen-database-url"), "{line}");
    assert!(
        out.stdout.ends_with("UNHEALTHY: listen probe\n"),
        "{}",
        out.stdout
    );

    let mut cmd = command(["doctor", "--database-url", &pooled]);
    cmd.env("PGCAST_LISTEN_DATABASE_URL", db.url());
    let out = run(cmd).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let line = check_line(&out, "listen probe");
    assert!(
        line.starts_with("ok ")
            && line.contains("a LISTEN through --listen-database-url hears a NOTIFY"),
        "{line}"
    );
    assert!(
        check_line(&out, "listen tls").contains("not encrypted"),
        "{}",
        out.stdout
    );
    // The summary names both, without passwords.
    assert!(
        out.stderr.contains(&format!(
            "doctor database=postgres://postgres@127.0.0.1:{pooler}/{} listen_database=",
            db.name()
        )),
        "{}",
        out.stderr
    );

    // serve takes the same flag: its listener connects directly and gets ready.
    let mut cmd = serve_command(&pooled, "127.0.0.1:0", SECRET);
    cmd.args(["--listen-database-url", db.url()]);
    let server = Server::ready(Process::spawn(cmd)).await;
    assert_eq!(server.get("/readyz").await.0, 200);
}
