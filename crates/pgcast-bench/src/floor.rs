//! The floor of the fan-out comparison: a bare tokio-tungstenite broadcaster. One
//! tokio-postgres LISTEN connection on the baseline channel `pgcast_bench_bare`, driven with
//! `Connection::poll_message`; each payload becomes one text frame, shared (not copied) by
//! every connected socket. No auth, no routing, no serialization, no resume, one thread: the
//! least a WebSocket server can do per delivery, so pgcast's CPU per delivered frame has
//! something to be compared with.
//!
//! ```text
//!  NOTIFY pgcast_bench_bare ──▶ LISTEN task ──broadcast (bounded)──▶ one task per socket
//!                                                                     feed … feed, flush
//! ```
//!
//! It runs as a process of its own (`pgcast-bench --serve-floor`, started by
//! [`Server::floor`](crate::env::Server::floor)) so that its CPU is read apart from the load
//! generator's. It prints its URL on stdout once it listens, and exits when its stdin closes:
//! the bench holds that pipe, and the kernel closes it however the bench ends.

use std::future::poll_fn;
use std::io::Write;
use std::net::Ipv4Addr;

use anyhow::{anyhow, Context, Result};
use futures::SinkExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// The channel of the baseline trigger (`sql/bare_notify.sql`).
const LISTEN: &str = "LISTEN pgcast_bench_bare";
/// Payloads not yet taken by every socket. A socket that falls further behind is closed (it
/// would have missed frames); the bench counts it as ended early.
const QUEUE: usize = 65_536;

/// Serves until stdin closes. The database comes from `DATABASE_URL`.
pub(crate) fn main() -> Result<()> {
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL")?;
    let config: tokio_postgres::Config = url.parse().context("parse DATABASE_URL")?;
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    // One thread: the design's reference point is a broadcaster on one core, and no wake-up
    // crosses threads.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(config))
}

async fn serve(config: tokio_postgres::Config) -> Result<()> {
    let (client, mut connection) = config.connect(NoTls).await.context("connect")?;
    let (tx, _) = broadcast::channel::<Utf8Bytes>(QUEUE);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;

    // LISTEN, driving the connection ourselves until it is done (a spawned connection future
    // would drop notifications).
    {
        let mut listen = std::pin::pin!(client.batch_execute(LISTEN));
        loop {
            tokio::select! {
                r = &mut listen => {
                    r.context("LISTEN")?;
                    break;
                }
                m = poll_fn(|cx| connection.poll_message(cx)) => match m {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e).context("the LISTEN connection"),
                    None => return Err(anyhow!("the LISTEN connection closed")),
                },
            }
        }
    }
    let notifications = {
        let tx = tx.clone();
        tokio::spawn(async move {
            // `client` lives as long as the connection is read.
            let _client = client;
            loop {
                match poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        // Nobody connected yet is not an error.
                        let _ = tx.send(Utf8Bytes::from(n.payload().to_owned()));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return anyhow!("the LISTEN connection failed: {e}"),
                    None => return anyhow!("the LISTEN connection closed"),
                }
            }
        })
    };

    println!("floor ready on ws://{}/", listener.local_addr()?);
    std::io::stdout().flush()?;
    tokio::select! {
        e = notifications => Err(e.map_err(|e| anyhow!("the LISTEN task: {e}"))?),
        r = async {
            loop {
                let (tcp, _) = listener.accept().await?;
                let rx = tx.subscribe();
                tokio::spawn(async move {
                    // A socket's end (closed by the bench, or too far behind) concerns it alone.
                    let _ = socket(tcp, rx).await;
                });
            }
        } => r,
    }
}

/// Forwards every payload to one socket, flushing once per batch that was ready. It never
/// reads: the bench sends nothing after the handshake, and a closed socket shows up as a
/// failed write.
async fn socket(tcp: TcpStream, mut rx: broadcast::Receiver<Utf8Bytes>) -> Result<()> {
    tcp.set_nodelay(true)?;
    let mut ws = tokio_tungstenite::accept_async(tcp).await?;
    loop {
        let first = rx.recv().await?;
        ws.feed(Message::Text(first)).await?;
        loop {
            match rx.try_recv() {
                Ok(next) => ws.feed(Message::Text(next)).await?,
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(e) => return Err(e.into()),
            }
        }
        ws.flush().await?;
    }
}
