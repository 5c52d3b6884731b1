//! Versioned migrations from the top-level `migrations/` directory, embedded at compile time.

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
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
pub const SCHEMA_VERSION: i32 = 9;

/// Key of the session advisory lock that serializes concurrent `migrate` runs (several replicas
/// started at once). Any role that can connect can take an advisory key, so `migrate` takes it
/// only when it has something to do, waits for it at most [`MIGRATION_LOCK_WAIT`] and then
/// fails naming the session that holds it. Writes, listeners and pruning never take it.
const MIGRATION_LOCK: i64 = 7_277_017_000;

/// How long [`migrate`] waits for the migration lock: another `migrate` holds it for as long as
/// its migrations take (seconds); anyone else could hold it forever.
pub const MIGRATION_LOCK_WAIT: Duration = Duration::from_secs(60);

/// The session holding [`MIGRATION_LOCK`], as `pg_locks` and `pg_stat_activity` show it.
const MIGRATION_LOCK_HOLDER: &str = "SELECT format('pid %s (user %s, application %s, since %s)',
        l.pid, coalesce(a.usename::text, '?'), coalesce(nullif(a.application_name, ''), '?'),
        coalesce(a.backend_start::text, '?'))
    FROM pg_catalog.pg_locks l LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.classid = ($1::bigint >> 32)::oid AND l.objid = ($1::bigint & 4294967295)::oid";

/// `lock_timeout` of the migration statements, and of each attempt at the migration lock. A
/// DDL statement waiting for a table lock makes every later statement on that table queue
/// behind it: `CREATE TRIGGER` on a busy
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
/// processes at once: they queue on an advisory lock, for at most [`MIGRATION_LOCK_WAIT`]. With
/// nothing to apply it returns at once, without that lock, so a session holding the key cannot
/// stall a restart. A migration statement waits at most 5 s for a table lock (then the
/// migration fails and can be run again) so that it never queues the application's writes
/// behind it for long.
pub async fn migrate(client: &mut Client, scope: MigrationScope) -> Result<usize, ListenerError> {
    migrate_within(client, scope, MIGRATION_LOCK_WAIT).await
}

/// [`migrate`], waiting at most `lock_wait` for the migration lock (give or take one 5 s
/// attempt).
pub async fn migrate_within(
    client: &mut Client,
    scope: MigrationScope,
    lock_wait: Duration,
) -> Result<usize, ListenerError> {
    if up_to_date(client, scope).await? {
        return Ok(0);
    }
    // The session's own lock_timeout is restored after (the client may be the caller's, e.g. a
    // pooled connection).
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
    let result = locked_apply(client, scope, lock_wait).await;
    let restore = client
        .execute("SELECT set_config('lock_timeout', $1, false)", &[&previous])
        .await;
    let applied = result?;
    restore?;
    Ok(applied)
}

/// [`apply`] under the migration lock.
async fn locked_apply(
    client: &mut Client,
    scope: MigrationScope,
    lock_wait: Duration,
) -> Result<usize, ListenerError> {
    take_migration_lock(client, lock_wait).await?;
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

/// Takes the migration lock, each attempt bounded by the session's `lock_timeout`; between
/// attempts says who holds it; gives up after `wait`.
async fn take_migration_lock(client: &Client, wait: Duration) -> Result<(), ListenerError> {
    let deadline = Instant::now() + wait;
    loop {
        match client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                let holder = client
                    .query_opt(MIGRATION_LOCK_HOLDER, &[&MIGRATION_LOCK])
                    .await?
                    .map(|row| row.try_get::<_, String>(0))
                    .transpose()?
                    .unwrap_or_else(|| "a session that has just let go".into());
                if Instant::now() >= deadline {
                    return Err(ListenerError::MigrationLockHeld { holder, wait });
                }
                tracing::warn!(
                    %holder,
                    "waiting for the migration lock (advisory key {MIGRATION_LOCK}): another \
                     `pgcast migrate`, or a session that took the key"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Nothing for `migrate` to do: the migration sets of `scope` are applied up to their last
/// version and version 3's capture triggers are in place. Read without the migration lock.
/// refinery's checks of the applied migrations (their checksums against the embedded files)
/// run only when something is pending.
async fn up_to_date(client: &Client, scope: MigrationScope) -> Result<bool, ListenerError> {
    let mut sets = vec![("pgcast.realtime_migrations", realtime::migrations::runner())];
    if scope == MigrationScope::All {
        sets.push(("pgcast.app_migrations", app::migrations::runner()));
    }
    for (table, runner) in sets {
        let latest = runner.get_migrations().iter().map(|m| m.version()).max();
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await?
            .try_get(0)?;
        if !exists {
            return Ok(false);
        }
        let applied: Option<i32> = client
            .query_one(&format!("SELECT max(version) FROM {table}"), &[])
            .await?
            .try_get(0)?;
        if applied.and_then(|v| u32::try_from(v).ok()) < latest {
            return Ok(false);
        }
    }
    // Version 3's swap to the statement triggers may still be pending (see `finish_capture`).
    Ok(client.query_one(CAPTURE_INSTALLED, &[]).await?.try_get(0)?)
}

/// Version 3's statement triggers are on the source table, version 2's row trigger is gone, and
/// version 8's start trigger and version 9's TRUNCATE trigger are there unless pgcast's role
/// may not create them (without them every INSERT, UPDATE and DELETE is still logged, and
/// `pgcast doctor` warns; asking for them would make every start with `--migrate` take the
/// migration lock).
const CAPTURE_INSTALLED: &str = "SELECT coalesce((
    SELECT (SELECT count(*) FROM pg_catalog.pg_trigger t
            WHERE t.tgrelid = s.source_table AND NOT t.tgisinternal
              AND t.tgfoid = 'pgcast.capture_assignment_changes()'::pg_catalog.regprocedure) = 3
       AND ((EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                     WHERE t.tgrelid = s.source_table
                       AND t.tgname = 'pgcast_statement_start')
             AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                         WHERE t.tgrelid = s.source_table
                           AND t.tgname = 'pgcast_capture_truncate'))
            OR NOT pg_catalog.pg_has_role(
                (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = s.source_table),
                'USAGE'))
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                       WHERE t.tgrelid = s.source_table
                         AND t.tgname = 'pgcast_emit_assignment_event')
    FROM pgcast.log_state s), false)";

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
