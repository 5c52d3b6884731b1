//! `pgcast demo` running in the test process (`pgcast::demo_on`) on a throwaway database of the
//! shared test cluster: the demo's data, pages and action API, with tokens the test can mint.
//! The one in-process demo start-up of the tests: the end-to-end suite includes it from here,
//! `crates/pgcast/tests/demo_api.rs` by path.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use pgcast::{DemoReady, DemoSetup, PgcastError};
use pgcast_events::{Principal, Role};
use pgcast_testkit::{PgCluster, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// The token secret of the demo the tests start (the real demo draws a random one).
pub(crate) const DEMO_SECRET: &[u8] = b"pgcast checklist test secret, 32+ bytes";
/// Time to migrate, load the demo data and get ready.
const START_LIMIT: Duration = Duration::from_secs(30);
/// pgcast exits within 10 s of its shutdown token (the README's "Operating it"); a little slack.
const STOP_LIMIT: Duration = Duration::from_secs(15);

/// A running demo; dropping it cancels its shutdown token.
pub(crate) struct DemoServer {
    addr: SocketAddr,
    ready: DemoReady,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), PgcastError>>>,
    /// The database, kept until the demo has stopped.
    _db: TestDb,
}

impl DemoServer {
    /// Starts the demo on a fresh database and waits until `/readyz` answers 200. Returns it
    /// and a connection to its database.
    pub(crate) async fn start() -> (DemoServer, Client) {
        let db = PgCluster::shared()
            .expect("test cluster")
            .create_database()
            .await
            .expect("create database");
        let client = db.connect().await.expect("connect");
        let tcp = pgcast::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind");
        let addr = tcp.local_addr().expect("local address");
        let setup = DemoSetup {
            pg: db.pg_config(),
            jwt_secret: DEMO_SECRET.to_vec(),
            retention: Duration::from_secs(3600),
            simulate: None,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shutdown = CancellationToken::new();
        let mut task = tokio::spawn(pgcast::demo_on(
            tcp,
            setup,
            move |ready: &DemoReady| {
                let _ = tx.send(ready.clone());
            },
            shutdown.clone(),
        ));
        let deadline = Instant::now() + START_LIMIT;
        let ready = tokio::select! {
            ready = rx => ready.expect("the demo reports its pages"),
            ended = &mut task => panic!("the demo stopped before it was ready: {ended:?}"),
            () = tokio::time::sleep(START_LIMIT) => panic!("the demo not ready within {START_LIMIT:?}"),
        };
        let server = DemoServer {
            addr,
            ready,
            shutdown,
            task: Some(task),
            _db: db,
        };
        loop {
            if server.request("GET", "/readyz", None, None).await.0 == 200 {
                break;
            }
            assert!(
                !server.task.as_ref().is_some_and(JoinHandle::is_finished),
                "the demo stopped before /readyz answered"
            );
            assert!(
                Instant::now() < deadline,
                "the demo not ready within {START_LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (server, client)
    }

    /// The address it listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>` + `path`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The path of the demo page whose label contains `label` (as the demo prints it).
    pub(crate) fn link(&self, label: &str) -> String {
        self.ready
            .links
            .iter()
            .find(|(l, _)| l.contains(label))
            .map(|(_, path)| path.clone())
            .unwrap_or_else(|| panic!("no demo page {label:?} in {:?}", self.ready.links))
    }

    /// A token of the demo for `who`.
    pub(crate) fn token(&self, who: &Principal) -> String {
        pgcast_testkit::token::mint(DEMO_SECRET, who, Duration::from_secs(3600))
    }

    /// A page link for a new user of `role` (and `workshop`), its token in the fragment.
    pub(crate) fn page_for(&self, role: Role, workshop: Option<uuid::Uuid>) -> (Principal, String) {
        let who = Principal {
            user_id: uuid::Uuid::new_v4(),
            role,
            workshop_id: workshop,
        };
        let page = match role {
            Role::Customer => "/customer",
            _ => "/mechanic",
        };
        let link = format!("{page}#token={}", self.token(&who));
        (who, link)
    }

    /// A minimal HTTP/1.0 exchange: (status, body).
    pub(crate) async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String) {
        let exchange = async {
            let response = exchange(self.addr, method, path, token, body).await.ok()?;
            let text = String::from_utf8_lossy(&response).into_owned();
            let (head, body) = text.split_once("\r\n\r\n")?;
            let status = head.split_whitespace().nth(1)?.parse().ok()?;
            Some((status, body.to_owned()))
        };
        tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .ok()
            .flatten()
            .unwrap_or((0, String::new()))
    }

    /// Cancels the shutdown token and waits until the demo has returned.
    pub(crate) async fn stop(mut self) {
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        match tokio::time::timeout(STOP_LIMIT, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("the demo failed: {e}"),
            Ok(Err(e)) => panic!("the demo panicked: {e}"),
            Err(_) => panic!("the demo did not stop within {STOP_LIMIT:?}"),
        }
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// One HTTP/1.0 request to `addr` (a JSON body, an optional bearer token): the raw response,
/// read until the server closes.
pub(crate) async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(addr).await?;
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let body = body.unwrap_or("");
    request.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    tcp.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await?;
    Ok(response)
}

/// The demo user a printed page link is for (the `sub` of its fragment token).
pub(crate) fn link_user(link: &str) -> uuid::Uuid {
    let token = link
        .split_once("#token=")
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("no token in {link}"));
    let claims = pgcast_testkit::token::claims(token);
    claims["sub"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("sub is a UUID")
}
