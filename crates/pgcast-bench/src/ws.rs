//! A lean WebSocket client (RFC 6455, `ws://` only, no extensions) for the load generator.
//!
//! Thousands of connections share one or two threads, so the receive path does the least
//! work possible: one `read` fills a buffer, frames are cut out of it in place (server frames
//! are not masked), and each message is handed to a callback as a byte slice: no copy, no
//! UTF-8 validation, no allocation. Pings are answered; fragmented messages are reassembled.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Largest message accepted from a server.
const MAX_MESSAGE: usize = 64 << 20;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Where to connect: a `ws://` URL on the loopback interface.
#[derive(Debug, Clone)]
pub(crate) struct WsTarget {
    pub(crate) url: String,
    pub(crate) addr: SocketAddr,
    host_header: String,
    path: String,
}

/// Parses a `ws://host:port/path` URL and refuses any host that is not loopback
/// (127.0.0.0/8, ::1 or `localhost`): the benchmark never sends load off this machine.
pub(crate) fn parse_ws_url(url: &str) -> Result<WsTarget> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| anyhow!("{url}: only ws:// URLs are supported (loopback, no TLS)"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = if let Some(r) = authority.strip_prefix('[') {
        let end = r.find(']').ok_or_else(|| anyhow!("{url}: unclosed '['"))?;
        (&r[..end], r[end + 1..].strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port: u16 = match port {
        Some(p) => p.parse().with_context(|| format!("{url}: bad port"))?,
        None => 80,
    };
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        Ipv4Addr::LOCALHOST.into()
    } else {
        host.parse().map_err(|_| {
            anyhow!("{url}: the host must be a loopback address or localhost, not {host:?}")
        })?
    };
    if !ip.is_loopback() {
        bail!(
            "refusing {url}: the benchmark only targets this machine (127.0.0.0/8, ::1, localhost)"
        );
    }
    Ok(WsTarget {
        url: url.to_owned(),
        addr: SocketAddr::new(ip, port),
        host_header: authority.to_owned(),
        path: path.to_owned(),
    })
}

/// A frame header cut from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHead {
    pub(crate) fin: bool,
    pub(crate) opcode: u8,
    pub(crate) header_len: usize,
    pub(crate) payload_len: usize,
}

/// Parses the header at the start of `buf`; `Ok(None)` when more bytes are needed.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<FrameHead>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        bail!("reserved bits set in a server frame (no extension was negotiated)");
    }
    if b1 & 0x80 != 0 {
        bail!("masked server frame");
    }
    let (payload_len, header_len) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            (usize::try_from(len).unwrap_or(usize::MAX), 10)
        }
        n => (usize::from(n), 2),
    };
    if payload_len > MAX_MESSAGE {
        bail!("server frame of {payload_len} bytes");
    }
    Ok(Some(FrameHead {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        header_len,
        payload_len,
    }))
}

/// A masked client frame.
pub(crate) fn client_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// What one frame turned into.
enum Cut {
    /// A complete data message in `buf[range]`.
    Message(Range<usize>),
    /// A complete fragmented message, reassembled in `partial`.
    Assembled,
    /// A control frame or an unfinished fragment: nothing to hand out.
    Nothing,
    /// The server sent a close frame (with its code).
    Closed(Option<u16>),
}

/// One client connection.
pub(crate) struct WsConn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes the next frame needs in the buffer, when it is larger than the buffer.
    need: usize,
    partial: Vec<u8>,
    in_fragment: bool,
    /// Control replies (pong, close) to write after the current batch.
    replies: Vec<u8>,
    mask_state: u32,
    /// Close code from the server, once it closed.
    pub(crate) close_code: Option<Option<u16>>,
}

impl WsConn {
    /// Connects (from `from`, a loopback address, when given) and completes the opening
    /// handshake. `buf_size` is the initial receive buffer (it grows for larger frames and
    /// bursts).
    pub(crate) async fn connect(
        target: &WsTarget,
        from: Option<IpAddr>,
        buf_size: usize,
        seed: u32,
    ) -> Result<WsConn> {
        let stream = match from {
            None => TcpStream::connect(target.addr).await,
            Some(ip) => {
                let socket = match ip {
                    IpAddr::V4(_) => TcpSocket::new_v4()?,
                    IpAddr::V6(_) => TcpSocket::new_v6()?,
                };
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(target.addr).await
            }
        }
        .with_context(|| format!("connect to {}", target.addr))?;
        stream.set_nodelay(true)?;
        let mut conn = WsConn {
            stream,
            buf: vec![0; buf_size.max(512)],
            start: 0,
            end: 0,
            need: 0,
            partial: Vec::new(),
            in_fragment: false,
            replies: Vec::new(),
            mask_state: seed | 1,
            close_code: None,
        };
        let mut key = [0u8; 16];
        for chunk in key.chunks_mut(4) {
            chunk.copy_from_slice(&conn.next_mask());
        }
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            target.path,
            target.host_header,
            base64(&key)
        );
        conn.stream.write_all(request.as_bytes()).await?;
        loop {
            if let Some(i) = memchr::memmem::find(&conn.buf[..conn.end], b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&conn.buf[..i]).into_owned();
                let status = head.lines().next().unwrap_or_default();
                if status.split_whitespace().nth(1) != Some("101") {
                    bail!("{}: handshake refused: {status}", target.url);
                }
                conn.start = i + 4;
                return Ok(conn);
            }
            if !conn.fill().await? {
                bail!("{}: connection closed during the handshake", target.url);
            }
        }
    }

    fn next_mask(&mut self) -> [u8; 4] {
        // xorshift32: masks only need to be unpredictable to proxies, of which there are none.
        let mut x = self.mask_state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.mask_state = x;
        x.to_le_bytes()
    }

    /// Sends a text message.
    pub(crate) async fn send_text(&mut self, text: &str) -> Result<()> {
        let mask = self.next_mask();
        let frame = client_frame(OP_TEXT, text.as_bytes(), mask);
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    /// Reads once from the socket. False at end of stream.
    pub(crate) async fn fill(&mut self) -> Result<bool> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() || self.need > self.buf.len() {
            let size = (self.buf.len() * 2).max(self.need);
            self.buf.resize(size, 0);
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n > 0)
    }

    /// Hands every complete message in the buffer to `on(is_text, payload)`. Returns false once
    /// the server has closed (the close is answered).
    pub(crate) fn drain(&mut self, mut on: impl FnMut(bool, &[u8])) -> Result<bool> {
        loop {
            let Some(head) = parse_head(&self.buf[self.start..self.end])? else {
                return Ok(true);
            };
            let total = head.header_len + head.payload_len;
            if self.end - self.start < total {
                self.need = total;
                return Ok(true);
            }
            self.need = 0;
            let payload = self.start + head.header_len..self.start + total;
            self.start += total;
            match self.cut(head, payload)? {
                Cut::Message(range) => on(self.text_flag(head.opcode), &self.buf[range]),
                Cut::Assembled => {
                    on(self.partial_is_text(), &self.partial[1..]);
                    self.partial.clear();
                }
                Cut::Nothing => {}
                Cut::Closed(code) => {
                    self.close_code = Some(code);
                    let mask = self.next_mask();
                    let body = code.map(|c| c.to_be_bytes().to_vec()).unwrap_or_default();
                    self.replies
                        .extend_from_slice(&client_frame(OP_CLOSE, &body, mask));
                    return Ok(false);
                }
            }
        }
    }

    fn text_flag(&self, opcode: u8) -> bool {
        opcode == OP_TEXT
    }

    fn partial_is_text(&self) -> bool {
        self.partial.first() == Some(&OP_TEXT)
    }

    fn cut(&mut self, head: FrameHead, payload: Range<usize>) -> Result<Cut> {
        match head.opcode {
            OP_TEXT | OP_BINARY if head.fin && !self.in_fragment => Ok(Cut::Message(payload)),
            OP_TEXT | OP_BINARY if !self.in_fragment => {
                // The first byte of `partial` remembers the message's opcode.
                self.in_fragment = true;
                self.partial.clear();
                self.partial.push(head.opcode);
                self.partial.extend_from_slice(&self.buf[payload]);
                Ok(Cut::Nothing)
            }
            OP_CONTINUATION if self.in_fragment => {
                self.partial.extend_from_slice(&self.buf[payload]);
                if self.partial.len() > MAX_MESSAGE {
                    bail!("fragmented message over {MAX_MESSAGE} bytes");
                }
                if head.fin {
                    self.in_fragment = false;
                    Ok(Cut::Assembled)
                } else {
                    Ok(Cut::Nothing)
                }
            }
            OP_PING => {
                let mask = self.next_mask();
                let body = self.buf[payload].to_vec();
                self.replies
                    .extend_from_slice(&client_frame(OP_PONG, &body, mask));
                Ok(Cut::Nothing)
            }
            OP_PONG => Ok(Cut::Nothing),
            OP_CLOSE => {
                let p = &self.buf[payload];
                Ok(Cut::Closed(
                    (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]])),
                ))
            }
            op => bail!("unexpected frame opcode {op:#x}"),
        }
    }

    /// Writes the pongs and close replies collected by [`drain`](Self::drain).
    pub(crate) async fn flush_replies(&mut self) -> Result<()> {
        if !self.replies.is_empty() {
            let replies = std::mem::take(&mut self.replies);
            self.stream.write_all(&replies).await?;
        }
        Ok(())
    }

    /// Waits for the next data message (setup phase: not the hot path). `None` when the server
    /// closed or the connection ended.
    pub(crate) async fn next_message(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            let mut got: Option<Vec<u8>> = None;
            // Take one message at most, leaving the rest in the buffer.
            let open = loop {
                let Some(head) = parse_head(&self.buf[self.start..self.end])? else {
                    break true;
                };
                let total = head.header_len + head.payload_len;
                if self.end - self.start < total {
                    self.need = total;
                    break true;
                }
                self.need = 0;
                let payload = self.start + head.header_len..self.start + total;
                self.start += total;
                match self.cut(head, payload)? {
                    Cut::Message(range) => {
                        got = Some(self.buf[range].to_vec());
                        break true;
                    }
                    Cut::Assembled => {
                        got = Some(self.partial[1..].to_vec());
                        self.partial.clear();
                        break true;
                    }
                    Cut::Nothing => {}
                    Cut::Closed(code) => {
                        self.close_code = Some(code);
                        break false;
                    }
                }
            };
            self.flush_replies().await?;
            if got.is_some() || !open {
                return Ok(got);
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_loopback() {
        let t = parse_ws_url("ws://127.0.0.1:8080/ws").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.path, "/ws");
        assert!(parse_ws_url("ws://localhost:1/").is_ok());
        assert!(parse_ws_url("ws://[::1]:9/x").is_ok());
        assert!(parse_ws_url("ws://127.1.2.3:9").is_ok());
        for bad in [
            "ws://10.0.0.1:80/",
            "ws://192.168.1.1/",
            "ws://example.com/",
            "wss://127.0.0.1/",
            "http://127.0.0.1/",
        ] {
            assert!(parse_ws_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn frames_round_trip() {
        let payload = vec![b'x'; 300];
        let frame = client_frame(OP_TEXT, &payload, [1, 2, 3, 4]);
        // A client frame is masked; strip the mask bit and key to read it as a server frame.
        let mut server = frame.clone();
        server[1] &= 0x7f;
        server.drain(4..8);
        let head = parse_head(&server).unwrap().unwrap();
        assert_eq!(
            head,
            FrameHead {
                fin: true,
                opcode: OP_TEXT,
                header_len: 4,
                payload_len: 300
            }
        );
        assert!(parse_head(&server[..3]).unwrap().is_none());
        assert_eq!(base64(b"hello"), "aGVsbG8=");
    }
}
