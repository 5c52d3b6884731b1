//! The tests' plain HTTP: probes of a running pgcast (a minimal HTTP/1.0 GET from any local
//! 127/8 address, to play several clients, and one sample read out of a Prometheus text body),
//! and [`Scripted`], a stand-in HTTP endpoint (an identity provider's JWKS).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound for one exchange; never reached when things work.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(15);

/// A TCP connection to `addr` from the local address `from` (any of 127/8 on Linux, which
/// routes the whole block to the loopback interface): how tests play several clients.
pub async fn connect_from(from: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match from {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(addr).await
}

/// One HTTP/1.0 request over `stream` (the server closes after the response): the raw
/// response, or `None` when the connection failed or was closed without one.
async fn exchange(mut stream: TcpStream, addr: SocketAddr, path: &str) -> std::io::Result<Vec<u8>> {
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    Ok(response)
}

/// (status, body) of an HTTP response, `None` if it is not one.
fn parse(response: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// `GET path` → (status, body); fails the test when there is no HTTP answer within 15 s.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = tokio::time::timeout(EXCHANGE_LIMIT, async {
        exchange(TcpStream::connect(addr).await?, addr, path).await
    })
    .await
    .unwrap_or_else(|_| panic!("GET {path}: no response within {EXCHANGE_LIMIT:?}"))
    .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    parse(&response).unwrap_or_else(|| {
        panic!(
            "GET {path}: not an HTTP response: {:?}",
            String::from_utf8_lossy(&response)
        )
    })
}

/// `GET path` from the local address `from`: `Some((status, body))`, or `None` when the server
/// closed the connection without a response (a refusal at accept).
pub async fn http_get_from(from: IpAddr, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let response = tokio::time::timeout(EXCHANGE_LIMIT, async {
        exchange(connect_from(from, addr).await?, addr, path).await
    })
    .await
    .unwrap_or_else(|_| {
        panic!("GET {path} from {from}: no response or close within {EXCHANGE_LIMIT:?}")
    });
    // A refused connection may be reset while the request is being written.
    parse(&response.ok()?)
}

/// The value of the sample `series` (name with labels exactly as exposed, e.g.
/// `pgcast_connections` or `pgcast_delivery_latency_seconds_count`) in a Prometheus text body.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key == series).then(|| value.parse().ok())?
    })
}

/// An HTTP endpoint on 127.0.0.1 that answers every request with the status and body the test
/// set last, after the delay it set (a slow or failing server is what some tests are about), and
/// counts requests: it stands in for an identity provider's JWKS endpoint. The accept loop ends
/// when this is dropped.
pub struct Scripted {
    addr: SocketAddr,
    state: std::sync::Arc<ScriptState>,
    accept: tokio::task::JoinHandle<()>,
}

struct ScriptState {
    answer: std::sync::Mutex<(u16, String)>,
    delay: std::sync::Mutex<Duration>,
    requests: std::sync::atomic::AtomicUsize,
    last_request: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// A request head larger than this is dropped unanswered.
const MAX_REQUEST_HEAD: usize = 16 << 10;

impl Scripted {
    /// Starts answering `status` with `body`.
    pub async fn start(status: u16, body: impl Into<String>) -> std::io::Result<Scripted> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = std::sync::Arc::new(ScriptState {
            answer: std::sync::Mutex::new((status, body.into())),
            delay: std::sync::Mutex::new(Duration::ZERO),
            requests: Default::default(),
            last_request: Default::default(),
        });
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(answer(stream, shared.clone()));
            }
        });
        Ok(Scripted {
            addr,
            state,
            accept,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What every later request gets.
    pub fn answer(&self, status: u16, body: impl Into<String>) {
        *lock(&self.state.answer) = (status, body.into());
    }

    /// How long every later answer waits after the request arrived.
    pub fn delay(&self, delay: Duration) {
        *lock(&self.state.delay) = delay;
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.state
            .requests
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// When the last request arrived.
    pub fn last_request(&self) -> Option<tokio::time::Instant> {
        *lock(&self.state.last_request)
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads one request head and writes the scripted answer (`Connection: close`).
async fn answer(mut stream: TcpStream, state: std::sync::Arc<ScriptState>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_REQUEST_HEAD {
            return;
        }
    }
    state
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    *lock(&state.last_request) = Some(tokio::time::Instant::now());
    let delay = *lock(&state.delay);
    // The scripted delay is the behaviour under test (a slow provider), not a wait for a race.
    tokio::time::sleep(delay).await;
    let (status, body) = lock(&state.answer).clone();
    let response = format!(
        "HTTP/1.1 {status} Answer\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}
