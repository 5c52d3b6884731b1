//! pgcast running in the test process (`pgcast::serve`), stoppable and restartable on the same
//! address: the one in-process serve start-up of the tests (the end-to-end suite includes it
//! from here, `crates/pgcast/tests/demo_api.rs` by path).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pgcast::{PgcastError, ServeOptions};
use pgcast_testkit::TestDb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// pgcast exits within 10 s of its shutdown token (the README's "Operating it"); a little slack on a busy machine.
const STOP_LIMIT: Duration = Duration::from_secs(15);
/// Time to bind and get ready (migrations included).
const START_LIMIT: Duration = Duration::from_secs(20);

/// `serve`'s options for a migrated test database: tokens signed with `secret`, an hour of
/// retention, no migration at start.
pub(crate) fn serve_options(db: &TestDb, secret: &[u8]) -> ServeOptions {
    ServeOptions {
        pg: db.pg_config().into(),
        jwt_secret: secret.to_vec(),
        jwt_issuer: None,
        jwt_audience: None,
        retention: Duration::from_secs(3600),
        migrate: false,
        links: Vec::new(),
    }
}

/// A running `pgcast::serve`; dropping it cancels its shutdown token.
pub(crate) struct Pgcast {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), PgcastError>>>,
}

impl Pgcast {
    /// Serves on `addr` (port 0: any free port) and waits until `/readyz` answers 200, i.e. the
    /// listener is connected and caught up.
    pub(crate) async fn start(addr: SocketAddr, options: ServeOptions) -> Pgcast {
        let deadline = Instant::now() + START_LIMIT;
        // Right after a stop the port can still be held for a moment by the old socket.
        let tcp = loop {
            match pgcast::bind(addr).await {
                Ok(tcp) => break tcp,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("binding {addr} again: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("bind {addr}: {e}"),
            }
        };
        let addr = tcp.local_addr().expect("local address");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(pgcast::serve(tcp, options, shutdown.clone()));
        let mut server = Pgcast {
            addr,
            shutdown,
            task: Some(task),
        };
        server.wait_ready(deadline).await;
        server
    }

    /// The address it serves on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>` + `path`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Cancels the shutdown token and waits until `serve` has returned.
    pub(crate) async fn stop(mut self) {
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        match tokio::time::timeout(STOP_LIMIT, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("pgcast failed: {e}"),
            Ok(Err(e)) => panic!("pgcast panicked: {e}"),
            Err(_) => panic!("pgcast did not stop within {STOP_LIMIT:?}"),
        }
    }

    async fn wait_ready(&mut self, deadline: Instant) {
        loop {
            if self.get_status("/readyz").await == Some(200) {
                return;
            }
            let task = self.task.as_mut().expect("running");
            if task.is_finished() {
                match task.await {
                    Ok(Ok(())) => panic!("pgcast stopped before it was ready"),
                    Ok(Err(e)) => panic!("pgcast failed to start: {e}"),
                    Err(e) => panic!("pgcast panicked: {e}"),
                }
            }
            assert!(
                Instant::now() < deadline,
                "pgcast not ready within {START_LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The HTTP status of `GET path`, or `None` when there is no answer.
    async fn get_status(&self, path: &str) -> Option<u16> {
        let exchange = async {
            let mut tcp = TcpStream::connect(self.addr).await.ok()?;
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.addr
            );
            tcp.write_all(request.as_bytes()).await.ok()?;
            let mut response = Vec::new();
            tcp.read_to_end(&mut response).await.ok()?;
            let text = String::from_utf8_lossy(&response);
            text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
        };
        tokio::time::timeout(Duration::from_secs(2), exchange)
            .await
            .ok()
            .flatten()
    }
}

impl Drop for Pgcast {
    fn drop(&mut self) {
        // A test that failed half-way: let the server close its sockets and stop; the runtime
        // ending with the test aborts whatever is left.
        self.shutdown.cancel();
    }
}
