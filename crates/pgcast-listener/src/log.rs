//! Reading the event log (the view `pgcast.assignment_events`; the queries read the two tables
//! it joins, `pgcast.committed_statements` by primary key, then `pgcast.assignment_changes`):
//! its head and retention boundary ([`LogHead::read`], the one query of it,
//! `sql/log_head.sql`), pages of a range (`sql/log_read_range.sql`) and where a warm-up starts
//! (`sql/log_window_start.sql`).

use std::error::Error as _;

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Pool};
use futures::TryStreamExt;
use pgcast_events::{decode_event, session_of_undecodable, AssignmentEvent, DecodeError, Position};
use tokio_postgres::types::{ToSql, WrongType};

use crate::ListenerError;

const READ_RANGE: &str = include_str!("../../../sql/log_read_range.sql");
const HEAD: &str = include_str!("../../../sql/log_head.sql");
const WINDOW_START: &str = include_str!("../../../sql/log_window_start.sql");

/// Reads the event log through the query pool. Cheap to clone.
#[derive(Clone)]
pub struct EventLog {
    pool: Pool,
}

/// One page of the log.
#[derive(Debug, Default)]
pub struct LogPage {
    /// Decoded events in position order.
    pub events: Vec<AssignmentEvent>,
    /// Rows whose event did not decode (counted and logged by the caller, then skipped), in
    /// position order.
    pub undecodable: Vec<Undecodable>,
    /// Highest position in the page, decodable or not: the next page starts after it.
    pub last: Option<Position>,
    /// Rows read (to tell a full page from the end of the range).
    pub rows: usize,
    /// The retention boundary, read in the same statement as the rows. When it is above the
    /// start of the range, rows of the range may have been pruned before they were read.
    pub pruned_through: Position,
}

/// A log row that could not become an event. It is never sent in part; what of it can still be
/// read says whose rights it may have changed.
#[derive(Debug)]
pub struct Undecodable {
    /// The row's position.
    pub position: Position,
    /// Its commit time, unless that is what could not be read.
    pub committed_at: Option<DateTime<Utc>>,
    /// The session the row names, if that much could be read ([`session_of_undecodable`]):
    /// the change may have ended a mechanic's membership of it. `None`: any session.
    pub session_id: Option<uuid::Uuid>,
    /// Why it did not decode.
    pub error: DecodeError,
}

impl LogPage {
    /// Could rows after `after` have been pruned before this page was read? Then the page is
    /// not a complete account of the range.
    pub fn pruned_past(&self, after: Position) -> bool {
        self.pruned_through > after
    }
}

/// Where the log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogHead {
    /// Highest position committed so far (or the pruning boundary if the log is empty).
    pub head: Position,
    /// Every position at or below this may have been deleted by retention.
    pub pruned_through: Position,
}

impl LogHead {
    /// The head and retention boundary as `client` sees them: a pooled connection, or a
    /// transaction whose other reads must agree with the head (the gateway's REPEATABLE READ
    /// snapshots). Every reader of the log head goes through this one query.
    pub async fn read(client: &impl GenericClient) -> Result<LogHead, ListenerError> {
        let stmt = client.prepare_cached(HEAD).await?;
        let row = client.query_one(&stmt, &[]).await?;
        Ok(LogHead {
            head: row.try_get(0)?,
            pruned_through: row.try_get(1)?,
        })
    }
}

impl EventLog {
    /// A log reader using `pool`.
    pub fn new(pool: Pool) -> Self {
        EventLog { pool }
    }

    /// The pool, for callers that need other queries.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Current head and retention boundary ([`LogHead::read`] on a pooled connection).
    pub async fn head(&self) -> Result<LogHead, ListenerError> {
        LogHead::read(&self.pool.get().await?).await
    }

    /// The position to read after to receive the newest `events` retained events (the head
    /// when `events` is 0 or the log is empty).
    pub async fn window_start(&self, events: usize) -> Result<Position, ListenerError> {
        if events == 0 {
            return Ok(self.head().await?.head);
        }
        let limit = i64::try_from(events).unwrap_or(i64::MAX);
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(WINDOW_START).await?;
        Ok(client.query_one(&stmt, &[&limit]).await?.try_get(0)?)
    }

    /// Up to `limit` rows with `after < position <= through`, in position order.
    pub async fn read_range(
        &self,
        after: Position,
        through: Position,
        limit: i64,
    ) -> Result<LogPage, ListenerError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(READ_RANGE).await?;
        // Row by row as they arrive, each decoded and dropped: a page holds its typed events,
        // never all of its rows' text. The log keeps the application's whole row, and an
        // application whose rows carry large columns of its own (pgcast sends none of them)
        // would otherwise make every page, and every replay's, as large as a page of those rows.
        let params: [&(dyn ToSql + Sync); 3] = [&after, &through, &limit];
        let rows = client.query_raw(&stmt, params).await?;
        let mut rows = std::pin::pin!(rows);
        let mut page = LogPage::default();
        while let Some(row) = rows.try_next().await? {
            page.pruned_through = row.try_get(0)?;
            let Some(position) = row.try_get::<_, Option<Position>>(1)? else {
                continue; // the range is empty: only the boundary came back
            };
            page.rows += 1;
            page.last = Some(position);
            // PostgreSQL holds times chrono cannot (`infinity`, years past 262143): such a row,
            // edited by hand, is skipped like any other that cannot be decoded, instead of
            // failing the page and every read after it.
            let event: &str = row.try_get(3)?;
            let committed_at = match row.try_get::<_, DateTime<Utc>>(2) {
                Ok(at) => Some(at),
                // A column of another type is this query's bug, not a row's: every read fails.
                Err(e) if e.source().is_some_and(|s| s.is::<WrongType>()) => return Err(e.into()),
                Err(_) => None,
            };
            let decoded = match committed_at {
                Some(at) => decode_event(position, at, event),
                None => Err(DecodeError::Inconsistent("commit time out of range")),
            };
            match decoded {
                Ok(event) => page.events.push(event),
                Err(error) => page.undecodable.push(Undecodable {
                    position,
                    committed_at,
                    session_id: session_of_undecodable(event),
                    error,
                }),
            }
        }
        Ok(page)
    }
}
