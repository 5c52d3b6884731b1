//! What every scenario shares, written once: the context ([`Ctx`]: arguments, sizes, the
//! database, the pgcast under test and its tokens), opening subscribers, and the one way a
//! measured load runs ([`drive`]): readers started (and the bare LISTEN reader when asked
//! for), writers run to their plan, a bounded drain, CPU read around it. Also the write
//! summary and the table cells several scenarios print.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use pgcast_events::{Principal, Role};
use pgcast_gateway::TokenMinter;
use serde::Serialize;
use tokio_postgres::NoTls;
use uuid::Uuid;

use crate::bare::ListenReader;
use crate::cli::{Args, Sizes};
use crate::clients::{self, report, Conn, Mode, ReaderReport, Readers, Setup, Tally};
use crate::env::{Database, Server};
use crate::load::{self, Outcome, Plan, World};
use crate::report::{int, ms};
use crate::stats::{now_us, round3, CpuSample, CpuUse, Pids};
use crate::ws::WsTarget;

use super::ceiling::CeilingRow;
use super::fanout::Step;

/// A drain ends when every expected frame arrived, when nothing arrived for this long, or
/// at `DRAIN_MAX`.
pub(crate) const DRAIN_STALL: Duration = Duration::from_secs(3);
const DRAIN_MAX: Duration = Duration::from_secs(30);
const TOKEN_TTL: Duration = Duration::from_secs(6 * 3600);
/// Receive buffer of connections that get a lot (service subscribers, raw ceiling).
pub(crate) const BIG_BUF: usize = 256 << 10;
/// Receive buffer of the many connections of a fan-out.
pub(crate) const CONN_BUF: usize = 16 << 10;

/// Figures kept for the comparison with other servers.
#[derive(Debug, Default)]
pub(crate) struct Memo {
    pub(crate) fanout: Option<Vec<Step>>,
    pub(crate) ceiling: Option<Vec<CeilingRow>>,
}

/// Everything the scenarios share.
pub(crate) struct Ctx {
    pub(crate) args: Args,
    pub(crate) sizes: Sizes,
    pub(crate) db: Database,
    pub(crate) pgcast: Option<Server>,
    pub(crate) target: WsTarget,
    pub(crate) pgcast_pid: Option<u32>,
    pub(crate) secret: String,
    pub(crate) pgcast_bin: Option<std::path::PathBuf>,
    pub(crate) log_dir: std::path::PathBuf,
    pub(crate) postmaster: Option<u32>,
    pub(crate) memo: Memo,
    minter: TokenMinter,
    run: u32,
}

impl Ctx {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        args: Args,
        db: Database,
        pgcast: Option<Server>,
        target: WsTarget,
        pgcast_pid: Option<u32>,
        secret: String,
        minter: TokenMinter,
        pgcast_bin: Option<std::path::PathBuf>,
        log_dir: std::path::PathBuf,
    ) -> Ctx {
        Ctx {
            sizes: args.sizes(),
            args,
            postmaster: db.postmaster(),
            db,
            pgcast,
            target,
            pgcast_pid,
            minter,
            secret,
            pgcast_bin,
            log_dir,
            memo: Memo::default(),
            // Distinct per bench invocation, so rows of an earlier run never count.
            run: (now_us() as u32 ^ std::process::id().wrapping_mul(2_654_435_761)) % 1_000_000
                * 100,
        }
    }

    /// A fresh run number: the marker that tells this load's rows from every other's.
    pub(crate) fn next_run(&mut self) -> u32 {
        self.run += 1;
        self.run
    }

    /// The processes a CPU reading covers: pgcast as it is now, PostgreSQL, and `other`.
    pub(crate) fn pids(&self, other: Option<u32>) -> Pids {
        Pids {
            pgcast: self.pgcast_pid,
            postmaster: self.postmaster,
            other_server: other,
        }
    }

    pub(crate) fn token(
        &self,
        user_id: Uuid,
        role: Role,
        workshop_id: Option<Uuid>,
    ) -> Result<String> {
        let who = Principal {
            user_id,
            role,
            workshop_id,
        };
        Ok(self.minter.mint(&who, TOKEN_TTL)?)
    }

    /// One pgcast connection per mechanic of `world`, subscribed to `topic`.
    pub(crate) fn mechanic_specs(
        &self,
        world: &World,
        topic: Option<&str>,
    ) -> Result<Vec<(usize, Setup)>> {
        world
            .mechanics
            .iter()
            .enumerate()
            .map(|(i, (id, w))| {
                let workshop = w.map(|w| world.workshops[usize::from(w)]);
                Ok((
                    i,
                    Setup::Pgcast {
                        token: self.token(*id, Role::Mechanic, workshop)?,
                        topic: topic.map(str::to_owned),
                        since: None,
                    },
                ))
            })
            .collect()
    }

    /// A `service` subscriber on `assignments`.
    pub(crate) fn service_spec(&self, since: Option<i64>) -> Result<Setup> {
        Ok(Setup::Pgcast {
            token: self.token(Uuid::new_v4(), Role::Service, None)?,
            topic: Some("assignments".into()),
            since,
        })
    }

    /// Tells the cleanup watchdog which children to kill should the bench die.
    pub(crate) fn track(&self, extra: Option<u32>) {
        let pids: Vec<String> = self
            .pgcast
            .as_ref()
            .map(|s| s.pid)
            .into_iter()
            .chain(extra)
            .map(|p| p.to_string())
            .collect();
        let _ = std::fs::write(self.log_dir.join("pids"), pids.join(" "));
    }

    /// Stops the pgcast this bench started (if any) and starts a new one listening on
    /// `listen`, logging to `log` in the scratch directory; it becomes the one under test.
    pub(crate) async fn restart_pgcast(&mut self, listen: &str, log: &str) -> Result<()> {
        let bin = self
            .pgcast_bin
            .clone()
            .ok_or_else(|| anyhow!("no pgcast binary to start"))?;
        if let Some(old) = self.pgcast.take() {
            tokio::task::spawn_blocking(move || old.stop()).await?;
        }
        let (secret, log, listen) = (
            self.secret.clone(),
            self.log_dir.join(log),
            listen.to_owned(),
        );
        // The blocking start needs a database value of its own.
        let db = Database::given(&self.db.url)?;
        let server = tokio::task::spawn_blocking(move || {
            Server::pgcast_at(&bin, &db, &secret, log, &listen)
        })
        .await??;
        self.target = server.target.clone();
        self.pgcast_pid = Some(server.pid);
        self.pgcast = Some(server);
        self.track(None);
        Ok(())
    }

    /// Stops the servers this bench started.
    pub(crate) fn shutdown(&mut self) {
        if let Some(s) = self.pgcast.take() {
            s.stop();
        }
    }
}

/// The first reason a connection of `groups` could not be set up.
pub(crate) fn first_failure(groups: &[Vec<Conn>]) -> Option<String> {
    groups.iter().flatten().find_map(|c| c.tally.ended.clone())
}

/// Raw servers do not acknowledge a connection: give them `time` to register the sockets.
pub(crate) async fn settle(mode: &Mode, time: Duration) {
    if matches!(mode, Mode::Raw(_)) {
        tokio::time::sleep(time).await;
    }
}

/// Opens one subscriber with a large receive buffer; fails when it could not connect
/// (`what` names it in the error).
pub(crate) async fn open_one(
    target: &WsTarget,
    setup: Setup,
    mode: &Mode,
    what: &str,
) -> Result<Vec<Vec<Conn>>> {
    let groups = clients::open(target, vec![(0, setup)], 1, 1, BIG_BUF).await;
    if let Some(e) = first_failure(&groups) {
        bail!("{what} could not connect: {e}");
    }
    settle(mode, Duration::from_millis(300)).await;
    Ok(groups)
}

/// A measured load: what the writers do and who else is watched.
pub(crate) struct Load {
    pub(crate) plan: Plan,
    /// The mechanics of a marketplace load.
    pub(crate) world: Option<Arc<World>>,
    /// Also read the commits with a bare LISTEN connection (the database alone).
    pub(crate) listen: bool,
    /// A compared server, whose CPU is read beside pgcast's.
    pub(crate) other_pid: Option<u32>,
}

/// A load run with its readers, drained.
pub(crate) struct Driven {
    pub(crate) writes: Outcome,
    /// Every expected frame arrived before the drain limits.
    pub(crate) drained: bool,
    pub(crate) cpu: CpuUse,
    pub(crate) conns: Vec<Conn>,
    pub(crate) listen: Option<Tally>,
}

/// Runs `load` while `groups` read (frames recognised by `mode`), then drains until the
/// readers hold `expected(writes)` events, nothing arrives for [`DRAIN_STALL`], or 30 s.
pub(crate) async fn drive(
    ctx: &Ctx,
    groups: Vec<Vec<Conn>>,
    mode: Mode,
    load: Load,
    expected: impl Fn(&Outcome) -> u64,
) -> Result<Driven> {
    let run = load.plan.run;
    let listen = if load.listen {
        Some(ListenReader::start(&ctx.db.config, run).await?)
    } else {
        None
    };
    let readers = Readers::start(groups, mode, run);
    let clients = load::connect_writers(&ctx.db.config, load.plan.writers).await?;
    let pids = ctx.pids(load.other_pid);
    let cpu0 = CpuSample::take(pids);
    let writes = load::run(&clients, load.plan, load.world).await;
    if writes.committed() == 0 {
        bail!("no write committed: {:?}", writes.errors);
    }
    let want = expected(&writes);
    let want_listen = writes.committed();
    let deadline = Instant::now() + DRAIN_MAX;
    let mut last = (u64::MAX, u64::MAX);
    let mut changed = Instant::now();
    let drained = loop {
        let got = readers.received();
        let heard = listen
            .as_ref()
            .map_or(want_listen, |l| l.progress.load(Ordering::Relaxed));
        if got >= want && heard >= want_listen {
            break true;
        }
        if (got, heard) != last {
            last = (got, heard);
            changed = Instant::now();
        } else if changed.elapsed() > DRAIN_STALL {
            break false;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let cpu = cpu0.until(&CpuSample::take(pids));
    let conns = readers.finish().await;
    let listen = match listen {
        Some(l) => Some(l.finish().await),
        None => None,
    };
    Ok(Driven {
        writes,
        drained,
        cpu,
        conns,
        listen,
    })
}

/// Readers that must each receive every committed event.
pub(crate) fn every_event_report<'a>(
    tallies: impl IntoIterator<Item = (usize, bool, &'a Tally)>,
    w: &Outcome,
) -> ReaderReport {
    let by_seq = w.by_seq();
    report(
        tallies,
        |_| w.committed(),
        |_, seq| by_seq.get(seq as usize).is_some_and(Option::is_some),
        w.started_us,
        w.ended_us,
    )
}

pub(crate) fn conns_report(d: &Driven) -> ReaderReport {
    every_event_report(
        d.conns.iter().map(|c| (c.who, c.connected(), &c.tally)),
        &d.writes,
    )
}

pub(crate) fn listen_report(d: &Driven) -> Option<ReaderReport> {
    d.listen
        .as_ref()
        .map(|t| every_event_report([(0, true, t)], &d.writes))
}

/// The highest position in pgcast's log, by the listener's one log-head query
/// ([`pgcast_listener::LogHead::read`]).
pub(crate) async fn log_head(pg: &tokio_postgres::Config) -> Result<i64> {
    let pool = pgcast_listener::pool(pg.clone(), NoTls, 1)?;
    let head = pgcast_listener::LogHead::read(&pool.get().await?).await?;
    pool.close();
    Ok(head.head)
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct WriteSummary {
    pub(crate) committed: u64,
    pub(crate) failed: u64,
    pub(crate) seconds: f64,
    pub(crate) commits_per_s: f64,
    pub(crate) statement_rtt: crate::stats::Percentiles,
    pub(crate) first_errors: Vec<String>,
}

pub(crate) fn write_summary(w: &Outcome) -> WriteSummary {
    let seconds = (w.ended_us.saturating_sub(w.started_us)) as f64 / 1e6;
    WriteSummary {
        committed: w.committed(),
        failed: w.failed,
        seconds: round3(seconds),
        commits_per_s: (w.committed() as f64 / seconds.max(1e-9)).round(),
        statement_rtt: w.rtt.summary(),
        first_errors: w.errors.clone(),
    }
}

pub(crate) fn write_line(w: &WriteSummary) -> String {
    let mut s = format!(
        "Writes: {} events committed in {:.1} s ({}/s), {} failed; statement round trip p50 {} ms, p99 {} ms.",
        int(w.committed),
        w.seconds,
        int(w.commits_per_s as u64),
        int(w.failed),
        ms(w.statement_rtt.p50_ms),
        ms(w.statement_rtt.p99_ms)
    );
    if let Some(e) = w.first_errors.first() {
        s += &format!(" First error: `{e}`.");
    }
    s
}

/// Lost frames; when the drain was cut short they may still have been queued in the server.
pub(crate) fn lost_cell(lost: u64, drained: bool) -> String {
    if lost > 0 && !drained {
        format!("{} (undelivered when the drain ended)", int(lost))
    } else {
        int(lost)
    }
}

pub(crate) fn problems(r: &ReaderReport) -> String {
    match &r.first_problem {
        Some(p) => format!("\nFirst problem reported by a connection: `{p}`\n"),
        None => String::new(),
    }
}
