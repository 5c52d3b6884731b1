//! The gateway's own queries (through the pool, never the LISTEN connection): snapshots,
//! session ownership and session membership.

use deadpool_postgres::Pool;
use pgcast_events::{Assignment, Position, Principal, Topic};
use pgcast_listener::LogHead;
use tokio_postgres::types::ToSql;
use tokio_postgres::IsolationLevel;
use uuid::Uuid;

use crate::GatewayError;

const SNAPSHOT_QUEUE: &str = include_str!("../../../sql/snapshot_queue.sql");
const SNAPSHOT_MECHANIC: &str = include_str!("../../../sql/snapshot_mechanic.sql");
const SNAPSHOT_SESSION: &str = include_str!("../../../sql/snapshot_session.sql");
const SNAPSHOT_WORKSHOP: &str = include_str!("../../../sql/snapshot_workshop.sql");
const SNAPSHOT_ASSIGNMENTS: &str = include_str!("../../../sql/snapshot_assignments.sql");
const SNAPSHOT_CUSTOMER: &str = include_str!("../../../sql/snapshot_customer.sql");
const SESSION_CUSTOMER: &str = include_str!("../../../sql/session_access_customer.sql");
const SESSION_MEMBERSHIP: &str = include_str!("../../../sql/session_membership.sql");

/// Is `customer` the customer of session `session`? (A session's customer never changes, so
/// this is checked once, at subscribe.)
pub(crate) async fn owns_session(
    pool: &Pool,
    session: Uuid,
    customer: Uuid,
) -> Result<bool, GatewayError> {
    let client = pool.get().await?;
    let stmt = client.prepare_cached(SESSION_CUSTOMER).await?;
    let row = client.query_one(&stmt, &[&session, &customer]).await?;
    Ok(row.try_get(0)?)
}

/// A mechanic's view of one session at one log position.
pub(crate) struct SessionView {
    /// The log head the view is consistent with.
    pub(crate) head: LogHead,
    /// Ids of the session's assignments that make the mechanic a member (empty: not one).
    pub(crate) granting: Vec<Uuid>,
    /// The session's rows, when asked for (a snapshot).
    pub(crate) rows: Option<Vec<Assignment>>,
}

/// Reads, in one REPEATABLE READ transaction, the log head, the assignments that make
/// `mechanic` a member of `session`, and with `rows_limit` the session's rows: membership and
/// rows are exactly as they stood at that head.
pub(crate) async fn mechanic_session(
    pool: &Pool,
    session: Uuid,
    mechanic: Uuid,
    rows_limit: Option<usize>,
) -> Result<SessionView, GatewayError> {
    let mut client = pool.get().await?;
    let tx = consistent_read(&mut client).await?;
    let head = LogHead::read(&tx).await?;
    let stmt = tx.prepare_cached(SESSION_MEMBERSHIP).await?;
    let granting = tx
        .query(&stmt, &[&session, &mechanic])
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<Vec<Uuid>, _>>()?;
    let rows = match rows_limit {
        Some(limit) if !granting.is_empty() => {
            let fetch = i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1);
            let stmt = tx.prepare_cached(SNAPSHOT_SESSION).await?;
            let rows = tx.query(&stmt, &[&session, &fetch]).await?;
            if rows.len() > limit {
                return Err(GatewayError::SnapshotTooLarge(limit));
            }
            Some(decode_rows(rows)?)
        }
        _ => None,
    };
    tx.commit().await?;
    Ok(SessionView {
        head,
        granting,
        rows,
    })
}

/// A read-only REPEATABLE READ transaction: every query in it sees one snapshot, so rows and
/// the log head read in it agree (positions are commit-ordered, so the snapshot holds exactly
/// the events up to its head).
async fn consistent_read(
    client: &mut deadpool_postgres::Client,
) -> Result<deadpool_postgres::Transaction<'_>, GatewayError> {
    Ok(client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?)
}

fn decode_rows(rows: Vec<tokio_postgres::Row>) -> Result<Vec<Assignment>, GatewayError> {
    let mut assignments = Vec::with_capacity(rows.len());
    for row in rows {
        let text: &str = row.try_get(0)?;
        assignments.push(serde_json::from_str(text).map_err(GatewayError::Row)?);
    }
    Ok(assignments)
}

/// The rows of `topic` visible to `who` and the log position they are consistent with, read in
/// one REPEATABLE READ transaction: every event after that position is a change the rows do
/// not contain yet, and every event up to it is already reflected in them.
pub(crate) async fn snapshot(
    pool: &Pool,
    topic: &Topic,
    who: &Principal,
    limit: usize,
) -> Result<(Position, Vec<Assignment>), GatewayError> {
    let fetch = i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1);
    let (sql, id): (&str, Option<Uuid>) = match topic {
        Topic::Queue => (SNAPSHOT_QUEUE, Some(who.user_id)),
        Topic::Mechanic(id) => (SNAPSHOT_MECHANIC, Some(*id)),
        Topic::Session(id) => (SNAPSHOT_SESSION, Some(*id)),
        Topic::Workshop(id) => (SNAPSHOT_WORKSHOP, Some(*id)),
        Topic::Customer(id) => (SNAPSHOT_CUSTOMER, Some(*id)),
        Topic::Assignments => (SNAPSHOT_ASSIGNMENTS, None),
    };
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(3);
    if let Some(id) = &id {
        params.push(id);
    }
    if *topic == Topic::Queue {
        params.push(&who.workshop_id);
    }
    params.push(&fetch);

    let mut client = pool.get().await?;
    let tx = consistent_read(&mut client).await?;
    let head: Position = LogHead::read(&tx).await?.head;
    let stmt = tx.prepare_cached(sql).await?;
    let rows = tx.query(&stmt, &params).await?;
    tx.commit().await?;
    if rows.len() > limit {
        return Err(GatewayError::SnapshotTooLarge(limit));
    }
    // SQL narrows, the shared rule decides: a snapshot can never show more than events do.
    // The customer's rows were selected through `sessions`, which is where the log takes a
    // session's customer from too.
    let customer_id = match topic {
        Topic::Customer(id) => Some(*id),
        _ => None,
    };
    let mut assignments = decode_rows(rows)?;
    assignments.retain(|a| {
        let state = pgcast_events::RowState {
            customer_id,
            ..a.row_state()
        };
        topic.sees(who, &state)
    });
    Ok((head, assignments))
}
