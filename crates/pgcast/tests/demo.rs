//! `pgcast demo` from nothing: it initialises and starts its own PostgreSQL, serves simulated
//! traffic to the printed mechanic URL (its token in the fragment, never the query), leaves the
//! printed customer's sessions to the person playing them, stops everything on SIGTERM, and
//! reuses its data on the next start.

mod common;
mod running;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::pgcast;
use pgcast_localpg::{LocalPg, StopMode};
use running::{Process, Server};
use serde_json::json;
use tempfile::TempDir;
use tokio::time::Instant;
use tokio_postgres::NoTls;
use uuid::Uuid;

/// Graceful shutdown, PostgreSQL included, must finish within this (the README's "Operating it").
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(10);

/// A fresh directory for the demo's data, under /tmp so that the `postgres` OS user (used when
/// the tests run as root) can reach it. Dropping it stops any PostgreSQL still running there,
/// then removes it.
struct DemoDir {
    root: TempDir,
}

impl DemoDir {
    fn new() -> DemoDir {
        let root = tempfile::Builder::new()
            .prefix("pgcast-demo-test-")
            .tempdir_in("/tmp")
            .expect("temporary directory");
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755))
            .expect("make the directory reachable");
        DemoDir { root }
    }

    /// The `--data-dir`; it does not exist before the first demo.
    fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// Processes whose command line mentions the data directory (the postmaster's does).
    fn processes(&self) -> Vec<String> {
        let needle = self.data().to_string_lossy().into_owned();
        let mut found = Vec::new();
        for entry in fs::read_dir("/proc").expect("read /proc").flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            // A process may end while we look.
            let Ok(raw) = fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmdline.contains(&needle) {
                found.push(format!("{pid}: {cmdline}"));
            }
        }
        found
    }

    /// No PostgreSQL runs on the data directory, and it was shut down cleanly.
    fn assert_no_postgres(&self) {
        let left = self.processes();
        assert!(left.is_empty(), "processes left behind: {left:#?}");
        assert!(
            !self.data().join("postmaster.pid").exists(),
            "postmaster.pid left in {}",
            self.data().display()
        );
        let pg = LocalPg::open_or_init(&self.data(), 0).expect("the demo's cluster");
        assert!(!pg.is_running(), "pg_ctl status: running");
    }
}

impl Drop for DemoDir {
    fn drop(&mut self) {
        // Only when a test failed with the demo's PostgreSQL still up.
        let data = self.data();
        if data.join("postmaster.pid").exists() && data.join("PG_VERSION").exists() {
            let stopped =
                LocalPg::open_or_init(&data, 0).and_then(|pg| pg.stop(StopMode::Immediate));
            if let Err(e) = stopped {
                eprintln!(
                    "could not stop the demo PostgreSQL in {}: {e}",
                    data.display()
                );
            }
        }
    }
}

/// A running demo and what it printed.
struct Demo {
    server: Server,
    /// Token of the mechanic queue URL (a mechanic of the first workshop).
    mechanic_token: String,
    /// The customer page's token, and that customer.
    customer_token: String,
    customer: Uuid,
    /// The demo PostgreSQL's port on 127.0.0.1.
    pg_port: u16,
}

/// The `token` of a URL's fragment (`…#token=<jwt>`).
fn fragment_token(url: &str) -> String {
    let (_, fragment) = url
        .split_once('#')
        .unwrap_or_else(|| panic!("no fragment in {url}"));
    fragment
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| panic!("no token in the fragment of {url}"))
        .to_owned()
}

/// The `sub` claim of a JWT, read without verifying it.
fn claimed_sub(token: &str) -> Uuid {
    pgcast_testkit::token::claims(token)["sub"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("sub is a UUID")
}

impl Demo {
    async fn start(data_dir: &Path, extra: &[&str]) -> Demo {
        let dir = data_dir.to_str().expect("UTF-8 path");
        let mut cmd = pgcast(["demo", "--listen", "127.0.0.1:0", "--data-dir", dir]);
        cmd.args(extra);
        let mut process = Process::spawn(cmd);
        let out = process
            .wait_stdout(|text| text.contains("Press Ctrl-C to stop."))
            .await;
        let server = Server::ready(process).await;

        let urls: Vec<&str> = out
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("http://"))
            .collect();
        let url = |path: &str| {
            urls.iter()
                .find(|u| u.contains(path))
                .unwrap_or_else(|| panic!("no {path} URL in:\n{out}"))
                .to_string()
        };
        let mechanic = url("/mechanic#");
        let customer = url("/customer#");
        for u in [&mechanic, &customer] {
            assert!(
                u.starts_with(&format!("http://{}/", server.addr)),
                "URL on the served address {}: {u}",
                server.addr
            );
        }
        // Every printed link carries its token in the fragment, which the browser never sends.
        for u in &urls {
            let (before, _) = u.split_once('#').unwrap_or((u, ""));
            assert!(
                !before.contains("token="),
                "a token outside the fragment: {u}"
            );
        }
        let mechanic_token = fragment_token(&mechanic);
        let customer_token = fragment_token(&customer);
        let customer = claimed_sub(&customer_token);

        let pg_line = out
            .lines()
            .find(|l| l.contains("PostgreSQL:"))
            .unwrap_or_else(|| panic!("no PostgreSQL line in:\n{out}"));
        assert!(pg_line.contains(dir), "data directory printed: {pg_line}");
        let pg_port = pg_line
            .split_once("(port ")
            .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {pg_line}"));
        Demo {
            server,
            mechanic_token,
            customer_token,
            customer,
            pg_port,
        }
    }

    async fn connect(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(
            &format!(
                "postgres://postgres@127.0.0.1:{}/postgres?connect_timeout=10",
                self.pg_port
            ),
            NoTls,
        )
        .await
        .expect("connect to the demo's PostgreSQL");
        tokio::spawn(connection);
        client
    }

    /// SIGTERM; the demo exits 0 in time. Returns its stderr.
    async fn stop(self) -> String {
        let sent = self.terminate();
        self.exited(sent).await
    }

    /// Sends SIGTERM; returns when.
    fn terminate(&self) -> Instant {
        let sent = Instant::now();
        self.server.process.signal("TERM");
        sent
    }

    /// The demo exits 0 within [`SHUTDOWN_LIMIT`] of `sent`. Returns its stderr.
    async fn exited(mut self, sent: Instant) -> String {
        let status = self.server.process.wait_exit(SHUTDOWN_LIMIT).await;
        let took = sent.elapsed();
        let stderr = self.server.process.stderr();
        assert_eq!(status.code(), Some(0), "{status:?}\n{stderr}");
        assert!(took < SHUTDOWN_LIMIT, "exit took {took:?}");
        assert!(stderr.contains("PostgreSQL stopped"), "{stderr}");
        stderr
    }
}

#[tokio::test]
async fn demo_starts_from_nothing_serves_simulated_events_stops_cleanly_and_reuses_its_data() {
    let dir = DemoDir::new();
    assert!(!dir.data().exists());

    let demo = Demo::start(&dir.data(), &["--simulate", "50"]).await;
    assert!(
        !dir.processes().is_empty(),
        "the running PostgreSQL is found by its data directory"
    );
    // The printed pages open, with the demo's actions and an icon.
    for path in ["/", "/mechanic", "/customer", "/client.js", "/favicon.ico"] {
        let (status, _) = demo.server.get(path).await;
        assert_eq!(status, 200, "GET {path}");
    }
    // The overview links to the same pages, tokens in the fragment too.
    let (_, index) = demo.server.get("/").await;
    let hrefs: Vec<&str> = index
        .split("href=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .filter(|href| href.contains("token="))
        .collect();
    assert_eq!(hrefs.len(), 3, "three demo links with tokens in:\n{index}");
    for href in hrefs {
        let (before, _) = href.split_once('#').unwrap_or((href, ""));
        assert!(
            !before.contains("token="),
            "a token outside the fragment: {href}"
        );
    }
    assert!(index.contains(&format!("#token={}", demo.mechanic_token)));
    // The mechanic of the printed URL sees simulated changes in their queue.
    let mut mechanic = demo.server.client(&demo.mechanic_token).await;
    mechanic.subscribe("queue", json!({})).await;
    let event = mechanic.events(1).await.remove(0);
    assert_eq!(event["topic"], "queue", "{event}");
    let position = event["position"].as_i64().expect("position");
    let assignment: Uuid = event["assignment"]["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("assignment id in {event}"));
    let (_, page) = demo.server.get("/customer").await;
    assert!(page.contains(r#"<meta name="pgcast-demo-api" content="/demo/api">"#));
    // The customer of the printed URL follows their sessions (none yet: opening one is theirs
    // to play).
    let mut customer = demo.server.client(&demo.customer_token).await;
    customer
        .subscribe(
            &format!("customer:{}", demo.customer),
            json!({"snapshot": true}),
        )
        .await;
    let snapshot = customer.recv().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    assert_eq!(snapshot["assignments"], json!([]), "{snapshot}");

    // Shut down: clients get 1001, PostgreSQL stops, nothing is left running.
    let sent = demo.terminate();
    mechanic.expect_close(1001).await;
    let stderr = demo.exited(sent).await;
    assert!(stderr.contains("SIGTERM received"), "{stderr}");
    dir.assert_no_postgres();

    // Second start on the same directory: no initdb, the data of the first run is there.
    let demo = Demo::start(&dir.data(), &[]).await;
    let db = demo.connect().await;
    let found: i64 = db
        .query_one(
            "SELECT count(*) FROM session_assignments WHERE id = $1",
            &[&assignment],
        )
        .await
        .expect("look up the simulated assignment")
        .get(0);
    assert_eq!(found, 1, "the simulated assignment {assignment} survived");
    let head: i64 = db
        .query_one(
            "SELECT coalesce(max(position), 0) FROM pgcast.assignment_events",
            &[],
        )
        .await
        .expect("log head")
        .get(0);
    assert!(head >= position, "log kept: head {head} < {position}");
    // The simulator never opened a session for the customer people play.
    let played: i64 = db
        .query_one(
            "SELECT count(*) FROM sessions WHERE customer_id = $1",
            &[&demo.customer],
        )
        .await
        .expect("count the demo customer's sessions")
        .get(0);
    assert_eq!(played, 0, "the simulator left the demo customer alone");
    // A second demo on the same directory is refused, and the first one's PostgreSQL runs on.
    let data = dir.data();
    let data = data.to_str().expect("UTF-8 path");
    let mut second = Process::spawn(pgcast([
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data,
    ]));
    let status = second.wait_exit(SHUTDOWN_LIMIT).await;
    let stderr = second.stderr();
    assert_ne!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("another `pgcast demo` is running"),
        "{stderr}"
    );
    db.query_one("SELECT 1", &[])
        .await
        .expect("the first demo's PostgreSQL still runs");
    drop(db);
    // The same demo users work against the reused data.
    let mut customer = demo.server.client(&demo.customer_token).await;
    customer
        .subscribe(&format!("customer:{}", demo.customer), json!({}))
        .await;
    drop(customer);
    demo.stop().await;
    dir.assert_no_postgres();
}
