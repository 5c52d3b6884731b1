//! Shared set-up of the listener tests: a migrated database of its own, a listener on it, a
//! marker row that proves nothing more is coming from it, and login roles with chosen grants
//! and connections as them (the privilege tests).
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::future::poll_fn;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use pgcast_events::AssignmentEvent;
use pgcast_listener::{
    migrate, Backoff, EventLog, Listener, ListenerStatus, MigrationScope, Output, Start,
};
use pgcast_testkit::{PgCluster, TestDb};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::sync::CancellationToken;

pub async fn migrated_db(cluster: &PgCluster) -> (TestDb, Client) {
    let db = cluster.create_database().await.expect("create database");
    let mut client = db.connect().await.expect("connect");
    migrate(&mut client, MigrationScope::All)
        .await
        .expect("migrate");
    (db, client)
}

pub fn pool(db: &TestDb) -> Pool {
    db.pool(4)
}

/// The `customer_name` of marker rows.
pub const MARKER: &str = "pgcast-test-marker";

pub struct Running {
    pub events: mpsc::Receiver<Output>,
    pub status: Arc<ListenerStatus>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
    /// The database it listens to, where [`assert_quiet`](Self::assert_quiet) writes its
    /// marker.
    pub db: TestDb,
}

impl Running {
    /// Receives until `n` events arrived, failing after `limit` or at a gap.
    pub async fn take(&mut self, n: usize, limit: Duration) -> Vec<Arc<AssignmentEvent>> {
        let deadline = Instant::now() + limit;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match self.next_output(deadline).await {
                Output::Event(e) => got.push(e),
                gap => panic!("{gap:?} after {} of {n} events", got.len()),
            }
        }
        got
    }

    /// The listener's next output, failing at `deadline`.
    pub async fn next_output(&mut self, deadline: Instant) -> Output {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.events.recv()).await {
            Ok(Some(output)) => output,
            Ok(None) => panic!("listener stopped"),
            Err(_) => panic!("nothing from the listener in time"),
        }
    }

    /// Asserts that nothing more was on its way (used after all expected events): commits a
    /// marker row (one event, `customer_name` [`MARKER`]) and expects its event to be the very
    /// next one. The listener emits in position order, so any late or duplicate event of an
    /// earlier commit would come first; a quiet window would miss one that is late enough.
    /// The marker adds one event (and one doorbell) to the listener's counters.
    pub async fn assert_quiet(&mut self) {
        let client = self.db.connect().await.expect("connect for the marker");
        let marker: uuid::Uuid = client
            .query_one(INSERT_ONE, &[&MARKER])
            .await
            .expect("insert the marker")
            .get(0);
        let next = self.take(1, Duration::from_secs(30)).await.remove(0);
        assert!(
            next.assignment.id == marker,
            "unexpected extra event before the marker: {next:?}"
        );
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("listener stops on shutdown")
            .expect("listener task");
    }
}

pub async fn start_listener(db: &TestDb, start: Start) -> Running {
    let listener = Listener::new(db.pg_config(), EventLog::new(pool(db))).with_backoff(
        Backoff::new(Duration::from_millis(20), Duration::from_millis(200)),
    );
    let status = listener.status();
    let (tx, events) = mpsc::channel(1024);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(listener.run(start, tx, shutdown.clone()));
    let running = Running {
        events,
        status,
        shutdown,
        task,
        db: db.clone(),
    };
    tokio::time::timeout(Duration::from_secs(10), running.status.wait_ready())
        .await
        .expect("listener ready");
    running
}

/// The server process of `client`'s connection (to find it in `pg_locks`).
pub async fn backend_pid(client: &Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("backend pid")
        .get(0)
}

/// Every position in the log, in order, but those of [`Running::assert_quiet`]'s markers.
pub async fn log_positions(client: &Client) -> Vec<i64> {
    client
        .query(
            "SELECT position FROM pgcast.assignment_events
             WHERE payload->'row'->>'customer_name' IS DISTINCT FROM $1
             ORDER BY position",
            &[&MARKER],
        )
        .await
        .expect("read log")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

pub const INSERT_ONE: &str = "INSERT INTO session_assignments (session_id, status, customer_name) \
     VALUES (gen_random_uuid(), 'queued', $1) RETURNING id";

/// A new session of `customer` (a free one); its id.
pub async fn insert_session(client: &Client, customer: uuid::Uuid) -> uuid::Uuid {
    client
        .query_one(
            "INSERT INTO sessions (customer_id, kind) VALUES ($1, 'free') RETURNING id",
            &[&customer],
        )
        .await
        .expect("insert a session")
        .get(0)
}

/// One statement of `$1` general queued rows, named `c1` … `c<$1>` in order.
pub const INSERT_MANY: &str =
    "INSERT INTO session_assignments (session_id, status, customer_name) \
     SELECT gen_random_uuid(), 'queued', 'c' || g FROM generate_series(1, $1::int) g";

pub mod embedded {
    pub mod realtime {
        refinery::embed_migrations!("../../migrations/realtime");
    }
    pub mod app {
        refinery::embed_migrations!("../../migrations/app");
    }
}

/// A new database of the shared cluster, installed up to `version` only ([`install_version`]),
/// and a connection to it.
pub async fn db_at_version(version: u32) -> (TestDb, Client) {
    let db = PgCluster::shared()
        .expect("the shared cluster")
        .create_database()
        .await
        .expect("a database");
    let mut client = db.connect().await.expect("connect");
    install_version(&mut client, version).await;
    (db, client)
}

/// Installs the app tables and the realtime objects up to `version` only, as an older release
/// did.
pub async fn install_version(client: &mut Client, version: u32) {
    client
        .batch_execute("CREATE SCHEMA IF NOT EXISTS pgcast")
        .await
        .unwrap();
    embedded::app::migrations::runner()
        .set_migration_table_name("pgcast.app_migrations")
        .run_async(client)
        .await
        .unwrap();
    let mut realtime =
        embedded::realtime::migrations::runner().set_target(refinery::Target::Version(version));
    realtime.set_migration_table_name("pgcast.realtime_migrations");
    realtime.run_async(client).await.unwrap();
    assert_eq!(
        pgcast_listener::installed_version(client).await.unwrap(),
        Some(version as i32)
    );
}

/// Creates login role `<name>_<db>` (roles are cluster-wide, so the database name keeps it
/// unique) with `grants` (`{role}` stands for its name); returns its name and the settings to
/// connect as it.
pub async fn create_role(
    db: &TestDb,
    admin: &Client,
    name: &str,
    grants: &str,
) -> (String, tokio_postgres::Config) {
    let role = format!("{name}_{}", db.name());
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; {}",
            grants.replace("{role}", &role)
        ))
        .await
        .expect("create role");
    let mut config = db.pg_config();
    config.user(&role);
    (role, config)
}

/// A login role with `grants` (see [`create_role`]) and a connection as it.
pub async fn connect_as(db: &TestDb, admin: &Client, name: &str, grants: &str) -> (String, Client) {
    let (role, config) = create_role(db, admin, name, grants).await;
    let (client, connection) = config.connect(NoTls).await.expect("connect as the role");
    tokio::spawn(connection);
    (role, client)
}

/// A login role with `grants` (see [`create_role`]), and a connection as it whose
/// notifications are forwarded to the returned receiver.
pub async fn connect_as_hearing(
    db: &TestDb,
    admin: &Client,
    name: &str,
    grants: &str,
) -> (Client, mpsc::UnboundedReceiver<String>) {
    let (_, config) = create_role(db, admin, name, grants).await;
    let (client, mut connection) = config.connect(NoTls).await.expect("connect as the role");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    (client, rx)
}

/// A statement that must fail with "permission denied".
pub async fn denied(client: &Client, sql: &str) {
    let err = client
        .batch_execute(sql)
        .await
        .expect_err(&format!("{sql} must be refused"));
    let db = err.as_db_error().unwrap_or_else(|| panic!("{sql}: {err}"));
    assert_eq!(
        db.code(),
        &tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE,
        "{sql}: {}",
        db.message()
    );
}

/// Pruning runs within `limit` (while an intruder holds whatever it could take), deletes
/// nothing younger than an hour, and records its run in `pgcast.log_state`.
pub async fn assert_prune_runs(client: &Client, limit: Duration) {
    let pruned: i32 = tokio::time::timeout(
        limit,
        client.query_one("SELECT pgcast.prune_events('1 hour')", &[]),
    )
    .await
    .expect("pruning runs while the intruder holds what it can")
    .unwrap()
    .get(0);
    assert_eq!(pruned, 0);
    let recorded: bool = client
        .query_one(
            "SELECT last_pruned_at > now() - interval '1 minute' FROM pgcast.log_state",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(recorded, "the prune run is recorded");
}

/// Asserts that positions increase by exactly one from event to event.
pub fn assert_contiguous(events: &[Arc<AssignmentEvent>]) {
    for w in events.windows(2) {
        assert_eq!(
            w[1].position,
            w[0].position + 1,
            "positions of one transaction are one block"
        );
    }
}

/// Applies every pending migration to an older install and checks it is then at this
/// binary's version. Returns how many migrations ran.
pub async fn upgrade_to_latest(client: &mut Client) -> usize {
    let applied = migrate(client, MigrationScope::All).await.unwrap();
    assert_eq!(
        pgcast_listener::installed_version(client).await.unwrap(),
        Some(pgcast_listener::SCHEMA_VERSION)
    );
    applied
}
