//! `pgcast doctor`: is this database able to deliver events, and how is the log doing?
//!
//! Every query it runs is a `.sql` file under `sql/doctor_*.sql`. A check either passes, warns
//! (worth knowing, not broken) or fails (events are not, or soon will not be, delivered, or a
//! guarantee in docs/architecture.md no longer holds). The privilege, lock and retention checks:
//!
//! | check | fails when | warns when |
//! |---|---|---|
//! | `grants` | a role other than pgcast's owner may run pgcast's functions, write, lock or reference its tables, set the position sequence or create objects in schema `pgcast`; or PUBLIC may read the log (a grant on one column counts) | — |
//! | `commit lock` | a session not committing (idle in transaction, e.g. after `SET CONSTRAINTS ALL IMMEDIATE`) has held the commit-order lock for more than 5 s, or writers have waited that long for it | — |
//! | `pruning` | it has not run for 10 min while events older than the retention it was last given remain: the log grows without bound | it never ran, or has not run for 10 min with nothing overdue yet |
//! | `unpublished` | rows of `pgcast.assignment_changes` whose statement is not in `pgcast.committed_statements`: changes captured while the publishing trigger did not fire, never delivered and never pruned | the role may not count them (it needs `SELECT` on the table's `statement` column) |
//!
//! [`doctor`] also checks how pgcast connects, with the connection strings `serve` would use:
//!
//! | check | fails when | warns when |
//! |---|---|---|
//! | `tls`, `listen tls` | — (a connection that does not meet its `sslmode` is refused before any check runs) | the session is not encrypted over a network (not loopback), or pgcast's TLS ends at a pooler or proxy whose link to PostgreSQL is plain |
//! | `listen probe` | a `LISTEN` on a private channel of the listen connection hears nothing within 5 s of a `NOTIFY` from the query connection: the listen connection goes through a transaction pooler (use `--listen-database-url`) | — |
//!
//! The role running `doctor` needs `USAGE` on schema `pgcast`, `SELECT` on
//! `pgcast.committed_statements` and `pgcast.log_state`, `SELECT` on the `statement` column of
//! `pgcast.assignment_changes` (to count its rows; without it `unpublished` warns) and
//! `pg_monitor` (to see the state of another role's session that holds the commit-order lock):
//! the README's monitor role, which reads no event content.
//!
//! Why about 850 lines: one report, one function per check (each reading its own
//! `sql/doctor_*.sql`), sharing the report's types and its text and JSON rendering.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use pgcast_listener::{installed_version, APPLICATION_NAME, SCHEMA_VERSION};
use tokio::sync::mpsc;
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Notification};

use crate::config::{RootCerts, SslMode};
use crate::db::{connect, connect_listening};
use crate::{Database, DatabaseUrl, PgcastError};

const OBJECTS: &str = include_str!("../../../sql/doctor_objects.sql");
const TRIGGER: &str = include_str!("../../../sql/doctor_trigger.sql");
const NOTIFY_QUEUE: &str = include_str!("../../../sql/doctor_notify_queue.sql");
const LOG: &str = include_str!("../../../sql/doctor_log.sql");
const UNPUBLISHED: &str = include_str!("../../../sql/doctor_unpublished.sql");
const LISTENERS: &str = include_str!("../../../sql/doctor_listeners.sql");
const GRANTS: &str = include_str!("../../../sql/doctor_grants.sql");
const COMMIT_LOCK: &str = include_str!("../../../sql/doctor_commit_lock.sql");
const PRUNING: &str = include_str!("../../../sql/doctor_pruning.sql");
const TLS: &str = include_str!("../../../sql/doctor_tls.sql");
const LISTEN_PROBE: &str = include_str!("../../../sql/doctor_listen_probe.sql");

/// The application table the trigger must be on.
const TABLE: &str = "session_assignments";
/// Version 2's row trigger: left in place by an upgrade whose role did not own [`TABLE`].
const LEGACY_TRIGGER: &str = "pgcast_emit_assignment_event";
/// The statement triggers on [`TABLE`] that capture changes (version 3 on) are named with it.
const CAPTURE_PREFIX: &str = "pgcast_capture_";
/// The deferred trigger that publishes each captured statement at commit, and its table.
const PUBLISH_TRIGGER: &str = "pgcast_publish_at_commit";
const PUBLISH_TABLE: &str = "pgcast.assignment_changes";
/// The statement trigger on [`TABLE`] that notes where a statement run inside a trigger starts
/// (version 8), so that it is logged after the statement it ran in.
const START_TRIGGER: &str = "pgcast_statement_start";
/// The trigger that logs a TRUNCATE as a delete of every row (version 9).
const TRUNCATE_TRIGGER: &str = "pgcast_capture_truncate";
/// Above this fraction of the NOTIFY queue in use, the database is unhealthy: from here
/// (`pgcast.doorbell_queue_limit()`, the same value) pgcast's commits ring no doorbell and its
/// listener reads the log on a timer, and at 100 % every other transaction that notifies fails
/// at commit.
pub const MAX_QUEUE_USAGE: f64 = 0.5;
/// A session holding the commit-order lock this long is stalling every write to
/// `session_assignments` (a commit holds it for microseconds).
const MAX_COMMIT_LOCK: Duration = Duration::from_secs(5);
/// `pgcast serve` prunes every minute (every replica tries; one works, the others skip); no
/// run for this long means pruning is stuck or no server runs.
const MAX_PRUNE_GAP: Duration = Duration::from_secs(600);
/// A listener reads each event within milliseconds of its commit and reports its position
/// every 0.5 s: one whose oldest unread event is older than this is stalled or cannot keep up.
const MAX_LISTENER_LAG: Duration = Duration::from_secs(30);
/// Dangerous privileges listed in full; beyond, only their number.
const MAX_GRANTS_SHOWN: usize = 10;
/// How long the LISTEN probe waits for its own notification: on a direct session it arrives
/// within milliseconds.
const PROBE_WAIT: Duration = Duration::from_secs(5);

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// As it should be.
    Ok,
    /// Worth knowing; does not make the database unhealthy.
    Warn,
    /// Events are not (or soon will not be) delivered.
    Fail,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// Short stable name: `tls`, `schema`, `trigger`, `grants`, `commit lock`,
    /// `notify queue`, `event log`, `unpublished`, `pruning`, `listeners`, `listen tls`,
    /// `listen probe`.
    pub name: &'static str,
    /// Pass, warn or fail.
    pub verdict: Verdict,
    /// What was found, naming the problem and the fix when there is one.
    pub detail: String,
}

/// Everything `doctor` found.
#[derive(Debug, Clone, PartialEq)]
pub struct DoctorReport {
    /// In the order they ran.
    pub checks: Vec<Check>,
}

impl DoctorReport {
    /// True when no check failed.
    pub fn is_healthy(&self) -> bool {
        self.checks.iter().all(|c| c.verdict != Verdict::Fail)
    }

    /// The check called `name`, if it ran.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// The failed checks.
    pub fn problems(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.verdict == Verdict::Fail)
    }

    fn push(&mut self, name: &'static str, verdict: Verdict, detail: impl Into<String>) {
        self.checks.push(Check {
            name,
            verdict,
            detail: detail.into(),
        });
    }
}

impl fmt::Display for DoctorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            writeln!(f, "{:<4}  {:<12}  {}", c.verdict.label(), c.name, c.detail)?;
        }
        if self.is_healthy() {
            f.write_str("healthy")
        } else {
            let names: Vec<_> = self.problems().map(|c| c.name).collect();
            write!(f, "UNHEALTHY: {}", names.join(", "))
        }
    }
}

fn query_error(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgcastError {
    move |source| PgcastError::Query { what, source }
}

/// What `pgcast doctor` runs: connects as `serve` would (queries through `db`'s URL, LISTEN
/// through its listen URL), reports whether each connection is encrypted, runs [`diagnose`]
/// on the database, then checks that a LISTEN on the listen connection hears a NOTIFY sent
/// from the query connection. Fails when a connection cannot be made (one line: a TLS
/// failure names the host and what did not verify).
pub async fn doctor(db: &Database) -> Result<DoctorReport, PgcastError> {
    let client = connect(db.url(), "pgcast-doctor").await?;
    let mut report = DoctorReport { checks: Vec::new() };
    tls_check("tls", &client, db.url(), &mut report).await?;
    report.checks.extend(diagnose(&client).await?.checks);
    let (listen, notifications) = connect_listening(db.listen_url(), "pgcast-doctor-probe").await?;
    if db.has_listen_url() {
        tls_check("listen tls", &listen, db.listen_url(), &mut report).await?;
    }
    listen_probe(
        &client,
        &listen,
        notifications,
        db.has_listen_url(),
        &mut report,
    )
    .await?;
    Ok(report)
}

/// Whether the session of `client` (connected to `url`) is encrypted, and what was verified.
async fn tls_check(
    name: &'static str,
    client: &Client,
    url: &DatabaseUrl,
    report: &mut DoctorReport,
) -> Result<(), PgcastError> {
    let row = client
        .query_one(TLS, &[])
        .await
        .map_err(query_error("tls"))?;
    let ssl: Option<bool> = row.try_get(0).map_err(query_error("tls"))?;
    let version: Option<String> = row.try_get(1).map_err(query_error("tls"))?;
    let cipher: Option<String> = row.try_get(2).map_err(query_error("tls"))?;
    let bits: Option<i32> = row.try_get(3).map_err(query_error("tls"))?;
    let tls = url.tls();
    let mode = tls.mode;
    let (verdict, detail) = if ssl == Some(true) {
        let verified = match (&tls.roots, mode) {
            (RootCerts::None, _) => format!(
                "the server's certificate is not verified (sslmode={mode}; verify-full with \
                 sslrootcert verifies it)"
            ),
            (_, SslMode::VerifyFull) => {
                format!("the server's certificate and host name are verified (sslmode={mode})")
            }
            (_, _) => format!(
                "the server's certificate chain is verified, not its host name (sslmode={mode}; \
                 verify-full checks it)"
            ),
        };
        (
            Verdict::Ok,
            format!(
                "encrypted: {} {} ({} bits); {verified}",
                version.as_deref().unwrap_or("TLS"),
                cipher.as_deref().unwrap_or("?"),
                bits.unwrap_or(0)
            ),
        )
    } else if mode >= SslMode::Require && !over_unix_socket(url) {
        // tokio-postgres refuses a plain connection under these modes, so pgcast's own link
        // is encrypted: whatever answers it (a pooler, a proxy) talks to PostgreSQL in plain.
        (
            Verdict::Warn,
            format!(
                "pgcast's connection is encrypted (sslmode={mode}), but PostgreSQL sees this \
                 session unencrypted: a pooler or proxy in between ends TLS and its link to \
                 PostgreSQL is plain"
            ),
        )
    } else if is_local(url) {
        (
            Verdict::Ok,
            format!("not encrypted (sslmode={mode}); the server is on this machine"),
        )
    } else {
        let why = match mode {
            SslMode::Disable => "sslmode=disable".to_owned(),
            _ => format!("sslmode={mode} and the server offers no TLS"),
        };
        (
            Verdict::Warn,
            format!(
                "not encrypted ({why}): passwords and events cross the network in plain; use \
                 sslmode=verify-full with sslrootcert"
            ),
        )
    };
    report.push(name, verdict, detail);
    Ok(())
}

fn over_unix_socket(url: &DatabaseUrl) -> bool {
    let hosts = url.pg_config().get_hosts();
    !hosts.is_empty() && hosts.iter().all(|h| matches!(h, Host::Unix(_)))
}

/// Every host is this machine: a Unix socket, `localhost` or a loopback address.
fn is_local(url: &DatabaseUrl) -> bool {
    let pg = url.pg_config();
    let loopback = |text: &str| {
        text == "localhost"
            || text
                .trim_matches(|c| c == '[' || c == ']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    };
    let hosts_local = pg.get_hosts().iter().all(|h| match h {
        Host::Tcp(name) => loopback(name),
        Host::Unix(_) => true,
    });
    let addrs_local = pg.get_hostaddrs().iter().all(IpAddr::is_loopback);
    hosts_local && addrs_local
}

/// LISTEN on a private channel of the listen connection, NOTIFY it from the query connection,
/// and wait for it. Through a transaction pooler the LISTEN runs on whichever server session
/// the pooler lends for that statement, and the notification never comes back to pgcast.
async fn listen_probe(
    client: &Client,
    listen: &Client,
    mut notifications: mpsc::UnboundedReceiver<Notification>,
    separate: bool,
    report: &mut DoctorReport,
) -> Result<(), PgcastError> {
    let channel = format!("pgcast_doctor_{:016x}", rand::random::<u64>());
    // LISTEN takes no bind parameter; the name is ours, `[a-z0-9_]` only, so it needs no
    // quoting.
    listen
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .map_err(query_error("listen probe"))?;
    // A NOTIFY that fails (a full queue, which the report already names; a standby) is this
    // check's failure, not the end of the report.
    if let Err(error) = client.execute(LISTEN_PROBE, &[&channel]).await {
        let _ = listen.batch_execute("UNLISTEN *").await;
        report.push(
            "listen probe",
            Verdict::Fail,
            format!(
                "could not send a NOTIFY through --database-url: {}",
                error
                    .as_db_error()
                    .map_or_else(|| error.to_string(), |db| db.message().to_owned())
            ),
        );
        return Ok(());
    }
    let heard = tokio::time::timeout(PROBE_WAIT, async {
        while let Some(n) = notifications.recv().await {
            if n.channel() == channel {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    // Leaves the server's listener list as it was (the session ends soon anyway).
    let _ = listen.batch_execute("UNLISTEN *").await;
    let via = if separate {
        "--listen-database-url"
    } else {
        "--database-url"
    };
    if heard {
        report.push(
            "listen probe",
            Verdict::Ok,
            format!("a LISTEN through {via} hears a NOTIFY sent through --database-url"),
        );
    } else {
        report.push(
            "listen probe",
            Verdict::Fail,
            format!(
                "a LISTEN through {via} heard nothing within {}s of a NOTIFY: that connection \
                 is not a session of its own (a transaction pooler such as PgBouncer in \
                 transaction mode?), so pgcast's listener would hear no doorbell and deliver \
                 events only when it polls the log (every 15 s); point \
                 --listen-database-url (PGCAST_LISTEN_DATABASE_URL) at PostgreSQL itself or at \
                 a session-mode pool",
                PROBE_WAIT.as_secs()
            ),
        );
    }
    Ok(())
}

/// Runs every check on `client`'s database. Fails only when the database cannot answer; a
/// broken installation is a report with failed checks.
pub async fn diagnose(client: &Client) -> Result<DoctorReport, PgcastError> {
    let mut report = DoctorReport { checks: Vec::new() };

    let missing: Vec<String> = client
        .query(OBJECTS, &[])
        .await
        .map_err(query_error("realtime objects"))?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(query_error("realtime objects"))?;
    let installed = missing.is_empty();
    if installed {
        schema_check(client, &mut report).await?;
    } else {
        report.push(
            "schema",
            Verdict::Fail,
            format!(
                "realtime objects missing: {}; run `pgcast migrate` (or `--realtime-only`)",
                missing.join(", ")
            ),
        );
    }

    trigger_check(client, &mut report).await?;
    if installed {
        grants_check(client, &mut report).await?;
        commit_lock_check(client, &mut report).await?;
    }

    let usage: f64 = client
        .query_one(NOTIFY_QUEUE, &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(query_error("notification queue usage"))?;
    let percent = usage * 100.0;
    if usage > MAX_QUEUE_USAGE {
        report.push(
            "notify queue",
            Verdict::Fail,
            format!(
                "{percent:.1}% of the NOTIFY queue in use (limit {:.0}%): a listening session is \
                 not consuming (look in pg_stat_activity for one idle in transaction); pgcast's \
                 commits ring no doorbell (events reach clients by polling, within 0.5 s), and \
                 at 100% every other notifying commit fails",
                MAX_QUEUE_USAGE * 100.0
            ),
        );
    } else {
        report.push(
            "notify queue",
            Verdict::Ok,
            format!("{percent:.1}% of the NOTIFY queue in use"),
        );
    }

    if installed {
        log_check(client, &mut report).await?;
        unpublished_check(client, &mut report).await?;
        pruning_check(client, &mut report).await?;
    } else {
        report.push(
            "event log",
            Verdict::Warn,
            "not checked: realtime objects missing",
        );
    }

    if installed {
        listeners_check(client, &mut report).await?;
    } else {
        report.push(
            "listeners",
            Verdict::Warn,
            "not checked: realtime objects missing",
        );
    }

    Ok(report)
}

/// The servers' listeners, and how far behind the log each one is: a listener whose oldest
/// unread event committed more than [`MAX_LISTENER_LAG`] ago is stalled or cannot keep up, and
/// every client of its server waits with it.
async fn listeners_check(client: &Client, report: &mut DoctorReport) -> Result<(), PgcastError> {
    let rows = match client.query(LISTENERS, &[&APPLICATION_NAME]).await {
        Ok(rows) => rows,
        Err(error) if error.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
            report.push(
                "listeners",
                Verdict::Warn,
                "not checked: the role may not read pgcast.committed_statements",
            );
            return Ok(());
        }
        Err(error) => return Err(query_error("listener connections")(error)),
    };
    struct Listening {
        pid: i32,
        position: Option<i64>,
        behind_events: Option<i64>,
        behind_seconds: Option<f64>,
    }
    let listeners: Vec<Listening> = rows
        .iter()
        .map(|row| {
            Ok(Listening {
                pid: row.try_get(0)?,
                position: row.try_get(1)?,
                behind_events: row.try_get(2)?,
                behind_seconds: row.try_get(3)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(query_error("listener connections"))?;
    if listeners.is_empty() {
        report.push(
            "listeners",
            Verdict::Warn,
            format!("no pgcast listener connected (application_name {APPLICATION_NAME})"),
        );
        return Ok(());
    }
    let connected = format!(
        "{} connected (application_name {APPLICATION_NAME}[:position])",
        listeners.len()
    );
    let lagging: Vec<String> = listeners
        .iter()
        .filter(|l| {
            l.behind_seconds
                .is_some_and(|s| s > MAX_LISTENER_LAG.as_secs_f64())
        })
        .map(|l| {
            format!(
                "pid {} at position {} is {} event(s) behind, the oldest it has not read \
                 committed {:.0} s ago",
                l.pid,
                l.position.unwrap_or_default(),
                l.behind_events.unwrap_or_default(),
                l.behind_seconds.unwrap_or_default()
            )
        })
        .collect();
    if !lagging.is_empty() {
        report.push(
            "listeners",
            Verdict::Fail,
            format!(
                "{connected}; {}: stalled or not keeping up, and its server's clients wait \
                 with it (see that server's log and /readyz)",
                lagging.join("; ")
            ),
        );
        return Ok(());
    }
    let furthest = listeners
        .iter()
        .filter_map(|l| {
            l.behind_seconds
                .map(|s| (s, l.behind_events.unwrap_or_default()))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0));
    let starting = listeners.iter().filter(|l| l.position.is_none()).count();
    let mut detail = match furthest {
        None if starting == listeners.len() => connected,
        None => format!("{connected}; caught up"),
        Some((seconds, events)) => format!(
            "{connected}; the furthest behind has {events} event(s) to read, the oldest \
             committed {seconds:.1} s ago"
        ),
    };
    if starting > 0 {
        detail.push_str(&format!("; {starting} still connecting (no position yet)"));
    }
    report.push("listeners", Verdict::Ok, detail);
    Ok(())
}

async fn schema_check(client: &Client, report: &mut DoctorReport) -> Result<(), PgcastError> {
    match installed_version(client).await? {
        None => report.push(
            "schema",
            Verdict::Fail,
            "pgcast.version() is missing; run `pgcast migrate`",
        ),
        Some(v) if v < SCHEMA_VERSION => report.push(
            "schema",
            Verdict::Fail,
            format!(
                "installed SQL version {v} is older than this binary's {SCHEMA_VERSION}; \
                 run `pgcast migrate`"
            ),
        ),
        Some(v) if v > SCHEMA_VERSION => report.push(
            "schema",
            Verdict::Warn,
            format!(
                "installed SQL version {v} is newer than this binary's {SCHEMA_VERSION}; \
                 upgrade pgcast"
            ),
        ),
        Some(v) => report.push(
            "schema",
            Verdict::Ok,
            format!("pgcast.version() = {v}, as this binary expects"),
        ),
    }
    Ok(())
}

/// One trigger pgcast installs, as `doctor_trigger.sql` found it.
struct TriggerState {
    name: String,
    on_table: Option<String>,
    table_exists: bool,
    /// `pg_trigger.tgenabled`; `None` when the trigger does not exist.
    enabled: Option<String>,
    calls_pgcast: Option<bool>,
}

impl TriggerState {
    fn from_row(row: &tokio_postgres::Row) -> Result<Self, tokio_postgres::Error> {
        Ok(TriggerState {
            name: row.try_get(0)?,
            on_table: row.try_get(1)?,
            table_exists: row.try_get(2)?,
            enabled: row.try_get(3)?,
            calls_pgcast: row.try_get(4)?,
        })
    }

    fn exists(&self) -> bool {
        self.enabled.is_some()
    }

    /// What is wrong with this trigger, if anything, for a trigger that must fire.
    fn problem(&self) -> Option<String> {
        let table = self.on_table.as_deref().unwrap_or(TABLE);
        let on = format!("{} on {table}", self.name);
        let enable = format!("ALTER TABLE {table} ENABLE TRIGGER {}", self.name);
        match (self.enabled.as_deref(), self.calls_pgcast) {
            (None, _) => Some(format!(
                "trigger {on} is missing: no change produces an event; run `pgcast migrate`"
            )),
            (Some(_), Some(false) | None) => {
                Some(format!("trigger {on} does not call pgcast's function"))
            }
            (Some("D"), _) => Some(format!(
                "trigger {on} is disabled: no change produces an event; {enable}"
            )),
            (Some("R"), _) => Some(format!(
                "trigger {on} fires only in replica mode: ordinary writes produce no event; \
                 {enable}"
            )),
            (Some(_), Some(true)) => None,
        }
    }

    /// What is wrong with [`START_TRIGGER`] or [`TRUNCATE_TRIGGER`], if anything. Every
    /// INSERT, UPDATE and DELETE is logged without them; the first orders statements that run
    /// inside triggers on [`TABLE`], the second logs a TRUNCATE of it.
    /// `capture_always`: the capture triggers fire in replica mode too, so it must as well.
    fn optional_problem(&self, capture_always: bool) -> Option<String> {
        let table = self.on_table.as_deref().unwrap_or(TABLE);
        let on = format!("{} on {table}", self.name);
        let consequence = if self.name == TRUNCATE_TRIGGER {
            "a TRUNCATE of the table is logged as nothing, and clients keep the rows it removed"
        } else {
            "a statement that a trigger on the table runs is logged before the statement it ran \
             in, so a row that both change can end in its older state"
        };
        match (self.enabled.as_deref(), self.calls_pgcast) {
            (None, _) => Some(format!(
                "trigger {on} is missing: {consequence}; run `pgcast migrate` as a member of \
                 the owner role of {table}"
            )),
            (Some(_), Some(false) | None) => Some(format!(
                "trigger {on} does not call pgcast's function: {consequence}"
            )),
            (Some("D" | "R"), _) => Some(format!(
                "trigger {on} does not fire for ordinary writes: {consequence}; \
                 ALTER TABLE {table} ENABLE TRIGGER {}",
                self.name
            )),
            (Some("O"), Some(true)) if capture_always => Some(format!(
                "the capture triggers on {table} fire always, also in replica mode (a logical \
                 replication apply), but {on} does not: in that mode {consequence}; \
                 ALTER TABLE {table} ENABLE ALWAYS TRIGGER {}",
                self.name
            )),
            (Some(_), Some(true)) => None,
        }
    }
}

/// The statement triggers on [`TABLE`] that capture changes and the deferred trigger that
/// publishes them at commit (versions 3 and 4); or version 2's row trigger where an upgrade could not
/// replace it. A disabled, replica-only, missing or foreign one of them is a failure, and so
/// is capture that fires in replica mode while the publishing trigger does not.
async fn trigger_check(client: &Client, report: &mut DoctorReport) -> Result<(), PgcastError> {
    let triggers: Vec<TriggerState> = client
        .query(TRIGGER, &[&TABLE])
        .await
        .map_err(query_error("trigger"))?
        .iter()
        .map(TriggerState::from_row)
        .collect::<Result<_, _>>()
        .map_err(query_error("trigger"))?;
    if !triggers.first().is_some_and(|t| t.table_exists) {
        report.push("trigger", Verdict::Fail, format!("table {TABLE} not found"));
        return Ok(());
    }
    let (current, legacy): (Vec<&TriggerState>, Vec<&TriggerState>) =
        triggers.iter().partition(|t| t.name != LEGACY_TRIGGER);
    // The start trigger orders statements run inside triggers, the TRUNCATE trigger logs
    // TRUNCATEs; without them every other change is still logged, so their problems are
    // warnings of their own.
    let (start, current): (Vec<&TriggerState>, Vec<&TriggerState>) = current
        .into_iter()
        .partition(|t| t.name == START_TRIGGER || t.name == TRUNCATE_TRIGGER);
    // The publishing trigger on pgcast.assignment_changes exists either way; the statement
    // triggers on the table say which capture is in place.
    let capture_installed = current
        .iter()
        .any(|t| t.name.starts_with(CAPTURE_PREFIX) && t.exists());
    let legacy_installed = legacy.iter().any(|t| t.exists());
    let publish = current.iter().copied().find(|t| t.name == PUBLISH_TRIGGER);
    let (verdict, detail) = match (capture_installed, legacy_installed) {
        (true, true) => (
            Verdict::Fail,
            format!(
                "both version 2's trigger {LEGACY_TRIGGER} and the statement triggers are on \
                 {TABLE}: every change is logged twice; DROP TRIGGER {LEGACY_TRIGGER} ON {TABLE}"
            ),
        ),
        (false, true) => {
            // Version 2's row trigger writes each row as a statement of its own, which the
            // publishing trigger publishes at commit: both must fire.
            let mut problems: Vec<String> = legacy
                .iter()
                .copied()
                .chain(publish)
                .filter_map(|t| t.problem())
                .collect();
            problems.extend(replica_mode_mismatch(&legacy, publish));
            if problems.is_empty() {
                (
                    Verdict::Warn,
                    format!(
                        "trigger {LEGACY_TRIGGER} on {TABLE} is enabled, but it is version 2's \
                         row trigger (every row logged separately at commit, slower): run \
                         `pgcast migrate` as a member of the owner role of {TABLE} to replace \
                         it with the statement triggers"
                    ),
                )
            } else {
                (Verdict::Fail, problems.join("; "))
            }
        }
        _ => {
            let mut problems: Vec<String> = current.iter().filter_map(|t| t.problem()).collect();
            // The TRUNCATE trigger captures too: firing in replica mode without the publishing
            // trigger, it would capture what is never published.
            let capturing: Vec<&TriggerState> = current.iter().chain(&start).copied().collect();
            problems.extend(replica_mode_mismatch(&capturing, publish));
            let capture_always = current
                .iter()
                .any(|t| t.name.starts_with(CAPTURE_PREFIX) && t.enabled.as_deref() == Some("A"));
            let start_problems: Vec<String> = start
                .iter()
                .filter_map(|t| t.optional_problem(capture_always))
                .collect();
            if !problems.is_empty() {
                (Verdict::Fail, problems.join("; "))
            } else if !start_problems.is_empty() {
                (Verdict::Warn, start_problems.join("; "))
            } else {
                (
                    Verdict::Ok,
                    format!(
                        "triggers {} are enabled",
                        current
                            .iter()
                            .chain(&start)
                            .map(|t| t.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            }
        }
    };
    report.push("trigger", verdict, detail);
    Ok(())
}

/// Capture triggers enabled ALWAYS also fire in replica mode (`session_replication_role =
/// replica`, as a logical replication apply runs); the publishing trigger, enabled the ordinary
/// way, does not. Changes written in that mode would be captured and never published: no
/// event, and captured rows that pruning never reaches.
/// `capture` holds the triggers on [`TABLE`] that capture changes (the statement triggers, or
/// version 2's row trigger); `publish` is the publishing trigger.
fn replica_mode_mismatch(
    capture: &[&TriggerState],
    publish: Option<&TriggerState>,
) -> Option<String> {
    let publish = publish?;
    if publish.enabled.as_deref() == Some("A") {
        return None;
    }
    let always: Vec<&str> = capture
        .iter()
        .filter(|t| {
            (t.name.starts_with(CAPTURE_PREFIX) || t.name == LEGACY_TRIGGER)
                && t.enabled.as_deref() == Some("A")
        })
        .map(|t| t.name.as_str())
        .collect();
    (!always.is_empty()).then(|| {
        format!(
            "trigger(s) {} on {TABLE} fire always, also in replica mode (a logical replication \
             apply), but {PUBLISH_TRIGGER} on {PUBLISH_TABLE} does not: changes written in \
             that mode are captured and never published; ALTER TABLE {PUBLISH_TABLE} ENABLE \
             ALWAYS TRIGGER {PUBLISH_TRIGGER}",
            always.join(", ")
        )
    })
}

/// Privileges that would let another role write the log, run pgcast's functions, take or block
/// its locks or create objects in its schema: each one undoes a guarantee (docs/architecture.md §8).
async fn grants_check(client: &Client, report: &mut DoctorReport) -> Result<(), PgcastError> {
    let grants: Vec<String> = client
        .query(GRANTS, &[])
        .await
        .map_err(query_error("grants"))?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(query_error("grants"))?;
    if grants.is_empty() {
        report.push(
            "grants",
            Verdict::Ok,
            "only pgcast's owner may write the log or run its functions",
        );
        return Ok(());
    }
    let mut shown = grants
        .iter()
        .take(MAX_GRANTS_SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join("; ");
    if grants.len() > MAX_GRANTS_SHOWN {
        shown.push_str(&format!("; and {} more", grants.len() - MAX_GRANTS_SHOWN));
    }
    report.push(
        "grants",
        Verdict::Fail,
        format!(
            "dangerous privileges: {shown}; REVOKE them (only pgcast's owner may write, lock or \
             reference pgcast's tables, draw positions or run its functions)"
        ),
    );
    Ok(())
}

/// The commit-order lock held by a session that is not committing: every write to
/// `session_assignments` waits behind it.
async fn commit_lock_check(client: &Client, report: &mut DoctorReport) -> Result<(), PgcastError> {
    let rows = client
        .query(COMMIT_LOCK, &[])
        .await
        .map_err(query_error("commit lock"))?;
    // Sorted longest first; only one session can hold the lock at a time anyway.
    let Some(row) = rows.first() else {
        report.push("commit lock", Verdict::Ok, "not held");
        return Ok(());
    };
    let pid: Option<i32> = row.try_get(0).map_err(query_error("commit lock"))?;
    let application: String = row.try_get(1).map_err(query_error("commit lock"))?;
    let state: String = row.try_get(2).map_err(query_error("commit lock"))?;
    let held: Option<f64> = row.try_get(3).map_err(query_error("commit lock"))?;
    let waiting: i64 = row.try_get(4).map_err(query_error("commit lock"))?;
    let prepared: Option<String> = row.try_get(5).map_err(query_error("commit lock"))?;
    let prepared_for: Option<f64> = row.try_get(6).map_err(query_error("commit lock"))?;
    let Some(pid) = pid else {
        // No session holds it: a prepared transaction, until it is committed or rolled back.
        let gid = prepared.unwrap_or_else(|| "?".to_owned());
        report.push(
            "commit lock",
            Verdict::Fail,
            format!(
                "held by prepared transaction '{gid}' (prepared {} ago), {waiting} writer(s) \
                 waiting: every commit that writes {TABLE} waits until it ends; COMMIT \
                 PREPARED '{gid}' or ROLLBACK PREPARED '{gid}'",
                age(prepared_for)
            ),
        );
        return Ok(());
    };
    let since = match held {
        Some(_) => format!(" for at least {}", age(held)),
        None => String::new(),
    };
    let detail =
        format!("held by pid {pid} ({application:?}, {state}){since}, {waiting} writer(s) waiting");
    if held.is_some_and(|h| h > MAX_COMMIT_LOCK.as_secs_f64()) {
        report.push(
            "commit lock",
            Verdict::Fail,
            format!(
                "{detail}: every commit that writes {TABLE} waits for it (a transaction that \
                 ran SET CONSTRAINTS ALL IMMEDIATE holds it until it ends); end that \
                 transaction or SELECT pg_terminate_backend({pid})"
            ),
        );
    } else {
        report.push("commit lock", Verdict::Ok, detail);
    }
    Ok(())
}

/// Retention is enforced: `pgcast serve` prunes every minute, and `prune_events` records each
/// run and the retention it was given.
async fn pruning_check(client: &Client, report: &mut DoctorReport) -> Result<(), PgcastError> {
    let row = client
        .query_one(PRUNING, &[])
        .await
        .map_err(query_error("pruning"))?;
    let since_run: Option<f64> = row.try_get(0).map_err(query_error("pruning"))?;
    let retention: Option<f64> = row.try_get(1).map_err(query_error("pruning"))?;
    let oldest: Option<f64> = row.try_get(2).map_err(query_error("pruning"))?;
    let log = match oldest {
        Some(o) => format!("oldest event {} old", age(Some(o))),
        None => "log empty".to_owned(),
    };
    let (Some(since_run), Some(retention)) = (since_run, retention) else {
        report.push(
            "pruning",
            Verdict::Warn,
            format!("has not run yet (`pgcast serve` prunes every minute); {log}"),
        );
        return Ok(());
    };
    let overdue = oldest.is_some_and(|o| o > retention);
    let ran = format!(
        "last ran {} ago with retention {}",
        age(Some(since_run)),
        age(Some(retention))
    );
    let (verdict, detail) = match (since_run > MAX_PRUNE_GAP.as_secs_f64(), overdue) {
        (true, true) => (
            Verdict::Fail,
            format!(
                "{ran}; {log}: retention is not enforced and the log grows without bound; is a \
                 `pgcast serve` running and able to prune (its log says why not), or does a \
                 session hold the pgcast.log_state row lock?"
            ),
        ),
        (true, false) => (
            Verdict::Warn,
            format!("{ran} (`pgcast serve` prunes every minute); {log}, nothing overdue yet"),
        ),
        (false, _) => (Verdict::Ok, format!("{ran}; {log}")),
    };
    report.push("pruning", verdict, detail);
    Ok(())
}

async fn log_check(client: &Client, report: &mut DoctorReport) -> Result<(), PgcastError> {
    let row = client
        .query_one(LOG, &[])
        .await
        .map_err(query_error("event log"))?;
    let get = |i| -> Result<Option<f64>, PgcastError> {
        row.try_get::<_, Option<f64>>(i)
            .map_err(query_error("event log"))
    };
    let rows: i64 = row.try_get(0).map_err(query_error("event log"))?;
    let size: String = row.try_get(1).map_err(query_error("event log"))?;
    let oldest: Option<i64> = row.try_get(2).map_err(query_error("event log"))?;
    let oldest_age = get(3)?;
    let newest: Option<i64> = row.try_get(4).map_err(query_error("event log"))?;
    let newest_age = get(5)?;
    let pruned_through: i64 = row.try_get(6).map_err(query_error("event log"))?;
    let plural = if rows == 1 { "" } else { "s" };
    let mut detail = format!("{rows} row{plural}, {size}");
    match (oldest, newest) {
        (Some(o), Some(n)) => detail.push_str(&format!(
            "; oldest position {o} ({} ago), newest {n} ({} ago)",
            age(oldest_age),
            age(newest_age)
        )),
        _ => detail.push_str("; empty"),
    }
    if pruned_through > 0 {
        detail.push_str(&format!("; pruned through {pruned_through}"));
    }
    report.push("event log", Verdict::Ok, detail);
    Ok(())
}

/// Changes captured and never published: their statements committed while the publishing
/// trigger did not fire, so no client received them and pruning never removes them.
async fn unpublished_check(client: &Client, report: &mut DoctorReport) -> Result<(), PgcastError> {
    let row = match client.query_one(UNPUBLISHED, &[]).await {
        Ok(row) => row,
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
            report.push(
                "unpublished",
                Verdict::Warn,
                format!(
                    "not counted: this role may not count the rows of {PUBLISH_TABLE} (GRANT \
                     SELECT (statement) ON {PUBLISH_TABLE}: counts, no event content)"
                ),
            );
            return Ok(());
        }
        Err(e) => return Err(query_error("unpublished")(e)),
    };
    let unpublished: i64 = row.try_get(0).map_err(query_error("unpublished"))?;
    if unpublished == 0 {
        report.push(
            "unpublished",
            Verdict::Ok,
            "every captured change is in the log",
        );
        return Ok(());
    }
    let plural = if unpublished == 1 { "" } else { "s" };
    report.push(
        "unpublished",
        Verdict::Fail,
        format!(
            "{unpublished} captured change{plural} in {PUBLISH_TABLE} never published: their \
             statements committed while {PUBLISH_TRIGGER} did not fire (disabled, or capture \
             in replica mode without it), so no client received them and pruning never removes \
             them (a client's next snapshot shows the rows as they are); once the trigger check \
             no longer fails, remove them: DELETE FROM {PUBLISH_TABLE} ch WHERE NOT EXISTS \
             (SELECT 1 FROM pgcast.committed_statements c WHERE c.statement = ch.statement)"
        ),
    );
    Ok(())
}

/// Seconds as a short human duration, whole seconds (`3m 12s`).
fn age(seconds: Option<f64>) -> String {
    match seconds {
        Some(s) if s.is_finite() => {
            humantime::format_duration(Duration::from_secs(s.max(0.0).round() as u64)).to_string()
        }
        _ => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_the_problems() {
        let mut r = DoctorReport { checks: Vec::new() };
        r.push("schema", Verdict::Ok, "fine");
        r.push("listeners", Verdict::Warn, "none");
        assert!(r.is_healthy());
        assert!(r.to_string().ends_with("\nhealthy"));
        r.push("trigger", Verdict::Fail, "disabled");
        assert!(!r.is_healthy());
        assert!(r.to_string().ends_with("UNHEALTHY: trigger"), "{r}");
        assert_eq!(r.check("trigger").map(|c| c.verdict), Some(Verdict::Fail));
    }

    #[test]
    fn ages_are_short() {
        assert_eq!(age(Some(192.4)), "3m 12s");
        assert_eq!(age(Some(-0.2)), "0s");
        assert_eq!(age(None), "unknown");
    }
}
