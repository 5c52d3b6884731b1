//! The floors of a durable, commit-ordered event log (scenario 9): the triggers of
//! `sql/ordered_log_floor.sql` (at commit: an ordering lock, a position, a row appended to a
//! logged table, an empty doorbell; the ordered-log floor appends `to_json(NEW)`, the
//! event-content floor the content of a pgcast event) and their one reader, built as pgcast's
//! listener is — a LISTEN connection whose doorbells wake a second connection that reads every
//! row after its position — with nothing else: no pool, no decoding, no fan-out. What pgcast's
//! write path costs beyond the event-content floor is the price of its design (statements
//! captured whole and numbered at commit, so that the commit-order lock is held for one small
//! row per statement, not through every row).
//!
//! ```text
//!   LISTEN conn ── doorbell ──▶ bell ──▶ reader conn: SELECT … WHERE position > last (pages)
//! ```

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use crate::bare::{execute_once, listen};

const INSTALL: &str = include_str!("../sql/ordered_log_floor.sql");
const REMOVE: &str = "DROP TRIGGER IF EXISTS pgcast_bench_log_floor ON session_assignments; \
    DROP TRIGGER IF EXISTS pgcast_bench_content_floor ON session_assignments; \
    DROP FUNCTION IF EXISTS public.pgcast_bench_log_floor_append(), \
        public.pgcast_bench_content_floor_append(); \
    DROP TABLE IF EXISTS public.pgcast_bench_log_floor, public.pgcast_bench_log_floor_order; \
    DROP SEQUENCE IF EXISTS public.pgcast_bench_log_floor_position";
const LISTEN: &str = "LISTEN pgcast_bench_log_floor";
const HEAD: &str = "SELECT COALESCE(max(position), 0) FROM public.pgcast_bench_log_floor";
const PAGE: i64 = 1000;
const READ: &str = "SELECT position, payload::text FROM public.pgcast_bench_log_floor \
    WHERE position > $1 ORDER BY position LIMIT $2";

/// The application's `sessions` table, schema-qualified as the writers' search_path finds it:
/// the event-content floor runs with a fixed search_path.
const SESSIONS: &str = "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_class c \
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
    WHERE c.oid = 'sessions'::regclass";

async fn sessions_table(pg: &tokio_postgres::Config) -> Result<String> {
    let (client, connection) = pg.connect(NoTls).await?;
    let driver = tokio::spawn(connection);
    let name = match client.query_one(SESSIONS, &[]).await {
        Ok(row) => row.try_get(0).map_err(anyhow::Error::from),
        Err(e) => Err(e.into()),
    };
    drop(client);
    let _ = driver.await;
    name.context("find the sessions table")
}

/// The floors' triggers, installed (disabled) for as long as this value lives, and their reader.
pub(crate) struct LogFloor {
    pg: tokio_postgres::Config,
    stop: CancellationToken,
    listen: JoinHandle<(Arc<Notify>, Option<String>)>,
    reader: JoinHandle<Result<u64>>,
}

impl LogFloor {
    /// Installs the triggers (disabled: the scenario enables one at a time for its rounds) and
    /// starts the reader at the log's head.
    pub(crate) async fn start(pg: &tokio_postgres::Config) -> Result<LogFloor> {
        let install = INSTALL.replace("@SESSIONS@", &sessions_table(pg).await?);
        execute_once(pg, &install)
            .await
            .context("install the log floors")?;
        let stop = CancellationToken::new();
        let bell = Arc::new(Notify::new());

        let listen = listen(pg, LISTEN, stop.clone(), bell.clone(), |bell, _| {
            bell.notify_one()
        })
        .await?;

        let (reader, connection) = pg.connect(NoTls).await?;
        let driver = tokio::spawn(connection);
        let read = reader.prepare(READ).await?;
        let mut last: i64 = reader.query_one(HEAD, &[]).await?.try_get(0)?;
        let reader = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut read_rows = 0u64;
                loop {
                    // A stop still reads once more: every row committed before it is counted.
                    let last_pass = tokio::select! {
                        () = bell.notified() => false,
                        () = stop.cancelled() => true,
                    };
                    loop {
                        let rows = reader.query(&read, &[&last, &PAGE]).await?;
                        for row in &rows {
                            last = row.try_get(0)?;
                            let payload: &str = row.try_get(1)?;
                            std::hint::black_box(payload);
                        }
                        read_rows += rows.len() as u64;
                        if (rows.len() as i64) < PAGE {
                            break;
                        }
                    }
                    if last_pass {
                        break;
                    }
                }
                drop(reader);
                let _ = driver.await;
                Ok(read_rows)
            })
        };
        Ok(LogFloor {
            pg: pg.clone(),
            stop,
            listen,
            reader,
        })
    }

    /// Stops the reader after a last read and removes the floors' objects; the rows its reader
    /// read.
    pub(crate) async fn finish(self) -> Result<u64> {
        self.stop.cancel();
        let read = self.reader.await.context("the floors' reader panicked");
        let _ = self.listen.await;
        if let Err(e) = execute_once(&self.pg, REMOVE).await {
            eprintln!("bench: could not remove the log floors: {e}");
        }
        read?
    }
}
