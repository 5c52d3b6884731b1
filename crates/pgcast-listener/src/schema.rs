//! Versioned migrations from the top-level `migrations/` directory, embedded at compile time.

use tokio_postgres::Client;

use crate::ListenerError;

mod app {
    refinery::embed_migrations!("../../migrations/app");
}
mod realtime {
    refinery::embed_migrations!("../../migrations/realtime");
}

/// The value of `pgcast.version()` this build expects. Bumped together with a new realtime
/// migration that redefines `pgcast.version()`.
pub const SCHEMA_VERSION: i32 = 2;

/// Key of the session advisory lock that serializes concurrent `migrate` runs (several replicas
/// started at once).
const MIGRATION_LOCK: i64 = 7_277_017_000;

/// Which migration sets to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationScope {
    /// The demo/test application tables, then the realtime objects.
    All,
    /// Only the `pgcast` schema, onto an application that owns `session_assignments`.
    RealtimeOnly,
}

/// Applies pending migrations; returns how many were applied. Safe to call from several
/// processes at once: they queue on an advisory lock.
pub async fn migrate(client: &mut Client, scope: MigrationScope) -> Result<usize, ListenerError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = apply(client, scope).await;
    // Unlock even when a migration failed; if the connection itself is gone, the server has
    // already released the session lock.
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    let applied = result?;
    unlock?;
    Ok(applied)
}

async fn apply(client: &mut Client, scope: MigrationScope) -> Result<usize, ListenerError> {
    // The history tables live in the pgcast schema, which must exist before refinery creates
    // them; the realtime migration itself uses CREATE SCHEMA IF NOT EXISTS.
    client
        .batch_execute("CREATE SCHEMA IF NOT EXISTS pgcast")
        .await?;
    let mut applied = 0;
    if scope == MigrationScope::All {
        let report = app::migrations::runner()
            .set_migration_table_name("pgcast.app_migrations")
            .run_async(client)
            .await?;
        applied += report.applied_migrations().len();
    }
    let report = realtime::migrations::runner()
        .set_migration_table_name("pgcast.realtime_migrations")
        .run_async(client)
        .await?;
    applied += report.applied_migrations().len();
    Ok(applied)
}

/// The installed `pgcast.version()`, or `None` when the realtime objects are not installed.
pub async fn installed_version(client: &Client) -> Result<Option<i32>, ListenerError> {
    let row = client
        .query_one(
            "SELECT to_regprocedure('pgcast.version()') IS NOT NULL",
            &[],
        )
        .await?;
    let installed: bool = row.try_get(0)?;
    if !installed {
        return Ok(None);
    }
    let row = client.query_one("SELECT pgcast.version()", &[]).await?;
    Ok(Some(row.try_get(0)?))
}
