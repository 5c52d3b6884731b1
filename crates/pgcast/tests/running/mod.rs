//! The built `pgcast` binary running as a child process (`serve` or `demo`), with its output
//! captured; the clients a test talks to it with (HTTP/1.0 GET, the wire-protocol WebSocket
//! client, tokens) are the test kit's, re-exported here.
//!
//! Every child is killed when its handle drops, so a failing test leaves no process behind.
#![allow(dead_code, unused_imports, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::Duration;

use pgcast_events::{Principal, Role};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;

pub use pgcast_testkit::http::{connect_from, http_get, http_get_from, sample};
pub use pgcast_testkit::ws::{Next, Ws, WAIT};

use crate::common::{pgcast, LIMIT};

/// The token secret of every `serve` the tests start.
pub const SECRET: &str = "process-test-secret-of-at-least-32-bytes";
/// How often a polled condition (an HTTP status, a row count) is checked again.
pub const POLL: Duration = Duration::from_millis(25);
/// What `serve` logs when it accepts connections.
const READY: &str = "pgcast ready on http://";

/// Output of a pipe, accumulated as it arrives (read continuously, so the child never blocks
/// on a full pipe).
fn capture(pipe: impl AsyncRead + Unpin + Send + 'static) -> watch::Receiver<String> {
    let (tx, rx) = watch::channel(String::new());
    tokio::spawn(async move {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    tx.send_modify(|all| all.push_str(&text));
                }
            }
        }
        // Dropping `tx` tells waiters that no more output will come.
    });
    rx
}

/// A child `pgcast` process; killed (SIGKILL) when dropped.
pub struct Process {
    child: Child,
    stdout: watch::Receiver<String>,
    stderr: watch::Receiver<String>,
}

impl Process {
    /// Spawns `cmd` (made by [`pgcast`], so stdout and stderr are piped and it is killed on
    /// drop).
    pub fn spawn(mut cmd: Command) -> Process {
        cmd.env("NO_COLOR", "1");
        let mut child = cmd.spawn().expect("start pgcast");
        let stdout = capture(child.stdout.take().expect("piped stdout"));
        let stderr = capture(child.stderr.take().expect("piped stderr"));
        Process {
            child,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the process is still running")
    }

    /// Sends `signal` (`TERM`, `INT`, `KILL`) with `kill(1)`.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit, failing the test after `limit`; then for the end of its
    /// output, so that [`stdout`](Self::stdout) and [`stderr`](Self::stderr) are complete.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.expect("wait for pgcast"),
            Err(_) => panic!(
                "pgcast did not exit within {limit:?}; stderr:\n{}",
                self.stderr()
            ),
        };
        // The pipes close when the last process holding them ends: a process that outlives
        // pgcast with them open fails here.
        for rx in [&mut self.stdout, &mut self.stderr] {
            let closed = async { while rx.changed().await.is_ok() {} };
            if tokio::time::timeout(LIMIT, closed).await.is_err() {
                panic!("pgcast exited but its output is still open (a child left running?)");
            }
        }
        status
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.borrow().clone()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.borrow().clone()
    }

    /// Waits until stdout satisfies `done`; fails if the process closes it first or after
    /// [`LIMIT`].
    pub async fn wait_stdout(&mut self, done: impl FnMut(&String) -> bool) -> String {
        let stderr = self.stderr.clone();
        wait_output(&mut self.stdout, done, "stdout", &stderr).await
    }

    /// Waits until stderr satisfies `done`; fails if the process closes it first or after
    /// [`LIMIT`].
    pub async fn wait_stderr(&mut self, done: impl FnMut(&String) -> bool) -> String {
        let stderr = self.stderr.clone();
        wait_output(&mut self.stderr, done, "stderr", &stderr).await
    }
}

async fn wait_output(
    rx: &mut watch::Receiver<String>,
    done: impl FnMut(&String) -> bool,
    which: &str,
    stderr: &watch::Receiver<String>,
) -> String {
    match tokio::time::timeout(LIMIT, rx.wait_for(done)).await {
        Ok(Ok(text)) => text.clone(),
        Ok(Err(_)) => panic!(
            "pgcast closed its {which} (exited?) before the expected output; stderr:\n{}",
            stderr.borrow().as_str()
        ),
        Err(_) => panic!(
            "expected output not on {which} within {LIMIT:?}; stderr:\n{}",
            stderr.borrow().as_str()
        ),
    }
}

/// The listener's log lines that follow a change of `/readyz` (its status is set first).
const LISTENER_CAUGHT_UP: &str = "listener connected and caught up";
const LISTENER_LOST: &str = "listener connection lost";

/// Whether the listener's last logged transition in `stderr` is "connected and caught up".
fn listener_ready(stderr: &str) -> bool {
    match (
        stderr.rfind(LISTENER_CAUGHT_UP),
        stderr.rfind(LISTENER_LOST),
    ) {
        (Some(up), Some(lost)) => up > lost,
        (up, _) => up.is_some(),
    }
}

/// A `pgcast serve` (or `demo`) that logged its ready line and whose `/readyz` answered 200.
pub struct Server {
    pub process: Process,
    pub addr: SocketAddr,
}

impl Server {
    /// `pgcast serve --listen 127.0.0.1:0 --database-url <url> --jwt-secret <SECRET> --migrate`
    /// followed by `extra`.
    pub async fn serve(url: &str, extra: &[&str]) -> Server {
        let mut cmd = serve_command(url, "127.0.0.1:0", SECRET);
        cmd.args(extra);
        Server::ready(Process::spawn(cmd)).await
    }

    /// Like [`ready`](Self::ready), but a process that exits before its ready line (a port
    /// taken, a database refusing) is an `Err` with its stderr instead of a failed test.
    pub async fn try_ready(mut process: Process) -> Result<Server, String> {
        let waited =
            tokio::time::timeout(LIMIT, process.stderr.wait_for(|text| text.contains(READY)))
                .await
                .map(|r| r.map(|text| text.clone()));
        let stderr = match waited {
            Ok(Ok(text)) => text,
            Ok(Err(_)) => return Err(process.stderr()),
            Err(_) => panic!(
                "no ready line within {LIMIT:?}; stderr:\n{}",
                process.stderr()
            ),
        };
        let server = Server {
            addr: ready_addr(&stderr),
            process,
        };
        server.wait_readyz(200).await;
        Ok(server)
    }

    /// Waits for `process` to log its ready line and for its listener to be ready.
    pub async fn ready(mut process: Process) -> Server {
        let stderr = process.wait_stderr(|text| text.contains(READY)).await;
        let addr = ready_addr(&stderr);
        let server = Server { process, addr };
        server.wait_readyz(200).await;
        server
    }

    /// `GET path` → (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path).await
    }

    /// Waits until the listener's last logged transition is the one `status` stands for (200:
    /// connected and caught up; 503: connection lost), then checks that `/readyz` says so. The
    /// listener sets its status before it logs the transition, so no polling is needed.
    pub async fn wait_readyz(&self, status: u16) {
        let want_ready = status == 200;
        let mut stderr = self.process.stderr.clone();
        wait_output(
            &mut stderr,
            |text| listener_ready(text) == want_ready,
            "stderr",
            &self.process.stderr,
        )
        .await;
        let (got, body) = self.get("/readyz").await;
        assert_eq!(
            got,
            status,
            "/readyz answered {got} ({body:?}) after the listener logged its transition; stderr:\n{}",
            self.process.stderr()
        );
    }

    /// `/metrics` as text, after checking the status.
    pub async fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// A WebSocket client authenticated with `token`.
    pub async fn client(&self, token: &str) -> Ws {
        Ws::connect(self.addr, token).await
    }

    /// A client with a `service` token of [`SECRET`], subscribed (live) to `assignments`.
    pub async fn service_subscriber(&self) -> Ws {
        let mut ws = self.client(&token(SECRET.as_bytes(), Role::Service)).await;
        ws.subscribe("assignments", json!({})).await;
        ws
    }
}

/// `pgcast serve --listen <listen> --database-url <url> --jwt-secret <secret> --migrate`.
///
/// Every test client comes from 127.0.0.1, where a deployment's clients come from many
/// addresses: the per-address limits are lifted through the environment (so a test's own flags
/// still set them; `edge.rs` tests them), the process-wide ones stay.
pub fn serve_command(url: &str, listen: &str, secret: &str) -> Command {
    let mut cmd = pgcast([
        "serve",
        "--listen",
        listen,
        "--database-url",
        url,
        "--jwt-secret",
        secret,
        "--migrate",
    ]);
    cmd.env("PGCAST_MAX_CONNECTIONS_PER_IP", "0")
        .env("PGCAST_CONNECTION_RATE_PER_IP", "0")
        .env("PGCAST_MAX_UNAUTHENTICATED", "20000")
        .env("PGCAST_MAX_UNAUTHENTICATED_PER_IP", "19999");
    cmd
}

/// The address in the ready line `pgcast ready on http://ADDR (WebSocket ws://ADDR/ws)`.
pub fn ready_addr(stderr: &str) -> SocketAddr {
    let (_, rest) = stderr.split_once(READY).expect("ready line");
    let addr = rest
        .split_whitespace()
        .next()
        .expect("address after http://");
    addr.parse()
        .unwrap_or_else(|e| panic!("not an address ({e}): {addr:?} in {stderr}"))
}

/// A token signed with `secret` for a new user of `role`.
pub fn token(secret: &[u8], role: Role) -> String {
    pgcast_testkit::token::token(secret, role)
}

/// A token signed with `secret` for `who`, valid for `ttl`.
pub fn token_for(secret: &[u8], who: &Principal, ttl: Duration) -> String {
    pgcast_testkit::token::mint(secret, who, ttl)
}
