//! The gateway's own queries (through the pool, never the LISTEN connection): snapshots and
//! session ownership.

use deadpool_postgres::Pool;
use pgcast_events::{Assignment, Position, Principal, Role, Topic};
use tokio_postgres::types::ToSql;
use tokio_postgres::IsolationLevel;
use uuid::Uuid;

use crate::GatewayError;

const LOG_HEAD: &str = include_str!("../../../sql/log_head.sql");
const SNAPSHOT_QUEUE: &str = include_str!("../../../sql/snapshot_queue.sql");
const SNAPSHOT_MECHANIC: &str = include_str!("../../../sql/snapshot_mechanic.sql");
const SNAPSHOT_SESSION: &str = include_str!("../../../sql/snapshot_session.sql");
const SNAPSHOT_WORKSHOP: &str = include_str!("../../../sql/snapshot_workshop.sql");
const SNAPSHOT_ASSIGNMENTS: &str = include_str!("../../../sql/snapshot_assignments.sql");
const SESSION_CUSTOMER: &str = include_str!("../../../sql/session_access_customer.sql");
const SESSION_MECHANIC: &str = include_str!("../../../sql/session_access_mechanic.sql");

/// Does the database say `who` may follow session `session`?
pub(crate) async fn may_follow_session(
    pool: &Pool,
    session: Uuid,
    who: &Principal,
) -> Result<bool, GatewayError> {
    let sql = match who.role {
        Role::Customer => SESSION_CUSTOMER,
        Role::Mechanic => SESSION_MECHANIC,
        Role::Service => return Ok(true),
    };
    let client = pool.get().await?;
    let stmt = client.prepare_cached(sql).await?;
    let row = client.query_one(&stmt, &[&session, &who.user_id]).await?;
    Ok(row.try_get(0)?)
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
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let head: Position = tx.query_one(LOG_HEAD, &[]).await?.try_get(0)?;
    let stmt = tx.prepare_cached(sql).await?;
    let rows = tx.query(&stmt, &params).await?;
    tx.commit().await?;
    if rows.len() > limit {
        return Err(GatewayError::SnapshotTooLarge(limit));
    }
    let mut assignments = Vec::with_capacity(rows.len());
    for row in rows {
        let text: &str = row.try_get(0)?;
        let a: Assignment = serde_json::from_str(text).map_err(GatewayError::Row)?;
        // SQL narrows, the shared rule decides: a snapshot can never show more than events do.
        if topic.sees(who, &a.row_state()) {
            assignments.push(a);
        }
    }
    Ok((head, assignments))
}
