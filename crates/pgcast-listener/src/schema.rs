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
pub const SCHEMA_VERSION: i32 = 3;

/// Key of the session advisory lock that serializes concurrent `migrate` runs (several replicas
/// started at once). Any role that can connect can take an advisory key, so a session holding
/// this one makes `migrate` (and `serve --migrate`) wait until it lets go; it stalls nothing
/// else: writes, listeners and pruning never take it.
const MIGRATION_LOCK: i64 = 7_277_017_000;

/// `lock_timeout` of the migration statements. A DDL statement waiting for a table lock makes
/// every later statement on that table queue behind it: `CREATE TRIGGER` on a busy
/// `session_assignments` would hold up the application's writes for as long as the longest
/// open write transaction, and an `ALTER TABLE` of `pgcast.log_state` (read by every commit
/// since version 2) would hold up every commit, for as long as anyone holds a lock on it — and
/// any role with USAGE on schema `pgcast` can hold a weak one (a PREPAREd statement keeps its
/// parse-time locks until its transaction ends). Each migration runs in one transaction, so a
/// timeout leaves nothing half-done: `migrate` fails naming the lock timeout and can be run
/// again.
const MIGRATION_LOCK_TIMEOUT: &str = "5s";

/// Which migration sets to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationScope {
    /// The demo/test application tables, then the realtime objects.
    All,
    /// Only the `pgcast` schema, onto an application that owns `session_assignments`.
    RealtimeOnly,
}

/// Applies pending migrations; returns how many were applied. Safe to call from several
/// processes at once: they queue on an advisory lock. A migration statement waits at most
/// 5 s for a table lock (then the migration fails and can be run again) so that it never
/// queues the application's writes behind it for long.
pub async fn migrate(client: &mut Client, scope: MigrationScope) -> Result<usize, ListenerError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = apply_with_lock_timeout(client, scope).await;
    // Unlock even when a migration failed; if the connection itself is gone, the server has
    // already released the session lock.
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    let applied = result?;
    unlock?;
    Ok(applied)
}

/// [`apply`] with [`MIGRATION_LOCK_TIMEOUT`], restoring the session's own `lock_timeout` after
/// (the client may be the caller's, e.g. a pooled connection).
async fn apply_with_lock_timeout(
    client: &mut Client,
    scope: MigrationScope,
) -> Result<usize, ListenerError> {
    let previous: String = client
        .query_one("SELECT current_setting('lock_timeout')", &[])
        .await?
        .try_get(0)?;
    client
        .execute(
            "SELECT set_config('lock_timeout', $1, false)",
            &[&MIGRATION_LOCK_TIMEOUT],
        )
        .await?;
    let result = apply(client, scope).await;
    let restore = client
        .execute("SELECT set_config('lock_timeout', $1, false)", &[&previous])
        .await;
    let applied = result?;
    restore?;
    Ok(applied)
}

async fn apply(client: &mut Client, scope: MigrationScope) -> Result<usize, ListenerError> {
    // The history tables live in the pgcast schema, which must exist before refinery creates
    // them; the realtime migration itself uses CREATE SCHEMA IF NOT EXISTS. Only when it is
    // missing: CREATE SCHEMA IF NOT EXISTS checks CREATE on the database even when the schema
    // exists, and after the first install pgcast's role needs no privilege on the database.
    let schema_exists: bool = client
        .query_one("SELECT to_regnamespace('pgcast') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !schema_exists {
        client
            .batch_execute("CREATE SCHEMA IF NOT EXISTS pgcast")
            .await?;
    }
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
    finish_capture(client).await?;
    Ok(applied)
}

/// Version 3 replaces the row trigger on the application table with statement triggers, which
/// needs the table's owner. A role that was no longer a member of that owner when it upgraded
/// kept version 2's row trigger (correct, slower; `pgcast doctor` warns): every `migrate`
/// finishes the swap once the role may. Cheap when there is nothing to do (a catalog lookup,
/// no table lock).
async fn finish_capture(client: &Client) -> Result<(), ListenerError> {
    let pending: bool = client
        .query_one(
            "SELECT to_regprocedure('pgcast.install_capture()') IS NOT NULL",
            &[],
        )
        .await?
        .try_get(0)?;
    if pending {
        client
            .execute("SELECT pgcast.install_capture()", &[])
            .await?;
    }
    Ok(())
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
