//! The tests' plain-HTTP probes of a running pgcast: a minimal HTTP/1.0 GET (from any local
//! 127/8 address, to play several clients), and one sample read out of a Prometheus text body.

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
