//! The LISTEN side: [`Listener`] turns doorbells on one dedicated connection into an ordered,
//! de-duplicated stream of events read from the log, reconnecting and catching up after any
//! failure; [`ListenerStatus`] is its live state for `/readyz` and `/metrics`.
//!
//! ```text
//!   run ─loop─▶ session: connect ─▶ driver (poll_message: doorbells → Notify, never waits)
//!                                 └▶ consume: LISTEN, head, forward ─▶ wait bell | 0.5 s probe ─▶ forward
//!        Cursor { last, reached_live } survives reconnects; failures back off (Backoff)
//! ```

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgcast_events::{AssignmentEvent, Position};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Client, NoTls, Socket};
use tokio_util::sync::CancellationToken;

use crate::{Backoff, EventLog, ListenerError, Undecodable};

/// The NOTIFY channel rung by `pgcast.emit_assignment_event()`. Its payload is empty: it is a
/// doorbell, never a source of events (any role that can connect may NOTIFY it).
pub const CHANNEL: &str = "pgcast_assignments";
const LISTEN: &str = "LISTEN pgcast_assignments";
/// `application_name` of the LISTEN connection in `pg_stat_activity`. Once the listener has a
/// position, every probe sets it to `pgcast-listener:<position>` (the last position read):
/// `pgcast doctor` reads how far behind each listener is from there.
pub const APPLICATION_NAME: &str = "pgcast-listener";

/// Rows per catch-up query.
const PAGE: i64 = 1000;
/// With no doorbell for this long, the log is read anyway (a doorbell lost).
const IDLE_READ: Duration = Duration::from_secs(15);
/// How long the probe (and a connection attempt without its own timeout) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the LISTEN connection is probed: a query that shows it alive (a dead peer can be
/// silent) and says whether commits ring doorbells; while they ring none (PostgreSQL's
/// notification queue at `pgcast.doorbell_queue_limit()`), the log is read this often.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// The probe: alive, and are commits ringing doorbells?
const PROBE: &str = include_str!("../../../sql/listener_probe.sql");

/// What the listener hands on, in log order.
#[derive(Debug, Clone)]
pub enum Output {
    /// The log's next event.
    Event(Arc<AssignmentEvent>),
    /// The stream cannot go on from where it was: whoever followed it must start again. Either
    /// the log was pruned past the listener's position before it read on (a listener cut off
    /// from the database for longer than the retention): the events after `after` up to
    /// `pruned_through` are gone. Or, with `pruned_through` below `after`, the log's head is
    /// behind the listener's position (the database was restored, or failed over to one that
    /// lost commits): positions after `pruned_through` are drawn again and may name other
    /// events than the ones already seen. Either way every event that follows is after
    /// `pruned_through`.
    Gap {
        /// The last position the stream had reached.
        after: Position,
        /// Where the stream goes on from: the retention boundary (nothing at or below it can
        /// be read any more), or the head of a log that is behind `after`.
        pruned_through: Position,
    },
    /// A log row that could not be decoded ([`crate::Undecodable`]), in its place in the
    /// stream: counted and logged, never sent in part. Whoever judges a right by the rows as
    /// they stood (a mechanic's membership of a session) can no longer judge it for
    /// `session_id` (any session when `None`) from this position on.
    Undecodable {
        /// The row's position.
        position: Position,
        /// Its commit time, if it could be read.
        committed_at: Option<chrono::DateTime<chrono::Utc>>,
        /// The session the row names, if that much could be read.
        session_id: Option<uuid::Uuid>,
    },
}

/// Where the output stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With the first event committed after the listener starts (the gateway's choice: clients
    /// catch up from the log themselves).
    Head,
    /// With the first event after this position (a tool resuming where it stopped).
    After(Position),
}

/// Live state of a listener, shared with health checks and metrics.
#[derive(Debug)]
pub struct ListenerStatus {
    /// Follows `is_ready()`, so callers can wait for a change instead of polling.
    ready: tokio::sync::watch::Sender<bool>,
    connected: AtomicBool,
    caught_up: AtomicBool,
    last_position: AtomicI64,
    last_committed_micros: AtomicI64,
    reconnects: AtomicU64,
    notifications: AtomicU64,
    gaps: AtomicU64,
    ignored_payloads: AtomicU64,
    events: AtomicU64,
    decode_errors: AtomicU64,
}

/// A copy of [`ListenerStatus`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusSnapshot {
    /// The LISTEN connection is up.
    pub connected: bool,
    /// Connected and everything committed before the connection was made has been emitted.
    pub caught_up: bool,
    /// Position of the last emitted event (0 before the first).
    pub last_position: Position,
    /// Commit time of the last emitted event, microseconds since the Unix epoch (0 before).
    pub last_committed_micros: i64,
    /// Connections lost and re-established (or attempted) since start.
    pub reconnects: u64,
    /// Doorbells (notifications) received on the channel.
    pub notifications: u64,
    /// Notifications whose payload was not the empty doorbell pgcast's trigger sends: forged,
    /// garbled or from an older schema. Their content is ignored; they only make the listener
    /// read the log.
    pub ignored_payloads: u64,
    /// Events emitted.
    pub events: u64,
    /// Log rows that could not be decoded and were skipped.
    pub decode_errors: u64,
    /// Times the stream had to start again ([`Output::Gap`]): the log was pruned past the
    /// listener's position, or its head was behind it.
    pub gaps: u64,
}

impl ListenerStatus {
    /// The current values.
    pub fn snapshot(&self) -> StatusSnapshot {
        StatusSnapshot {
            connected: self.connected.load(Ordering::Relaxed),
            caught_up: self.caught_up.load(Ordering::Relaxed),
            last_position: self.last_position.load(Ordering::Relaxed),
            last_committed_micros: self.last_committed_micros.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            notifications: self.notifications.load(Ordering::Relaxed),
            ignored_payloads: self.ignored_payloads.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
            decode_errors: self.decode_errors.load(Ordering::Relaxed),
            gaps: self.gaps.load(Ordering::Relaxed),
        }
    }

    /// Connected and caught up: what `/readyz` reports.
    pub fn is_ready(&self) -> bool {
        self.connected.load(Ordering::Relaxed) && self.caught_up.load(Ordering::Relaxed)
    }

    /// Waits until the listener is connected and caught up (returns at once if it is).
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we borrow it.
        let _ = rx.wait_for(|ready| *ready).await;
    }

    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        self.caught_up.store(up, Ordering::Relaxed);
        self.ready.send_replace(up);
    }
}

impl Default for ListenerStatus {
    fn default() -> Self {
        ListenerStatus {
            ready: tokio::sync::watch::channel(false).0,
            connected: AtomicBool::default(),
            caught_up: AtomicBool::default(),
            last_position: AtomicI64::default(),
            last_committed_micros: AtomicI64::default(),
            reconnects: AtomicU64::default(),
            notifications: AtomicU64::default(),
            gaps: AtomicU64::default(),
            ignored_payloads: AtomicU64::default(),
            events: AtomicU64::default(),
            decode_errors: AtomicU64::default(),
        }
    }
}

/// Why a session with the database ended without an error.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Shutdown,
    ConsumerGone,
}

/// Where the listener's output stands, carried across reconnects.
#[derive(Debug)]
struct Cursor {
    /// Position of the last event emitted (or the start position); `None` until the first
    /// connection reads the log head (with [`Start::Head`]).
    last: Option<Position>,
    /// This connection caught up with the log at least once (a later failure then resets the
    /// backoff instead of growing it).
    reached_live: bool,
}

/// The LISTEN side: one dedicated connection whose notifications are doorbells, turned into an
/// ordered, de-duplicated stream of events read from the log. It survives connection loss by
/// reconnecting and reading the log after its last position.
///
/// `T` makes the TLS connections (tokio-postgres's [`MakeTlsConnect`]); plain TCP by default,
/// see [`Listener::with_tls`].
pub struct Listener<T = NoTls> {
    pg: tokio_postgres::Config,
    tls: T,
    log: EventLog,
    status: Arc<ListenerStatus>,
    backoff: Backoff,
    /// The LISTEN connection's `application_name` ([`APPLICATION_NAME`] unless told otherwise),
    /// to which each probe appends the position.
    application_name: String,
}

impl Listener {
    /// A listener connecting with `pg` for LISTEN and reading the log through `log`'s pool.
    pub fn new(mut pg: tokio_postgres::Config, log: EventLog) -> Self {
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(PROBE_TIMEOUT);
        }
        // Lets operators (and fault tests) find the LISTEN backend in pg_stat_activity.
        pg.application_name(APPLICATION_NAME);
        Listener {
            pg,
            tls: NoTls,
            log,
            status: Arc::default(),
            backoff: Backoff::default(),
            application_name: APPLICATION_NAME.to_owned(),
        }
    }
}

impl<T> Listener<T>
where
    T: MakeTlsConnect<Socket> + Clone,
{
    /// Makes every connection through `tls`, which applies the configuration's `ssl_mode`
    /// (tokio-postgres decides whether to ask the server for TLS; the connector decides what
    /// to verify).
    pub fn with_tls<U>(self, tls: U) -> Listener<U> {
        Listener {
            pg: self.pg,
            tls,
            log: self.log,
            status: self.status,
            backoff: self.backoff,
            application_name: self.application_name,
        }
    }

    /// Replaces the reconnect backoff (tests use short delays).
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The LISTEN connection's `application_name` at position `last`: `<name>:<position>`,
    /// or the name alone before the first read of the log.
    fn position_name(&self, last: Option<Position>) -> String {
        match last {
            Some(position) => format!("{}:{position}", self.application_name),
            None => self.application_name.clone(),
        }
    }

    /// Names the LISTEN connection `name` instead of [`APPLICATION_NAME`] (`pgcast tail` does,
    /// so that `pgcast doctor` counts and measures only the servers' listeners).
    pub fn with_application_name(mut self, name: &str) -> Self {
        self.pg.application_name(name);
        self.application_name = name.to_owned();
        self
    }

    /// Shared live state, for health checks and metrics.
    pub fn status(&self) -> Arc<ListenerStatus> {
        self.status.clone()
    }

    /// Emits every committed event after `start` into `out`, in position order and without
    /// duplicates, until `shutdown` is cancelled or `out`'s receiver is dropped. Connection
    /// failures are logged and retried with jittered backoff; they never end the stream.
    ///
    /// `out` is bounded: when the consumer lags, the listener waits before reading more of the
    /// log; it never drops an event. Doorbells keep being read meanwhile, so a slow consumer
    /// never leaves notifications in PostgreSQL's queue (a full queue fails every notifying
    /// commit in the cluster).
    pub async fn run(
        mut self,
        start: Start,
        out: mpsc::Sender<Output>,
        shutdown: CancellationToken,
    ) {
        let mut cursor = Cursor {
            last: match start {
                Start::Head => None,
                Start::After(p) => Some(p),
            },
            reached_live: false,
        };
        loop {
            cursor.reached_live = false;
            let result = self.session(&mut cursor, &out, &shutdown).await;
            self.status.set_connected(false);
            match result {
                Ok(End::Shutdown) => return,
                Ok(End::ConsumerGone) => {
                    tracing::info!("event consumer gone; listener stops");
                    return;
                }
                Err(error) => {
                    if cursor.reached_live {
                        self.backoff.reset();
                    }
                    let delay = self.backoff.next_delay();
                    tracing::warn!(%error, ?delay, "listener connection lost; reconnecting");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => return,
                    }
                    self.status.reconnects.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    async fn session(
        &self,
        cursor: &mut Cursor,
        out: &mpsc::Sender<Output>,
        shutdown: &CancellationToken,
    ) -> Result<End, ListenerError> {
        // Named with the position it resumes from: while it catches up (a backlog after an
        // outage), `pgcast doctor` sees how far behind it is, not a listener still connecting.
        let mut pg = self.pg.clone();
        pg.application_name(self.position_name(cursor.last));
        let (client, mut connection) = tokio::select! {
            r = pg.connect(self.tls.clone()) => r?,
            () = shutdown.cancelled() => return Ok(End::Shutdown),
        };
        // Doorbells collapse into one stored permit: however many rang while the log was being
        // read, the next read covers them all.
        let bell = Notify::new();
        let status = &self.status;
        // Drives the connection (queries and notifications alike) in this task, and never
        // waits on the consumer. It stops with the error that closed the connection.
        let driver = async {
            loop {
                match poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) if n.channel() == CHANNEL => {
                        status.notifications.fetch_add(1, Ordering::Relaxed);
                        if !n.payload().is_empty() {
                            ignored_payload(status, n.payload());
                        }
                        bell.notify_one();
                    }
                    Some(Ok(_other)) => {}
                    Some(Err(e)) => return ListenerError::Db(e),
                    None => return ListenerError::ConnectionClosed,
                }
            }
        };
        tokio::select! {
            error = driver => Err(error),
            result = self.consume(&client, &bell, cursor, out) => result,
            () = shutdown.cancelled() => Ok(End::Shutdown),
        }
    }

    async fn consume(
        &self,
        client: &Client,
        bell: &Notify,
        cursor: &mut Cursor,
        out: &mpsc::Sender<Output>,
    ) -> Result<End, ListenerError> {
        // LISTEN before reading the log: whatever commits from now on is either in the read
        // below or rings the bell afterwards (or both; the cursor skips what was emitted).
        client.batch_execute(LISTEN).await?;
        let head = self.log.head().await?;
        match cursor.last {
            None => cursor.last = Some(head.head),
            Some(last) if head.head < last => {
                // Read on from `last` and the positions drawn again up to it would be skipped.
                tracing::error!(
                    last,
                    head = head.head,
                    "the event log is behind the listener's position (the database was restored \
                     or failed over to one that lost commits): following it from its head"
                );
                self.status.gaps.fetch_add(1, Ordering::Relaxed);
                let gap = Output::Gap {
                    after: last,
                    pruned_through: head.head,
                };
                if out.send(gap).await.is_err() {
                    return Ok(End::ConsumerGone);
                }
                cursor.last = Some(head.head);
            }
            Some(_) => {}
        }
        // A position the log was pruned past shows in the first read below, which says so.
        if let Some(end) = self.forward(cursor, out).await? {
            return Ok(end);
        }
        self.status.set_connected(true);
        cursor.reached_live = true;
        tracing::info!(position = ?cursor.last, "listener connected and caught up");

        // Whether commits ring doorbells at all: probed now and on a timer of its own, so that
        // neither a queue filling while doorbells come nor doorbells forged by another role put
        // the probe off.
        let name = |cursor: &Cursor| self.position_name(cursor.last);
        let mut doorbells_off = doorbells(probe(client, &name(cursor)).await?, false);
        let mut probe_timer = tokio::time::interval_at(Instant::now() + PROBE_EVERY, PROBE_EVERY);
        probe_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_read = Instant::now();
        loop {
            tokio::select! {
                () = bell.notified() => {}
                _ = probe_timer.tick() => {
                    // Also shows the connection is alive (a dead peer can be silent).
                    doorbells_off = doorbells(probe(client, &name(cursor)).await?, doorbells_off);
                    // Without doorbells, and after a silence (a doorbell lost), read anyway.
                    if !doorbells_off && last_read.elapsed() < IDLE_READ {
                        continue;
                    }
                }
            }
            last_read = Instant::now();
            if let Some(end) = self.forward(cursor, out).await? {
                return Ok(end);
            }
        }
    }

    /// Emits every log row after the cursor, page by page, advancing it. Positions are
    /// commit-ordered, so once a position is visible nothing below it can still commit: a hole
    /// (a transaction that drew a position and failed) is final and simply skipped.
    async fn forward(
        &self,
        cursor: &mut Cursor,
        out: &mpsc::Sender<Output>,
    ) -> Result<Option<End>, ListenerError> {
        loop {
            let after = cursor.last.unwrap_or(0);
            let page = self.log.read_range(after, Position::MAX, PAGE).await?;
            if page.pruned_past(after) {
                tracing::error!(
                    after,
                    pruned_through = page.pruned_through,
                    "event log was pruned past the listener's position; events in between are gone"
                );
                self.status.gaps.fetch_add(1, Ordering::Relaxed);
                let gap = Output::Gap {
                    after,
                    pruned_through: page.pruned_through,
                };
                if out.send(gap).await.is_err() {
                    return Ok(Some(End::ConsumerGone));
                }
                // Said once: what is at or below the boundary cannot be read any more.
                cursor.last = Some(page.pruned_through);
            }
            // Both lists are in position order; each row goes out in its place.
            let mut undecodable = page.undecodable.into_iter().peekable();
            for event in page.events {
                let position = event.position;
                while let Some(row) = undecodable.next_if(|row| row.position < position) {
                    let skipped = row.position;
                    if let Some(end) = self.skip(row, out).await {
                        return Ok(Some(end));
                    }
                    cursor.last = Some(skipped);
                }
                if let Some(end) = self.emit(event, out).await {
                    return Ok(Some(end));
                }
                cursor.last = Some(position);
            }
            for row in undecodable {
                let skipped = row.position;
                if let Some(end) = self.skip(row, out).await {
                    return Ok(Some(end));
                }
                cursor.last = Some(skipped);
            }
            if let Some(p) = page.last {
                cursor.last = Some(p);
            }
            if page.rows < PAGE as usize {
                return Ok(None);
            }
        }
    }

    /// Counts and logs a row that did not decode and tells the consumer where it was.
    async fn skip(&self, row: Undecodable, out: &mpsc::Sender<Output>) -> Option<End> {
        self.status.decode_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            position = row.position,
            session_id = ?row.session_id,
            error = %row.error,
            "skipping undecodable log row"
        );
        let skipped = Output::Undecodable {
            position: row.position,
            committed_at: row.committed_at,
            session_id: row.session_id,
        };
        out.send(skipped)
            .await
            .is_err()
            .then_some(End::ConsumerGone)
    }

    async fn emit(&self, event: AssignmentEvent, out: &mpsc::Sender<Output>) -> Option<End> {
        let position = event.position;
        let committed = event.committed_at.timestamp_micros();
        if out.send(Output::Event(Arc::new(event))).await.is_err() {
            return Some(End::ConsumerGone);
        }
        self.status.events.fetch_add(1, Ordering::Relaxed);
        self.status.last_position.store(position, Ordering::Relaxed);
        self.status
            .last_committed_micros
            .store(committed, Ordering::Relaxed);
        None
    }
}

/// Counts a notification that carried content. pgcast's trigger rings with an empty payload;
/// anything else came from another role (or an older trigger) and is never read as an event.
/// Logged once per process, clipped, so a flood cannot flood the logs too.
fn ignored_payload(status: &ListenerStatus, payload: &str) {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    status.ignored_payloads.fetch_add(1, Ordering::Relaxed);
    if !LOGGED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            payload = %clip(payload),
            "a notification on {CHANNEL} carried a payload; pgcast's doorbell is empty, so it \
             was ignored (counted in pgcast_listener_ignored_payloads; logged once)"
        );
    }
}

/// At most 200 bytes of an untrusted payload for a log line.
fn clip(text: &str) -> &str {
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Runs the probe on the LISTEN connection: an error if it does not answer in time, else
/// whether commits ring no doorbell (`sql/listener_probe.sql`).
/// A schema older than version 5 has no `pgcast.doorbell_queue_limit()`, and its commits always
/// ring (a tool such as `tail` may follow one): doorbells on.
async fn probe(client: &Client, application_name: &str) -> Result<bool, ListenerError> {
    match tokio::time::timeout(PROBE_TIMEOUT, client.query_one(PROBE, &[&application_name])).await {
        Ok(Ok(row)) => Ok(row.try_get(0)?),
        Ok(Err(e)) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_FUNCTION) => {
            Ok(false)
        }
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(ListenerError::ConnectionClosed),
    }
}

/// Logs a change of whether commits ring doorbells (`off`, before: `was_off`); returns `off`.
fn doorbells(off: bool, was_off: bool) -> bool {
    if off && !was_off {
        tracing::warn!(
            every_ms = PROBE_EVERY.as_millis() as u64,
            "PostgreSQL's notification queue has reached pgcast.doorbell_queue_limit(): commits \
             ring no doorbell (a session holding its place in the queue lets it fill), so the \
             log is read on a timer"
        );
    } else if was_off && !off {
        tracing::info!("the notification queue has room again: commits ring doorbells");
    }
    off
}
