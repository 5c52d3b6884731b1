//! The HTTP edge of `pgcast serve`: its own accept loop, so that every connection is checked
//! before any HTTP work and every request head has a deadline.
//!
//! ```text
//!  accept ─▶ per-address cap and rate (refused: closed at once, nothing read or written)
//!         ─▶ TCP_NODELAY, FrameDeadline (the gateway's per-frame clock)
//!         ─▶ with --tls-cert: TLS handshake within the header timeout (tls.rs)
//!         ─▶ hyper HTTP/1 with a header-read timeout (slowloris) and upgrades ─▶ router
//! ```
//!
//! `axum::serve` has no header timeout: a peer that sends half a `GET /ws` holds its socket
//! forever. hyper's HTTP/1 connection has one (it also bounds idle keep-alive connections),
//! so connections are served with it directly. HTTP/2 is not offered, not even over TLS:
//! WebSockets upgrade over HTTP/1.1, and the pages and scripts are few and small.
//!
//! With TLS, the handshake runs in the connection's task, never in the accept loop, after the
//! address was admitted (a handshake counts against the per-address caps like any connection)
//! and under the header timeout: a peer that opens TCP and stalls the handshake is closed like
//! one that stalls its request head. The frame deadline wraps the TCP stream under TLS, where it
//! sees every byte the peer sends (see tls.rs).
//!
//! The per-address state is one small entry per address (IPv6 by /64) holding both the open
//! connection count and a token bucket, in one map under one lock taken once per accept and
//! once per close. A rate-limiting crate (`governor`) would keep its own keyed map next to the
//! count map that is needed anyway, and bring a clock and a concurrent map with it.
//!
//! About 500 lines of one accept loop and its limits, then its unit tests.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use futures::FutureExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use pgcast_gateway::{ip_key, FrameClock, FrameDeadline, Peer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Limits applied at accept and to each HTTP connection, with their defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EdgeLimits {
    /// Time a connection has to send a complete request head (also the longest an idle
    /// keep-alive connection stays open). Default 10 s.
    pub header_timeout: Duration,
    /// Open TCP connections per peer address (IPv6 by /64), WebSockets included; 0 = no limit.
    /// Default 1,000 (browsers behind one NAT share an address).
    pub max_connections_per_ip: u32,
    /// New connections per second per peer address, on average; 0 = no limit. Default 20.
    pub connection_rate_per_ip: u32,
    /// New connections a peer address may open at once before the rate applies. Default 100.
    pub connection_burst_per_ip: u32,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        EdgeLimits {
            header_timeout: Duration::from_secs(10),
            max_connections_per_ip: 1_000,
            connection_rate_per_ip: 20,
            connection_burst_per_ip: 100,
        }
    }
}

/// Why a connection was refused at accept (a metric label).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelValue,
)]
#[allow(non_camel_case_types)] // label values are lower case
enum Reason {
    /// The address has `max_connections_per_ip` open.
    connections,
    /// The address opened connections faster than its rate.
    rate,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct RefusedLabels {
    reason: Reason,
}

/// One address's open connections and token bucket.
#[derive(Debug)]
struct PerAddress {
    open: u32,
    tokens: f64,
    updated: Instant,
}

/// The per-address table.
#[derive(Debug)]
pub(crate) struct Admission {
    limits: EdgeLimits,
    table: Mutex<Table>,
    refused: Family<RefusedLabels, Counter>,
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<IpAddr, PerAddress>,
    /// Size at which idle entries are swept next (twice the size left by the last sweep), so
    /// sweeping costs O(1) per accept on average and the table stays bounded by the addresses
    /// seen within one bucket refill.
    sweep_at: usize,
}

/// Entries below this are never swept.
const MIN_SWEEP: usize = 1024;

/// An admitted connection's place in its address's count; given back on drop.
#[derive(Debug)]
pub(crate) struct AddressSlot {
    admission: Arc<Admission>,
    key: IpAddr,
}

impl Admission {
    pub(crate) fn new(limits: EdgeLimits) -> Arc<Self> {
        Arc::new(Admission {
            limits,
            table: Mutex::new(Table {
                entries: HashMap::new(),
                sweep_at: MIN_SWEEP,
            }),
            refused: Family::default(),
        })
    }

    /// Registers the refusal counters.
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "pgcast_edge_refused",
            "TCP connections closed at accept: reason=connections (the address had its \
             --max-connections-per-ip open) or rate (it opened them faster than \
             --connection-rate-per-ip)",
            self.refused.clone(),
        );
    }

    fn refill(&self, entry: &mut PerAddress, now: Instant) {
        let rate = f64::from(self.limits.connection_rate_per_ip);
        let burst = f64::from(self.limits.connection_burst_per_ip.max(1));
        let elapsed = now.saturating_duration_since(entry.updated).as_secs_f64();
        entry.tokens = (entry.tokens + elapsed * rate).min(burst);
        entry.updated = now;
    }

    /// Admits a connection from `ip`, or says why not. Every attempt costs a token, refused
    /// ones too: a peer retrying in a loop stays refused.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<AddressSlot, ()> {
        let limits = self.limits;
        let key = ip_key(ip);
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.entries.len() >= table.sweep_at {
            self.sweep(&mut table, now);
        }
        let entry = table.entries.entry(key).or_insert(PerAddress {
            open: 0,
            tokens: f64::from(limits.connection_burst_per_ip.max(1)),
            updated: now,
        });
        if limits.connection_rate_per_ip > 0 {
            self.refill(entry, now);
            if entry.tokens < 1.0 {
                drop(table);
                self.refused
                    .get_or_create(&RefusedLabels {
                        reason: Reason::rate,
                    })
                    .inc();
                return Err(());
            }
            entry.tokens -= 1.0;
        }
        if limits.max_connections_per_ip > 0 && entry.open >= limits.max_connections_per_ip {
            drop(table);
            self.refused
                .get_or_create(&RefusedLabels {
                    reason: Reason::connections,
                })
                .inc();
            return Err(());
        }
        entry.open += 1;
        Ok(AddressSlot {
            admission: self.clone(),
            key,
        })
    }

    /// Drops the entries of addresses with nothing open and a full bucket: they are as if new.
    fn sweep(&self, table: &mut Table, now: Instant) {
        let mut entries = std::mem::take(&mut table.entries);
        entries.retain(|_, entry| {
            if entry.open > 0 {
                return true;
            }
            if self.limits.connection_rate_per_ip == 0 {
                return false;
            }
            self.refill(entry, now);
            entry.tokens < f64::from(self.limits.connection_burst_per_ip.max(1))
        });
        table.sweep_at = (entries.len() * 2).max(MIN_SWEEP);
        table.entries = entries;
    }

    #[cfg(test)]
    fn open(&self, ip: IpAddr) -> u32 {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .get(&ip_key(ip))
            .map_or(0, |entry| entry.open)
    }

    #[cfg(test)]
    fn entries(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .len()
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut table = self
            .admission
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = table.entries.get_mut(&self.key) {
            entry.open = entry.open.saturating_sub(1);
            // Without a rate there is nothing to remember about an address with nothing open.
            if entry.open == 0 && self.admission.limits.connection_rate_per_ip == 0 {
                table.entries.remove(&self.key);
            }
        }
    }
}

/// The accepted socket with its address slot: the slot lives as long as the socket can still
/// write, through a WebSocket upgrade (hyper hands this very object to the WebSocket). It is
/// given back when the server shuts the socket down or drops it, just before the peer can see
/// the close, so a peer that has read the end of its connection may open another at once.
#[derive(Debug)]
pub(crate) struct EdgeStream {
    /// Declared first: dropped before the socket is closed.
    slot: Option<AddressSlot>,
    tcp: TcpStream,
}

impl AsyncRead for EdgeStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for EdgeStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Nothing is written after this (with TLS, its close_notify already was).
        this.slot = None;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// How long a connection may take to finish its request after shutdown began (then it is
/// dropped); the whole shutdown stays within its 10 s.
const DRAIN: Duration = Duration::from_secs(1);

/// Connections accepted in one turn of the accept loop, at most: whatever is waiting in the
/// kernel's accept queue. Accepting is cheap next to what each connection then does, but
/// tokio's cooperative budget would end the loop's turn after 128, and on a busy runtime its
/// next turn waits behind every runnable connection task. After a restart, with thousands of
/// clients reconnecting while the live ones are served, the queue then filled up to the
/// kernel's cap and further connection attempts were dropped (their clients wait for a SYN
/// retransmission, 1 s and more).
const ACCEPT_BURST: usize = 1024;

/// What the accept loop needs to start serving an accepted connection.
struct Edge {
    http: hyper::server::conn::http1::Builder,
    router: Router,
    admission: Arc<Admission>,
    frame_timeout: Duration,
    tls: Option<TlsAcceptor>,
    /// False until the server opens (see [`serve_http`]).
    open: watch::Receiver<bool>,
    stop: CancellationToken,
}

impl Edge {
    /// Admits `stream` (or closes it at once: no byte read, none written) and spawns its task.
    fn start(&self, connections: &mut JoinSet<()>, stream: TcpStream, addr: SocketAddr) {
        let Ok(slot) = self.admission.admit(addr.ip()) else {
            drop(stream);
            return;
        };
        // Event frames are small and latency matters more than packet count: without
        // TCP_NODELAY a frame can wait ~40 ms for the peer's delayed ACK.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        let clock = FrameClock::default();
        let io = FrameDeadline::new(
            EdgeStream {
                slot: Some(slot),
                tcp: stream,
            },
            clock.clone(),
            self.frame_timeout,
        );
        let service = service(self.router.clone(), addr, clock);
        let http = self.http.clone();
        let stop = self.stop.clone();
        let tls = self.tls.clone();
        let header_timeout = self.admission.limits.header_timeout;
        let mut open = self.open.clone();
        connections.spawn(async move {
            tokio::select! {
                opened = open.wait_for(|open| *open) => {
                    if opened.is_err() {
                        return;
                    }
                }
                () = stop.cancelled() => return,
            }
            let Some(acceptor) = tls else {
                return serve_connection(http, io, service, addr, stop).await;
            };
            let handshake = tokio::time::timeout(header_timeout, handshake(&acceptor, io, addr));
            let io = tokio::select! {
                done = handshake => match done {
                    Ok(Some(io)) => io,
                    Ok(None) => return,
                    Err(_) => {
                        tracing::debug!(%addr, "TLS handshake not finished within the header timeout; closed");
                        return;
                    }
                },
                () = stop.cancelled() => return,
            };
            serve_connection(http, io, service, addr, stop).await;
        });
    }
}

/// Serves `router` on `tcp` until `stop` is cancelled: accept, check the address, (with `tls`)
/// complete the TLS handshake within the header timeout, serve the connection with a header
/// timeout; at `stop`, stop accepting, let requests in flight finish
/// (for at most a second) and return. Connection tasks are owned by a `JoinSet`: dropping it
/// aborts the stragglers. Upgraded WebSockets are the gateway's, which closes them itself.
///
/// Until `open` turns true, connections are accepted and admitted but not served: they wait in
/// the process (their header timeout not started) rather than in the kernel's accept queue,
/// which holds at most `net.core.somaxconn` and drops the SYNs beyond (each such client then
/// waits a second or more to try again).
pub(crate) async fn serve_http(
    tcp: TcpListener,
    router: Router,
    admission: Arc<Admission>,
    frame_timeout: Duration,
    tls: Option<TlsAcceptor>,
    open: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(admission.limits.header_timeout);
    let edge = Edge {
        http,
        router,
        admission,
        frame_timeout,
        tls,
        open,
        stop,
    };
    let mut connections = JoinSet::new();
    loop {
        // Reap finished connections so the set holds only live ones.
        while connections.try_join_next().is_some() {}
        let mut next = tokio::select! {
            biased;
            () = edge.stop.cancelled() => break,
            accepted = tcp.accept() => match accepted {
                Ok(accepted) => Some(accepted),
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning; the
                    // header timeout frees descriptors meanwhile.
                    tracing::warn!(%error, "accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                        () = edge.stop.cancelled() => break,
                    }
                }
            },
        };
        // Then whatever else is waiting, up to ACCEPT_BURST; after that many the loop lets
        // the other tasks run before it accepts more.
        let mut burst = 0;
        while let Some((stream, addr)) = next.take() {
            edge.start(&mut connections, stream, addr);
            burst += 1;
            if burst == ACCEPT_BURST {
                tokio::task::yield_now().await;
                break;
            }
            next = match tokio::task::unconstrained(tcp.accept()).now_or_never() {
                Some(Ok(accepted)) => Some(accepted),
                // A connection that failed before it was taken (the queue's own errors, such
                // as running out of descriptors, come back at the next `accept` above, which
                // backs off).
                Some(Err(error)) => {
                    tracing::debug!(%error, "accept failed");
                    None
                }
                None => None,
            };
        }
    }
    drop(tcp);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN, drained).await.is_err() {
        tracing::debug!(
            left = connections.len(),
            "HTTP connections still open after shutdown; dropped"
        );
    }
}

/// Serves HTTP/1 on `io` until the peer or hyper ends the connection, or until `stop` (then
/// the request in flight gets [`DRAIN`] to finish).
async fn serve_connection<IO, S>(
    http: hyper::server::conn::http1::Builder,
    io: IO,
    service: S,
    addr: SocketAddr,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, %addr, "HTTP connection ended");
            }
        }
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN, conn).await;
        }
    }
}

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What plain HTTP sent to the TLS port gets (as nginx does), instead of a handshake failure
/// that a person reading a health check's log cannot tell from a network fault.
const PLAIN_HTTP_REFUSED: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
    Content-Type: text/plain; charset=utf-8\r\n\
    Content-Length: 47\r\n\
    Connection: close\r\n\
    \r\n\
    This port speaks TLS: use https:// or wss://.\r\n";

/// The TLS handshake on an admitted connection: `None` when it failed or the peer spoke plain
/// HTTP (answered with 400). The caller bounds it with the header timeout.
async fn handshake(
    acceptor: &TlsAcceptor,
    io: FrameDeadline<EdgeStream>,
    addr: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<FrameDeadline<EdgeStream>>> {
    let mut first = [0u8; 1];
    match io.get_ref().tcp.peek(&mut first).await {
        Ok(1..) if first[0] == TLS_HANDSHAKE_RECORD => {}
        Ok(1..) => {
            refuse_plain(io).await;
            return None;
        }
        Ok(0) | Err(_) => return None,
    }
    match acceptor.accept(io).await {
        Ok(tls) => Some(tls),
        Err(error) => {
            tracing::debug!(%error, %addr, "TLS handshake failed");
            None
        }
    }
}

/// Answers plain HTTP with [`PLAIN_HTTP_REFUSED`] and closes. Reads the request first and what
/// follows until the peer closes, so that the close does not reset the connection (which can
/// discard the answer at the peer) with unread bytes.
async fn refuse_plain(mut io: FrameDeadline<EdgeStream>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 4096];
    let _ = io.read(&mut buf).await;
    if io.write_all(PLAIN_HTTP_REFUSED).await.is_err() || io.shutdown().await.is_err() {
        return;
    }
    while matches!(io.read(&mut buf).await, Ok(1..)) {}
}

/// The router for one connection: each request carries the connection's [`Peer`].
fn service(
    router: Router,
    addr: SocketAddr,
    frames: FrameClock,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<
        Output = Result<axum::response::Response, std::convert::Infallible>,
    > + Send,
> + Clone {
    let peer = Peer { addr, frames };
    hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(peer.clone());
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(addr));
        let mut router = router.clone();
        async move { tower_service::Service::call(&mut router, request).await }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(cap: u32, rate: u32, burst: u32) -> EdgeLimits {
        EdgeLimits {
            header_timeout: Duration::from_secs(1),
            max_connections_per_ip: cap,
            connection_rate_per_ip: rate,
            connection_burst_per_ip: burst,
        }
    }

    #[test]
    fn the_plain_http_refusal_is_well_formed() {
        let text = std::str::from_utf8(PLAIN_HTTP_REFUSED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{text}"
        );
    }

    /// Everything waiting in the kernel's accept queue is taken in one turn of the accept loop,
    /// not tokio's budget of 128 per turn, each turn waiting behind every runnable task.
    #[tokio::test(flavor = "current_thread")]
    async fn one_turn_of_the_accept_loop_takes_every_waiting_connection() {
        // More than tokio's budget of 128 accepts per turn, within the kernel's smallest
        // default accept queue on current Linux (4,096) and a 1,024 descriptor limit.
        const WAITING: u32 = 200;
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(u32::MAX);
        assert!(
            somaxconn >= WAITING,
            "net.core.somaxconn is {somaxconn}: the kernel cannot hold {WAITING} connections for accept"
        );
        // With pgcast's deep backlog (tokio's own holds 128).
        let tcp = crate::server::bind((std::net::Ipv4Addr::LOCALHOST, 0).into())
            .await
            .unwrap();
        let addr = tcp.local_addr().unwrap();
        // Connected before the loop runs: the kernel holds them in the accept queue.
        let clients: Vec<_> = (0..WAITING)
            .map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap())
            .collect();
        let admission = Admission::new(EdgeLimits {
            header_timeout: Duration::from_secs(60),
            ..limits(0, 0, 1)
        });
        let stop = CancellationToken::new();
        // On a current-thread runtime every task runs once per round of the scheduler: this
        // one notes the rounds in which the loop admitted the first and the last connection.
        let counting = {
            let admission = admission.clone();
            tokio::spawn(async move {
                let mut first = None;
                for round in 0u32.. {
                    let open = admission.open(addr.ip());
                    if open > 0 && first.is_none() {
                        first = Some(round);
                    }
                    if open == WAITING {
                        return (first, round);
                    }
                    tokio::task::yield_now().await;
                }
                unreachable!()
            })
        };
        let (_open, opened) = watch::channel(true);
        let serving = tokio::spawn(serve_http(
            tcp,
            Router::new(),
            admission,
            Duration::from_secs(60),
            None,
            opened,
            stop.clone(),
        ));
        let (first, last) = tokio::time::timeout(Duration::from_secs(30), counting)
            .await
            .expect("every waiting connection admitted within 30 s")
            .unwrap();
        assert_eq!(
            first,
            Some(last),
            "admitted over several rounds of the scheduler"
        );
        stop.cancel();
        serving.await.unwrap();
        drop(clients);
    }

    /// While the server is not open yet (its listener catching up at start), connections are
    /// accepted, so they do not pile up in the kernel's queue, but not served; once it opens,
    /// each gets its answer.
    #[tokio::test(flavor = "current_thread")]
    async fn connections_accepted_before_opening_wait_and_are_served_once_open() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const CLIENTS: u32 = 20;
        let tcp = crate::server::bind((std::net::Ipv4Addr::LOCALHOST, 0).into())
            .await
            .unwrap();
        let addr = tcp.local_addr().unwrap();
        let admission = Admission::new(limits(0, 0, 1));
        let (open, opened) = watch::channel(false);
        let stop = CancellationToken::new();
        let router = Router::new().route("/", axum::routing::get(|| async { "hello" }));
        let serving = tokio::spawn(serve_http(
            tcp,
            router,
            admission.clone(),
            Duration::from_secs(60),
            None,
            opened,
            stop.clone(),
        ));
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            let mut client = TcpStream::connect(addr).await.unwrap();
            client
                .write_all(b"GET / HTTP/1.1\r\nHost: pgcast\r\n\r\n")
                .await
                .unwrap();
            clients.push(client);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while admission.open(addr.ip()) < CLIENTS {
            assert!(Instant::now() < deadline, "not all accepted within 30 s");
            tokio::task::yield_now().await;
        }
        // Every task had many turns to answer (on this one thread, one round each per yield).
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        let mut buf = [0u8; 256];
        for client in &clients {
            assert!(
                matches!(client.try_read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
                "answered before the server opened"
            );
        }
        open.send_replace(true);
        for client in &mut clients {
            let mut answer = Vec::new();
            while !answer.ends_with(b"hello") {
                let n = tokio::time::timeout(Duration::from_secs(30), client.read(&mut buf))
                    .await
                    .expect("answered within 30 s of opening")
                    .unwrap();
                assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
                answer.extend_from_slice(&buf[..n]);
            }
            assert!(
                answer.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&answer)
            );
        }
        stop.cancel();
        serving.await.unwrap();
    }

    #[test]
    fn the_cap_counts_open_connections_per_address() {
        let admission = Admission::new(limits(2, 0, 1));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = admission.admit(a).unwrap();
        let _a2 = admission.admit(a).unwrap();
        assert!(admission.admit(a).is_err());
        let _b1 = admission.admit(b).unwrap();
        drop(a1);
        let _a3 = admission.admit(a).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_refills_and_idle_addresses_are_forgotten() {
        let admission = Admission::new(limits(0, 10, 5));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let slots: Vec<_> = (0..5).map(|_| admission.admit(a).unwrap()).collect();
        assert!(admission.admit(a).is_err(), "past the burst");
        assert!(admission.admit("10.0.0.2".parse().unwrap()).is_ok());
        tokio::time::advance(Duration::from_millis(110)).await;
        assert!(admission.admit(a).is_ok(), "one token back after 0.1 s");
        assert!(admission.admit(a).is_err());
        drop(slots);
        // Many addresses come and go, 100 every 0.2 s (a bucket refills in 0.1 s): the table
        // is swept back down to the addresses of the last refill period or so.
        for i in 0..5000u32 {
            if i % 100 == 0 {
                tokio::time::advance(Duration::from_millis(200)).await;
            }
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            drop(admission.admit(ip).unwrap());
        }
        assert!(
            admission.entries() <= 2 * MIN_SWEEP + 2,
            "{}",
            admission.entries()
        );
    }
}
