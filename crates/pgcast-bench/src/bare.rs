//! The database-alone baseline: a bench-only trigger that NOTIFYs each row as JSON on its own
//! channel, `pgcast_bench_bare` (`sql/bare_notify.sql`), and a bare tokio-postgres LISTEN
//! reader of that channel. pgcast's own NOTIFY is a doorbell without content and cannot be
//! matched to a commit; this channel can, and it also feeds the bare broadcaster and the
//! servers of raw mode.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls, Notification};
use tokio_util::sync::CancellationToken;

use crate::clients::Tally;
use crate::stats::now_us;

/// Listens to the channel of the baseline trigger (`sql/bare_notify.sql`).
const LISTEN_BARE: &str = "LISTEN pgcast_bench_bare";
const BARE_NOTIFY: &str = include_str!("../sql/bare_notify.sql");
const BARE_NOTIFY_DROP: &str =
    "DROP TRIGGER IF EXISTS pgcast_bench_bare_notify ON session_assignments";

/// Runs statements on a short-lived connection of its own.
pub(crate) async fn execute_once(pg: &tokio_postgres::Config, sql: &str) -> Result<()> {
    let (client, connection) = pg.connect(NoTls).await?;
    let driver = tokio::spawn(connection);
    client.batch_execute(sql).await?;
    drop(client);
    let _ = driver.await;
    Ok(())
}

/// The baseline trigger, installed for as long as this value lives (`remove` drops it): a
/// plain `pg_notify(to_jsonb(NEW))` on `pgcast_bench_bare` at the same commits pgcast logs.
pub(crate) struct BareTrigger {
    pg: tokio_postgres::Config,
}

impl BareTrigger {
    pub(crate) async fn install(pg: &tokio_postgres::Config) -> Result<BareTrigger> {
        execute_once(pg, BARE_NOTIFY).await?;
        Ok(BareTrigger { pg: pg.clone() })
    }

    pub(crate) async fn remove(self) {
        if let Err(e) = execute_once(&self.pg, BARE_NOTIFY_DROP).await {
            eprintln!("bench: could not drop the baseline trigger: {e}");
        }
    }
}

/// LISTENs (`listen`, the whole statement) on a connection of its own, in a task of its own
/// that hands every notification to `each` with `state` until `stop`; resolves once LISTEN is
/// in effect. The task gives `state` back, with why the connection ended early if it did.
/// The connection is driven through `Connection::poll_message` (a spawned connection future
/// would drop notifications).
pub(crate) async fn listen<S: Send + 'static>(
    pg: &tokio_postgres::Config,
    listen: &'static str,
    stop: CancellationToken,
    mut state: S,
    each: fn(&mut S, &Notification),
) -> Result<JoinHandle<(S, Option<String>)>> {
    let (client, mut connection) = pg.connect(NoTls).await?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut listening = std::pin::pin!(client.batch_execute(listen));
        let mut ready_tx = Some(ready_tx);
        let ended = loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break None,
                r = &mut listening, if ready_tx.is_some() => {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(r.map_err(|e| e.to_string()));
                    }
                }
                m = std::future::poll_fn(|cx| connection.poll_message(cx)) => match m {
                    Some(Ok(AsyncMessage::Notification(n))) => each(&mut state, &n),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break Some(format!("LISTEN connection failed: {e}")),
                    None => break Some("LISTEN connection closed".into()),
                },
            }
        };
        (state, ended)
    });
    match ready_rx.await {
        Ok(Ok(())) => Ok(task),
        Ok(Err(e)) => bail!("{listen} failed: {e}"),
        Err(_) => bail!("the connection ended before {listen} completed"),
    }
}

/// A bare tokio-postgres LISTEN connection: the database alone, no gateway. pgcast's NOTIFY is
/// a doorbell without content, so the reader listens to a bench-only trigger that NOTIFYs each
/// row's marker at the same commits (`sql/bare_notify.sql`, installed for the reader's life).
/// What the reader's task counts: the frames of run `run`, and how many arrived.
struct Counting {
    tally: Tally,
    run: u32,
    progress: Arc<AtomicU64>,
}

pub(crate) struct ListenReader {
    task: JoinHandle<(Counting, Option<String>)>,
    stop: CancellationToken,
    trigger: BareTrigger,
    pub(crate) progress: Arc<AtomicU64>,
}

impl ListenReader {
    pub(crate) async fn start(pg: &tokio_postgres::Config, run: u32) -> Result<ListenReader> {
        let trigger = BareTrigger::install(pg).await?;
        let stop = CancellationToken::new();
        let progress = Arc::new(AtomicU64::new(0));
        let counting = Counting {
            tally: Tally::default(),
            run,
            progress: progress.clone(),
        };
        let task = listen(pg, LISTEN_BARE, stop.clone(), counting, |c, n| {
            c.tally.event(c.run, n.payload().as_bytes(), now_us());
            c.progress.fetch_add(1, Ordering::Relaxed);
        })
        .await?;
        Ok(ListenReader {
            task,
            stop,
            trigger,
            progress,
        })
    }

    pub(crate) async fn finish(self) -> Tally {
        self.stop.cancel();
        let tally = match self.task.await {
            Ok((counting, ended)) => Tally {
                ended,
                ..counting.tally
            },
            Err(_) => Tally::default(),
        };
        self.trigger.remove().await;
        tally
    }
}
