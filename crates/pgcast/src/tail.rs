//! `pgcast tail`: the event stream as JSON lines, for operators and scripts.
//!
//! ```text
//! EventLog::head()  fail fast if the database or the log is not there; warn if `since` was pruned
//!        │
//! Listener::run(Start::After(since) | Start::Head)   log pages after `since`, then LISTEN
//!        │ ordered, de-duplicated AssignmentEvents
//!        ▼
//! Topic::matches(operator, event) ──▶ EventFrame::encode ──▶ one line, flushed
//! ```
//!
//! The listener does the catch-up from the log and the hand-over to live notifications, so the
//! output is exactly what a gateway client subscribed with `since` would receive.

use std::time::Duration;

use pgcast_events::{Access, EventFrame, Position, Principal, Role, Topic};
use pgcast_listener::{EventLog, Output, Start};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::QUEUE_NEEDS_MECHANIC;
use crate::{Database, PgcastError};

/// Events buffered between the listener and the output. When the reader of the output is slow
/// the listener stops reading the log (it resumes from its position); it keeps reading its
/// doorbells, so a paused pager never fills PostgreSQL's notification queue. Nothing is dropped.
/// `application_name` of `tail`'s LISTEN connection.
const TAIL_NAME: &str = "pgcast-tail";
const BUFFER: usize = 1024;
/// Connections of the log pool: catch-up reads one page at a time.
const POOL_SIZE: usize = 2;
/// How long the listener may take to stop once asked.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// `tail` has full access, like a service: visibility is evaluated for this principal.
const OPERATOR: Principal = Principal {
    user_id: Uuid::nil(),
    role: Role::Service,
    workshop_id: None,
};

/// What to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TailOptions {
    /// Print the retained events after this position first; `None` = from the next commit on.
    pub since: Option<Position>,
    /// Only events visible on this topic; `None` = `assignments` (everything).
    pub topic: Option<Topic>,
}

/// Writes one line per event to `out` until `shutdown` is cancelled or the reader of `out`
/// goes away (a broken pipe, e.g. `| head`); both end it with `Ok`.
///
/// Reads the log through `db`'s URL and LISTENs through its listen URL. Fails before printing
/// anything when the topic is `queue`, the database is unreachable or the realtime objects are
/// not installed. Where events were removed by retention before they were read (a `since`
/// older than the retained log, or a listener cut off for longer than the retention), a
/// warning goes to stderr and the stream goes on with the oldest retained event.
pub async fn tail<W>(
    db: &Database,
    options: TailOptions,
    out: &mut W,
    shutdown: CancellationToken,
) -> Result<(), PgcastError>
where
    W: AsyncWrite + Unpin,
{
    let topic = options.topic.unwrap_or(Topic::Assignments);
    if topic.authorize(&OPERATOR) != Access::Allowed {
        return Err(PgcastError::Usage(QUEUE_NEEDS_MECHANIC));
    }
    let log = EventLog::new(crate::db::pool(db.url(), POOL_SIZE)?);
    // Fails here, before anything is printed, when the log cannot be read.
    log.head().await.map_err(PgcastError::LogUnavailable)?;
    let start = match options.since {
        Some(since) => Start::After(since),
        None => Start::Head,
    };

    let (tx, mut rx) = mpsc::channel(BUFFER);
    let stop = shutdown.child_token();
    // A name of its own: `pgcast doctor` counts and measures the servers' listeners only.
    let listener = crate::db::listener(db.listen_url(), log)?.with_application_name(TAIL_NAME);
    let listener = tokio::spawn(listener.run(start, tx, stop.clone()));

    let result = loop {
        let event = tokio::select! {
            biased;
            () = shutdown.cancelled() => break Ok(()),
            output = rx.recv() => match output {
                Some(Output::Event(event)) => event,
                Some(Output::Gap { after, pruned_through }) if pruned_through < after => {
                    // A `since` ahead of the log, or a database restored or failed over to one
                    // that lost commits.
                    eprintln!(
                        "warning: the event log ends at position {pruned_through}, before \
                         {after}: following it from there"
                    );
                    continue;
                }
                Some(Output::Gap { after, pruned_through }) => {
                    // A `since` older than the retained log, or a listener cut off for longer
                    // than the retention.
                    eprintln!(
                        "warning: events after position {after} up to {pruned_through} were \
                         removed by retention and are not shown"
                    );
                    continue;
                }
                // Logged (stderr) and counted by the listener; never printed in part.
                Some(Output::Undecodable { .. }) => continue,
                None => break Ok(()), // the listener stopped: only on shutdown
            },
        };
        if !topic.matches(&OPERATOR, &event) {
            continue;
        }
        let mut line = EventFrame::encode(&topic, &event);
        line.push('\n');
        // A reader that stops reading (a paused pager, a stuck pipe) must not keep a signal
        // from stopping `tail`.
        let written = tokio::select! {
            biased;
            () = shutdown.cancelled() => break Ok(()),
            written = write_line(out, &line) => written,
        };
        match written {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break Ok(()),
            Err(e) => break Err(PgcastError::Output(e)),
        }
    };

    stop.cancel();
    drop(rx);
    if tokio::time::timeout(STOP_TIMEOUT, listener).await.is_err() {
        tracing::warn!("listener did not stop in time");
    }
    result
}

/// Each line is flushed on its own, so a reader sees an event as soon as it is committed.
async fn write_line<W: AsyncWrite + Unpin>(out: &mut W, line: &str) -> std::io::Result<()> {
    out.write_all(line.as_bytes()).await?;
    out.flush().await
}
