//! The built `pgcast` binary running as a child process (`serve` or `demo`), with its output
//! captured, and the clients a test talks to it with: a tiny HTTP/1.0 GET and a WebSocket
//! client of the wire protocol (design §4).
//!
//! Every child is killed when its handle drops, so a failing test leaves no process behind.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use pgcast_events::{Principal, Role};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use crate::common::{pgcast, LIMIT};

/// The token secret of every `serve` the tests start.
pub const SECRET: &str = "process-test-secret-of-at-least-32-bytes";
/// Bound for one awaited frame or condition; never reached when things work.
pub const WAIT: Duration = Duration::from_secs(15);
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

    /// Polls `/readyz` until it answers `status`, failing after [`WAIT`].
    pub async fn wait_readyz(&self, status: u16) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (got, body) = self.get("/readyz").await;
            if got == status {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz still {got} ({body:?}), expected {status}; stderr:\n{}",
                self.process.stderr()
            );
            tokio::time::sleep(POLL).await;
        }
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
    let who = Principal {
        user_id: Uuid::new_v4(),
        role,
        workshop_id: None,
    };
    pgcast_gateway::mint_token(secret, &who, Duration::from_secs(600)).expect("mint token")
}

/// A token signed with `secret` for `who`, valid for `ttl`.
pub fn token_for(secret: &[u8], who: &Principal, ttl: Duration) -> String {
    pgcast_gateway::mint_token(secret, who, ttl).expect("mint token")
}

/// A minimal HTTP/1.0 GET: the server closes the connection after the response.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no response within {WAIT:?}"))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {path}: not an HTTP response: {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: no status in {head:?}"));
    (status, body.to_owned())
}

/// A TCP connection to `addr` from the local address `from` (any of 127/8 on Linux, which
/// routes the whole block to the loopback interface): how tests play several clients.
pub async fn connect_from(from: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(addr).await
}

/// `GET path` over HTTP/1.0 from the local address `from`: `Some((status, body))`, or `None`
/// when the server closed the connection without a response (a refusal at accept).
pub async fn http_get_from(
    from: std::net::IpAddr,
    addr: SocketAddr,
    path: &str,
) -> Option<(u16, String)> {
    let exchange = async {
        let mut stream = connect_from(from, addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = match tokio::time::timeout(WAIT, exchange).await {
        Err(_) => panic!("GET {path} from {from}: no response or close within {WAIT:?}"),
        // A refused connection may be reset while the request is being written.
        Ok(Err(_)) => return None,
        Ok(Ok(response)) if response.is_empty() => return None,
        Ok(Ok(response)) => response,
    };
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// The value of the sample `series` (name with labels exactly as exposed, e.g.
/// `pgcast_connections` or `pgcast_delivery_latency_seconds_count`) in a Prometheus text body.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key == series).then(|| value.parse().ok())?
    })
}

/// A WebSocket client of the wire protocol.
pub struct Ws {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What came next from the server.
#[derive(Debug)]
pub enum Next {
    Json(Value),
    Close(Option<CloseFrame>),
    /// The TCP connection ended without a close frame.
    Ended,
    Nothing,
}

impl Ws {
    /// Connects to `ws://addr/ws` and authenticates with `token`.
    pub async fn connect(addr: SocketAddr, token: &str) -> Ws {
        let mut ws = Ws::open(addr).await.expect("WebSocket connect");
        ws.send(json!({"type": "auth", "token": token})).await;
        let ready = ws.recv().await;
        assert_eq!(ready["type"], "ready", "{ready}");
        ws
    }

    /// Opens `ws://addr/ws` without authenticating; an error (refused, no upgrade, no answer
    /// within [`WAIT`]) is returned, not a failed test: for clients that retry.
    pub async fn open(addr: SocketAddr) -> Result<Ws, String> {
        match tokio::time::timeout(
            WAIT,
            tokio_tungstenite::connect_async(format!("ws://{addr}/ws")),
        )
        .await
        {
            Ok(Ok((ws, _))) => Ok(Ws { ws }),
            Ok(Err(e)) => Err(format!("connect to {addr}: {e}")),
            Err(_) => Err(format!("connect to {addr}: no answer within {WAIT:?}")),
        }
    }

    /// Like [`open`](Self::open), with the client socket's receive buffer set to `bytes`
    /// (`SO_RCVBUF`, which also stops the kernel from growing it): a client that never reads
    /// then holds back the server's writes after a few KiB instead of several MiB.
    pub async fn open_with_recv_buffer(addr: SocketAddr, bytes: u32) -> Result<Ws, String> {
        let connect = async {
            let socket = tokio::net::TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
            socket
                .set_recv_buffer_size(bytes)
                .map_err(|e| format!("SO_RCVBUF: {e}"))?;
            let stream = socket
                .connect(addr)
                .await
                .map_err(|e| format!("connect to {addr}: {e}"))?;
            let (ws, _) = tokio_tungstenite::client_async(
                format!("ws://{addr}/ws"),
                MaybeTlsStream::Plain(stream),
            )
            .await
            .map_err(|e| format!("upgrade on {addr}: {e}"))?;
            Ok(Ws { ws })
        };
        match tokio::time::timeout(WAIT, connect).await {
            Ok(r) => r,
            Err(_) => Err(format!("connect to {addr}: no answer within {WAIT:?}")),
        }
    }

    /// Opens `ws://addr/ws` from the local address `from`, without authenticating.
    pub async fn open_from(from: std::net::IpAddr, addr: SocketAddr) -> Result<Ws, String> {
        let connect = async {
            let stream = connect_from(from, addr)
                .await
                .map_err(|e| format!("connect to {addr}: {e}"))?;
            let (ws, _) = tokio_tungstenite::client_async(
                format!("ws://{addr}/ws"),
                MaybeTlsStream::Plain(stream),
            )
            .await
            .map_err(|e| format!("upgrade on {addr}: {e}"))?;
            Ok(Ws { ws })
        };
        match tokio::time::timeout(WAIT, connect).await {
            Ok(r) => r,
            Err(_) => Err(format!("connect to {addr}: no answer within {WAIT:?}")),
        }
    }

    /// The TCP stream under the WebSocket, to write frames the client library would not
    /// (oversized, trickled). Reads still go through [`next`](Self::next).
    pub fn raw(&mut self) -> &mut TcpStream {
        match self.ws.get_mut() {
            MaybeTlsStream::Plain(stream) => stream,
            _ => panic!("not a plain TCP stream"),
        }
    }

    /// Drops the connection without a close frame: the TCP connection ends with FIN, or with
    /// `reset` with RST (`SO_LINGER` 0), as when a client's machine or network goes away.
    pub fn abort(self, reset: bool) {
        if reset {
            if let MaybeTlsStream::Plain(stream) = self.ws.get_ref() {
                stream.set_zero_linger().expect("SO_LINGER 0");
            }
        }
        drop(self);
    }

    /// [`open`](Self::open), then `auth` with `token`, expecting `ready`; any failure is
    /// returned (for clients that retry).
    pub async fn try_connect(addr: SocketAddr, token: &str) -> Result<Ws, String> {
        let mut ws = Ws::open(addr).await?;
        ws.try_send(json!({"type": "auth", "token": token})).await?;
        match ws.next(WAIT).await {
            Next::Json(v) if v["type"] == "ready" => Ok(ws),
            other => Err(format!("auth on {addr}: {other:?}")),
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.try_send(v).await.expect("send");
    }

    /// Sends a frame; a broken socket is returned as an error.
    pub async fn try_send(&mut self, v: Value) -> Result<(), String> {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .map_err(|e| format!("send: {e}"))
    }

    /// Closes the connection politely (a close frame), ignoring a socket already gone.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(WAIT, self.ws.close(None)).await;
    }

    /// The next JSON frame or close, skipping pings; `Nothing` after `limit`.
    pub async fn next(&mut self, limit: Duration) -> Next {
        let deadline = Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Next::Nothing,
                Ok(None) | Ok(Some(Err(_))) => return Next::Ended,
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Next::Json(serde_json::from_str(&t).expect("server sent JSON"))
                }
                Ok(Some(Ok(Message::Close(f)))) => return Next::Close(f),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The next JSON frame; fails the test on anything else within [`WAIT`].
    pub async fn recv(&mut self) -> Value {
        match self.next(WAIT).await {
            Next::Json(v) => v,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Subscribes and returns the `subscribed` reply.
    pub async fn subscribe(&mut self, topic: &str, extra: Value) -> Value {
        let mut msg = json!({"type": "subscribe", "id": topic, "topic": topic});
        if let (Some(m), Some(e)) = (msg.as_object_mut(), extra.as_object()) {
            m.extend(e.clone());
        }
        self.send(msg).await;
        let reply = self.recv().await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        assert_eq!(reply["topic"], topic, "{reply}");
        reply
    }

    /// Receives frames until `n` events arrived; any other frame fails the test.
    pub async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let v = match self.next(WAIT).await {
                Next::Json(v) => v,
                other => panic!("after {} of {n} events: {other:?}", got.len()),
            };
            assert_eq!(v["type"], "event", "{v}");
            got.push(v);
        }
        got
    }

    /// Sends a ping and expects its pong as the very next frame: nothing else was queued
    /// before it.
    pub async fn ping(&mut self) {
        let id = Uuid::new_v4().to_string();
        self.send(json!({"type": "ping", "id": id})).await;
        let reply = self.recv().await;
        assert_eq!(reply, json!({"type": "pong", "id": id}));
    }

    /// Expects the server to close with `code` (events still in flight are skipped).
    pub async fn expect_close(&mut self, code: u16) {
        loop {
            match self.next(WAIT).await {
                Next::Close(Some(f)) => {
                    assert_eq!(u16::from(f.code), code, "close reason: {}", f.reason);
                    return;
                }
                Next::Json(v) if v["type"] == "event" => continue,
                other => panic!("expected close {code}, got {other:?}"),
            }
        }
    }
}
