//! The database-alone baseline: a bench-only trigger that NOTIFYs each row as JSON on its own
//! channel, `pgcast_bench_bare` (`sql/bare_notify.sql`), and a bare tokio-postgres LISTEN
//! reader of that channel. pgcast's own NOTIFY is a doorbell without content and cannot be
//! matched to a commit; this channel can, and it also feeds the bare broadcaster and the
//! servers of raw mode.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls};
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

/// A bare tokio-postgres LISTEN connection: the database alone, no gateway. pgcast's NOTIFY is
/// a doorbell without content, so the reader listens to a bench-only trigger that NOTIFYs each
/// row's marker at the same commits (`sql/bare_notify.sql`, installed for the reader's life).
/// Driven through `Connection::poll_message` in its own task (a spawned connection future
/// would drop notifications).
pub(crate) struct ListenReader {
    task: JoinHandle<Tally>,
    stop: CancellationToken,
    trigger: BareTrigger,
    pub(crate) progress: Arc<AtomicU64>,
}

impl ListenReader {
    pub(crate) async fn start(pg: &tokio_postgres::Config, run: u32) -> Result<ListenReader> {
        let trigger = BareTrigger::install(pg).await?;
        let (client, mut connection) = pg.connect(NoTls).await?;
        let stop = CancellationToken::new();
        let progress = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = {
            let stop = stop.clone();
            let progress = progress.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut listen = std::pin::pin!(client.batch_execute(LISTEN_BARE));
                let mut ready_tx = Some(ready_tx);
                let mut listening = false;
                loop {
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => break,
                        r = &mut listen, if !listening => {
                            listening = true;
                            if let Some(tx) = ready_tx.take() {
                                let _ = tx.send(r.map_err(|e| e.to_string()));
                            }
                        }
                        m = std::future::poll_fn(|cx| connection.poll_message(cx)) => match m {
                            Some(Ok(AsyncMessage::Notification(n))) => {
                                let now = now_us();
                                tally.event(run, n.payload().as_bytes(), now);
                                progress.fetch_add(1, Ordering::Relaxed);
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                tally.ended = Some(format!("LISTEN connection failed: {e}"));
                                break;
                            }
                            None => {
                                tally.ended = Some("LISTEN connection closed".into());
                                break;
                            }
                        },
                    }
                }
                tally
            })
        };
        match ready_rx.await {
            Ok(Ok(())) => Ok(ListenReader {
                task,
                stop,
                trigger,
                progress,
            }),
            Ok(Err(e)) => bail!("LISTEN failed: {e}"),
            Err(_) => bail!("the LISTEN connection ended before LISTEN completed"),
        }
    }

    pub(crate) async fn finish(self) -> Tally {
        self.stop.cancel();
        let tally = self.task.await.unwrap_or_default();
        self.trigger.remove().await;
        tally
    }
}
