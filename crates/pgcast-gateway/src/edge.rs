//! What the gateway knows about the socket under a WebSocket, from the server's accept loop:
//! the peer's address (for the per-address cap on unauthenticated sockets) and a clock that
//! bounds how long one client frame may take to arrive.
//!
//! ```text
//!  accept ─▶ FrameDeadline<TcpStream> ─▶ hyper (HTTP/1, header timeout) ─▶ GET /ws upgrade
//!               ▲ poll_read: a frame started and not finished     │ Peer (request extension)
//!               │ within `frame_timeout` → TimedOut error           ▼
//!               └──────────── FrameClock ◀──── connection task: frame_received() per message
//! ```
//!
//! The clock is shared by the socket wrapper (which sees bytes) and the connection task (which
//! sees whole messages): bytes that arrive after the last whole message start the clock, the
//! next whole message stops it. The connection task is handed its [`Admission`] (the clock and
//! the unauthenticated slot) and reports through `Admission::frame_received` and
//! `Admission::authenticated`.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

/// The peer of an HTTP connection, put into each request's extensions by the server's accept
/// loop. Without it (a router served by plain `axum::serve`) the gateway applies only its
/// process-wide limits.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The peer's address.
    pub addr: SocketAddr,
    /// The clock of the socket's [`FrameDeadline`].
    pub frames: FrameClock,
}

/// Counts the whole client messages a connection received, so that the socket under it can
/// tell "between frames" from "a frame started and not finished". Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct FrameClock {
    /// Whole messages received (wrapping). 0 until the connection task reports its first:
    /// until then the deadline is not enforced (the auth deadline covers the first frame, and
    /// a connection task that never reports must not be cut off).
    messages: Arc<AtomicU32>,
}

impl FrameClock {
    /// A whole message arrived: the frame in progress, if any, is finished.
    pub fn message_received(&self) {
        let n = self.messages.load(Ordering::Relaxed).wrapping_add(1);
        // Skip 0, which means "not started".
        self.messages
            .store(if n == 0 { 1 } else { n }, Ordering::Relaxed);
    }

    fn messages(&self) -> u32 {
        self.messages.load(Ordering::Relaxed)
    }
}

/// A socket whose reads fail with [`io::ErrorKind::TimedOut`] when a client frame started (bytes
/// arrived after the last whole message) and did not finish within `timeout`: a peer that
/// trickles a frame byte by byte holds neither a slot nor a growing buffer for long. Costs a
/// counter load per read and, only while a frame is in progress and the socket has nothing to
/// read, one timer.
#[derive(Debug)]
pub struct FrameDeadline<IO> {
    io: IO,
    clock: FrameClock,
    timeout: Duration,
    /// Messages counted when this wrapper last looked; a change means a frame finished.
    seen: u32,
    /// When the first byte of the frame in progress arrived.
    started: Option<Instant>,
    /// Wakes the reader at the deadline when the peer sends nothing more; created the first
    /// time it is needed and reset afterwards.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<IO> FrameDeadline<IO> {
    /// Wraps `io`; the deadline applies once `clock` counted a first message.
    pub fn new(io: IO, clock: FrameClock, timeout: Duration) -> Self {
        FrameDeadline {
            io,
            clock,
            timeout,
            seen: 0,
            started: None,
            timer: None,
        }
    }

    /// The socket inside.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    fn expired() -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "a client frame did not arrive in full within the frame timeout",
        )
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FrameDeadline<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let messages = this.clock.messages();
        if messages != this.seen {
            this.seen = messages;
            this.started = None;
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if messages != 0 && buf.filled().len() > before {
                    let now = Instant::now();
                    match this.started {
                        None => this.started = Some(now),
                        Some(at) if now >= at + this.timeout => {
                            return Poll::Ready(Err(Self::expired()))
                        }
                        Some(_) => {}
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if let Some(at) = this.started {
                    let deadline = at + this.timeout;
                    let timer = this
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if timer.deadline() != deadline {
                        timer.as_mut().reset(deadline);
                    }
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(Self::expired()));
                    }
                }
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FrameDeadline<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Unauthenticated sockets per peer address (IPv6 by /64, see [`ip_key`]), next to the
/// process-wide semaphore: one address cannot take every unauthenticated slot.
#[derive(Debug, Default)]
pub(crate) struct UnauthenticatedByIp {
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// A slot of an unauthenticated socket: the process-wide permit and the per-address count.
/// Released when the connection authenticates, when its auth deadline passes, or when it
/// ends, whichever is first.
#[derive(Debug)]
pub(crate) struct UnauthenticatedSlot {
    released: AtomicBool,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
    by_ip: Option<(Arc<UnauthenticatedByIp>, IpAddr)>,
}

impl UnauthenticatedByIp {
    /// Takes one of `limit` slots of `ip`'s address; `None` when they are all taken.
    pub(crate) fn acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        limit: usize,
        permit: OwnedSemaphorePermit,
    ) -> Option<UnauthenticatedSlot> {
        let key = ip_key(ip);
        {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            let n = counts.entry(key).or_insert(0);
            if *n >= limit {
                if *n == 0 {
                    counts.remove(&key);
                }
                return None;
            }
            *n += 1;
        }
        Some(UnauthenticatedSlot {
            released: AtomicBool::new(false),
            permit: Mutex::new(Some(permit)),
            by_ip: Some((self.clone(), key)),
        })
    }

    #[cfg(test)]
    fn count(&self, ip: IpAddr) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(&ip_key(ip)).copied().unwrap_or(0)
    }
}

impl UnauthenticatedSlot {
    /// A slot counted only process-wide (the peer's address is unknown).
    pub(crate) fn global(permit: OwnedSemaphorePermit) -> Self {
        UnauthenticatedSlot {
            released: AtomicBool::new(false),
            permit: Mutex::new(Some(permit)),
            by_ip: None,
        }
    }

    /// Gives the slot back; later calls do nothing.
    pub(crate) fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        drop(self.permit.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some((by_ip, key)) = &self.by_ip {
            let mut counts = by_ip.counts.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = counts.get_mut(key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(key);
                }
            }
        }
    }
}

impl Drop for UnauthenticatedSlot {
    fn drop(&mut self) {
        self.release();
    }
}

/// The key of an address for per-address limits: IPv4 as is (an IPv4-mapped IPv6 address as
/// its IPv4 address), IPv6 by its /64 prefix, which is what one subscriber usually holds.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// What a connection task holds from its admission: the socket's frame clock (when the edge
/// layer wrapped the socket) and its unauthenticated slot. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    pub(crate) unauthenticated: Arc<UnauthenticatedSlot>,
    pub(crate) frames: Option<FrameClock>,
}

impl Admission {
    /// Called by the connection task for every whole message it reads (text, binary, ping,
    /// pong, close): the socket's frame deadline restarts with the next byte.
    pub(crate) fn frame_received(&self) {
        if let Some(clock) = &self.frames {
            clock.message_received();
        }
    }

    /// Called by the connection task once its token is verified: the socket no longer holds
    /// an unauthenticated slot.
    pub(crate) fn authenticated(&self) {
        self.unauthenticated.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Semaphore;

    #[tokio::test(start_paused = true)]
    async fn a_frame_that_does_not_finish_in_time_fails_the_read() {
        let (client, server) = tokio::io::duplex(1024);
        let clock = FrameClock::default();
        let mut socket = FrameDeadline::new(server, clock.clone(), Duration::from_secs(5));
        let mut client = client;
        let mut buf = [0u8; 64];
        // Before the first message the deadline does not apply.
        client.write_all(b"a").await.unwrap();
        assert_eq!(socket.read(&mut buf).await.unwrap(), 1);
        tokio::time::advance(Duration::from_secs(60)).await;
        client.write_all(b"b").await.unwrap();
        assert_eq!(socket.read(&mut buf).await.unwrap(), 1);
        clock.message_received();
        // Between frames nothing runs: an idle peer is not cut off.
        tokio::time::advance(Duration::from_secs(60)).await;
        // A frame starts; bytes keep coming, but it does not finish within 5 s.
        client.write_all(b"c").await.unwrap();
        assert_eq!(socket.read(&mut buf).await.unwrap(), 1);
        tokio::time::advance(Duration::from_secs(3)).await;
        client.write_all(b"d").await.unwrap();
        assert_eq!(socket.read(&mut buf).await.unwrap(), 1);
        // The message completes: the clock stops.
        clock.message_received();
        tokio::time::advance(Duration::from_secs(30)).await;
        client.write_all(b"e").await.unwrap();
        assert_eq!(socket.read(&mut buf).await.unwrap(), 1);
        // Now the peer goes silent mid-frame: the read fails at the deadline.
        let started = Instant::now();
        let err = socket.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_frame_fails_at_the_first_byte_past_the_deadline() {
        let (mut client, server) = tokio::io::duplex(1024);
        let clock = FrameClock::default();
        clock.message_received();
        let mut socket = FrameDeadline::new(server, clock, Duration::from_secs(5));
        let mut buf = [0u8; 64];
        for _ in 0..5 {
            client.write_all(b"x").await.unwrap();
            assert_eq!(socket.read(&mut buf).await.unwrap(), 1);
            tokio::time::advance(Duration::from_millis(1100)).await;
        }
        client.write_all(b"x").await.unwrap();
        let err = socket.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn unauthenticated_slots_are_counted_per_address() {
        let global = Arc::new(Semaphore::new(3));
        let by_ip = Arc::new(UnauthenticatedByIp::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        let take = |ip| {
            let permit = global.clone().try_acquire_owned().ok()?;
            by_ip.acquire(ip, 2, permit)
        };
        let a1 = take(a).unwrap();
        let a2 = take(a).unwrap();
        assert!(take(a).is_none(), "a third slot for one address");
        assert_eq!(
            global.available_permits(),
            1,
            "a refusal returns its permit"
        );
        let b1 = take(b).unwrap();
        assert!(take(b).is_none(), "the process-wide cap");
        a1.release();
        a1.release();
        drop(a1);
        assert_eq!(by_ip.count(a), 1);
        let _b2 = take(b).unwrap();
        drop((a2, b1));
        assert_eq!(by_ip.count(a), 0);
        assert!(by_ip.counts.lock().unwrap().len() == 1);
    }

    #[test]
    fn ipv6_addresses_share_their_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ip_key(a), ip_key(b));
        assert_ne!(ip_key(a), ip_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(ip_key(mapped), "192.0.2.1".parse::<IpAddr>().unwrap());
    }
}
