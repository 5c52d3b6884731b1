//! Retention: events older than the retention are deleted every minute, at most
//! [`PRUNE_BATCH`] events per transaction (whole statements while they fit, a larger statement
//! a batch at a time), by `pgcast.prune_events()` (`sql/prune_events.sql`).
//! Several replicas may prune at once: the SQL function lets one work at a time and the
//! others skip.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::ListenerError;

const PRUNE_SQL: &str = include_str!("../../../sql/prune_events.sql");

/// How often old log rows are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Events per prune transaction at most: short locks and statements (each runs under the
/// maintenance pool's statement timeout), no long vacuum debt.
const PRUNE_BATCH: i32 = 1000;

/// Deletes log rows older than `retention` through `pool`, at once and then every minute,
/// until `stop`. A failure is logged and tried again at the next round; it never ends the
/// task.
pub async fn prune(pool: Pool, retention: Duration, stop: CancellationToken) {
    let seconds = retention.as_secs_f64();
    loop {
        let mut total = 0u64;
        loop {
            match prune_batch(&pool, seconds).await {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(error) => {
                    tracing::warn!(%error, "pruning the event log failed; retrying later");
                    break;
                }
            }
            if stop.is_cancelled() {
                return;
            }
        }
        if total > 0 {
            tracing::info!(rows = total, "pruned old events from the log");
        }
        tokio::select! {
            () = tokio::time::sleep(PRUNE_EVERY) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// One batch: the events deleted (0 when nothing is left to prune, or another replica is
/// pruning right now).
async fn prune_batch(pool: &Pool, seconds: f64) -> Result<u64, ListenerError> {
    let client = pool.get().await?;
    let deleted: i32 = client
        .query_one(PRUNE_SQL, &[&seconds, &PRUNE_BATCH])
        .await?
        .try_get(0)?;
    // A count is never negative; should the function ever say so, nothing was deleted.
    Ok(u64::try_from(deleted).unwrap_or(0))
}
