//! The tests' one WebSocket client of pgcast's wire protocol (README "Protocol"): connect
//! (plain, from a chosen local address, with a small receive buffer, or over any stream such as
//! TLS), auth, subscribe, read frames with a deadline, ping, expect errors and closes, and read
//! up to a marker event to prove that nothing else came first.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use crate::http::connect_from;

/// Bound for one awaited frame or condition; never reached when things work.
pub const WAIT: Duration = Duration::from_secs(15);

/// A WebSocket client of the wire protocol over `S` (plain TCP unless said otherwise).
pub struct Ws<S = MaybeTlsStream<TcpStream>> {
    /// The socket itself, to send what the protocol helpers would not (binary, oversized or
    /// fed-then-flushed frames) and to reach the transport under it.
    pub ws: WebSocketStream<S>,
}

/// What came next from the server.
#[derive(Debug)]
pub enum Next {
    /// A text frame, parsed (the server sends only JSON).
    Json(Value),
    /// A close frame, with its code and reason if it had one.
    Close(Option<CloseFrame>),
    /// The TCP connection ended without a close frame.
    Ended,
    /// Nothing within the limit.
    Nothing,
}

impl Next {
    /// The close code, for a close frame that carries one.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            Next::Close(Some(f)) => Some(u16::from(f.code)),
            _ => None,
        }
    }
}

fn url(addr: SocketAddr) -> String {
    format!("ws://{addr}/ws")
}

/// Upgrades `stream` (already connected to `addr`) within [`WAIT`].
async fn upgrade<S>(url: String, stream: S) -> Result<Ws<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url.clone(), stream)).await {
        Ok(Ok((ws, _))) => Ok(Ws { ws }),
        Ok(Err(e)) => Err(format!("upgrade on {url}: {e}")),
        Err(_) => Err(format!("upgrade on {url}: no answer within {WAIT:?}")),
    }
}

impl Ws {
    /// Connects to `ws://addr/ws` and authenticates with `token`, expecting `ready`.
    pub async fn connect(addr: SocketAddr, token: &str) -> Ws {
        let mut ws = Ws::open(addr).await.expect("WebSocket connect");
        ws.auth(token).await;
        ws
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

    /// Opens `ws://addr/ws` without authenticating; an error (refused, no upgrade, no answer
    /// within [`WAIT`]) is returned, not a failed test: for clients that retry.
    pub async fn open(addr: SocketAddr) -> Result<Ws, String> {
        match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url(addr))).await {
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
            socket
                .connect(addr)
                .await
                .map_err(|e| format!("connect to {addr}: {e}"))
        };
        let stream = tokio::time::timeout(WAIT, connect)
            .await
            .map_err(|_| format!("connect to {addr}: no answer within {WAIT:?}"))??;
        upgrade(url(addr), MaybeTlsStream::Plain(stream)).await
    }

    /// Opens `ws://addr/ws` from the local address `from` (any of 127/8), without
    /// authenticating.
    pub async fn open_from(from: IpAddr, addr: SocketAddr) -> Result<Ws, String> {
        let stream = tokio::time::timeout(WAIT, connect_from(from, addr))
            .await
            .map_err(|_| format!("connect to {addr}: no answer within {WAIT:?}"))?
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        upgrade(url(addr), MaybeTlsStream::Plain(stream)).await
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
}

impl<S> Ws<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Upgrades a connected `stream` (TLS, say) to `url` (`wss://host:port/ws`); errors are
    /// returned.
    pub async fn upgrade(url: impl Into<String>, stream: S) -> Result<Ws<S>, String> {
        upgrade(url.into(), stream).await
    }

    /// Sends `auth` with `token` and expects `ready`; returns the `ready` frame.
    pub async fn auth(&mut self, token: &str) -> Value {
        self.send(json!({"type": "auth", "token": token})).await;
        let ready = self.recv().await;
        assert_eq!(ready["type"], "ready", "{ready}");
        ready
    }

    /// Sends a JSON frame; fails the test if the socket is broken.
    pub async fn send(&mut self, v: Value) {
        self.try_send(v).await.expect("send");
    }

    /// Sends a text frame as is (for malformed JSON).
    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("send");
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

    /// The next JSON frame or close, skipping pings and pongs; `Nothing` after `limit`.
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

    /// Subscribes (`id` = the topic, `extra` merged into the frame) and returns the
    /// `subscribed` reply.
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

    /// Sends a subscribe that must fail with `code`; returns the error frame.
    pub async fn subscribe_err(&mut self, topic: &str, code: &str) -> Value {
        self.send(json!({"type": "subscribe", "id": "bad", "topic": topic}))
            .await;
        let reply = self.expect_error(code).await;
        assert_eq!(reply["id"], "bad", "{reply}");
        reply
    }

    /// Unsubscribes from `topic`, confirmed by a ping round trip (frames are handled in
    /// order), so nothing more of it is queued for this connection.
    pub async fn stop_following(&mut self, topic: &str) {
        self.send(json!({"type": "unsubscribe", "topic": topic}))
            .await;
        self.ping().await;
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

    /// Reads event frames until the one at `position` (or later): the gateway has dispatched
    /// every event up to it to this connection.
    pub async fn until_position(&mut self, position: i64) {
        loop {
            let ev = self.events(1).await.remove(0);
            if ev["position"].as_i64().is_some_and(|p| p >= position) {
                return;
            }
        }
    }

    /// Every frame before the event of the assignment `marker` (which must arrive within
    /// [`WAIT`]), and that event. Events reach one connection in position order, so once the
    /// marker (written after everything else) has arrived, so has every frame that was ever
    /// coming before it: what this returns is complete, where a quiet window would miss a
    /// late frame.
    pub async fn until_marker(&mut self, marker: Uuid) -> (Vec<Value>, Value) {
        let mut before = Vec::new();
        loop {
            let v = match self.next(WAIT).await {
                Next::Json(v) => v,
                other => panic!(
                    "marker {marker} not received; after {} frames: {other:?}; frames: {before:?}",
                    before.len()
                ),
            };
            if v["type"] == "event" && v["assignment"]["id"] == marker.to_string() {
                return (before, v);
            }
            before.push(v);
        }
    }

    /// Asserts that the very next frame is the event of `marker`: nothing else was on its way
    /// to this connection before it (see [`until_marker`](Self::until_marker)).
    pub async fn nothing_before(&mut self, marker: Uuid) {
        let (before, _) = self.until_marker(marker).await;
        assert!(
            before.is_empty(),
            "expected nothing before the marker {marker}, got {before:#?}"
        );
    }

    /// Sends a ping and expects its pong as the very next frame: nothing else was queued
    /// before it, and the connection is usable.
    pub async fn ping(&mut self) {
        let id = Uuid::new_v4().to_string();
        self.send(json!({"type": "ping", "id": id})).await;
        let reply = self.recv().await;
        assert_eq!(reply, json!({"type": "pong", "id": id}));
    }

    /// Expects the next frame to be an `error` with `code`; returns it.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let reply = self.recv().await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], code, "{reply}");
        reply
    }

    /// Expects the server to close with `code`; event frames still in flight are skipped,
    /// any other frame fails the test.
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
