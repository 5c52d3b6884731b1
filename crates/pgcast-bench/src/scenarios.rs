//! The seven scenarios. Each returns a [`Section`] for the results; figures that later
//! scenarios compare against are kept in [`Ctx::memo`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pgcast_events::{Principal, Role};
use serde::Serialize;
use serde_json::json;
use tokio_postgres::NoTls;
use uuid::Uuid;

use crate::cli::{Args, Sizes};
use crate::clients::{self, report, Conn, ListenReader, Mode, ReaderReport, Readers, Setup, Tally};
use crate::env::{Database, Server};
use crate::load::{self, Mix, Outcome, Plan, World};
use crate::report::{cpu_line, int, ms, reader_row, table, Check, Section, READER_HEADERS};
use crate::stats::{now_us, round3, rss_kib, CpuSample, CpuUse, Pids};
use crate::ws::WsTarget;

/// A drain ends when every expected frame arrived, when nothing arrived for this long, or
/// at `DRAIN_MAX`.
const DRAIN_STALL: Duration = Duration::from_secs(3);
const DRAIN_MAX: Duration = Duration::from_secs(30);
const TOKEN_TTL: Duration = Duration::from_secs(6 * 3600);
/// Receive buffer of connections that get a lot (service subscribers, raw ceiling).
const BIG_BUF: usize = 256 << 10;
const CONN_BUF: usize = 16 << 10;

/// Figures kept for the comparison with other servers.
#[derive(Debug, Default)]
pub(crate) struct Memo {
    fanout: Option<Vec<Step>>,
    ceiling: Option<Vec<CeilingRow>>,
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
            secret,
            pgcast_bin,
            log_dir,
            memo: Memo::default(),
            // Distinct per bench invocation, so rows of an earlier run never count.
            run: (now_us() as u32 ^ std::process::id().wrapping_mul(2_654_435_761)) % 1_000_000
                * 100,
        }
    }

    fn next_run(&mut self) -> u32 {
        self.run += 1;
        self.run
    }

    fn pids(&self, other: Option<u32>) -> Pids {
        Pids {
            pgcast: self.pgcast_pid,
            postmaster: self.postmaster,
            other_server: other,
        }
    }

    fn token(&self, user_id: Uuid, role: Role, workshop_id: Option<Uuid>) -> Result<String> {
        let who = Principal {
            user_id,
            role,
            workshop_id,
        };
        Ok(pgcast_gateway::mint_token(
            self.secret.as_bytes(),
            &who,
            TOKEN_TTL,
        )?)
    }

    fn mechanic_specs(&self, world: &World, topic: Option<&str>) -> Result<Vec<(usize, Setup)>> {
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

    fn service_spec(&self, since: Option<i64>) -> Result<Setup> {
        Ok(Setup::Pgcast {
            token: self.token(Uuid::new_v4(), Role::Service, None)?,
            topic: Some("assignments".into()),
            since,
        })
    }

    /// Tells the cleanup watchdog which children to kill should the bench die.
    fn track(&self, extra: Option<u32>) {
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

    /// Stops the servers this bench started.
    pub(crate) fn shutdown(&mut self) {
        if let Some(s) = self.pgcast.take() {
            s.stop();
        }
    }
}

/// A load run with its readers, drained.
struct Driven {
    writes: Outcome,
    /// Every expected frame arrived before the drain limits.
    drained: bool,
    cpu: CpuUse,
    conns: Vec<Conn>,
    listen: Option<Tally>,
}

async fn drive(
    ctx: &Ctx,
    readers: Readers,
    listen: Option<ListenReader>,
    plan: Plan,
    world: Option<Arc<World>>,
    expected: impl Fn(&Outcome) -> u64,
    other_pid: Option<u32>,
) -> Result<Driven> {
    let clients = load::connect_writers(&ctx.db.config, plan.writers).await?;
    let pids = ctx.pids(other_pid);
    let cpu0 = CpuSample::take(pids);
    let writes = load::run(&clients, plan, world).await;
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
fn every_event_report<'a>(
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

fn conns_report(d: &Driven) -> ReaderReport {
    every_event_report(
        d.conns.iter().map(|c| (c.who, c.connected(), &c.tally)),
        &d.writes,
    )
}

fn listen_report(d: &Driven) -> Option<ReaderReport> {
    d.listen
        .as_ref()
        .map(|t| every_event_report([(0, true, t)], &d.writes))
}

#[derive(Debug, Clone, Serialize)]
struct WriteSummary {
    committed: u64,
    failed: u64,
    seconds: f64,
    commits_per_s: f64,
    statement_rtt: crate::stats::Percentiles,
    first_errors: Vec<String>,
}

fn write_summary(w: &Outcome) -> WriteSummary {
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

fn write_line(w: &WriteSummary) -> String {
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
fn lost_cell(lost: u64, drained: bool) -> String {
    if lost > 0 && !drained {
        format!("{} (undelivered when the drain ended)", int(lost))
    } else {
        int(lost)
    }
}

fn problems(r: &ReaderReport) -> String {
    match &r.first_problem {
        Some(p) => format!("\nFirst problem reported by a connection: `{p}`\n"),
        None => String::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Latency under load

pub(crate) async fn latency(ctx: &mut Ctx) -> Result<Section> {
    let s = ctx.sizes.clone();
    let run = ctx.next_run();
    let world = Arc::new(World::new(s.mechanics, ctx.args.workshops));
    let specs = ctx.mechanic_specs(&world, Some("queue"))?;
    let groups = clients::open(&ctx.target, specs, ctx.args.reader_tasks, 64, CONN_BUF).await;
    let listen = ListenReader::start(&ctx.db.config, run).await?;
    let readers = Readers::start(groups, Mode::Pgcast, run);
    let plan = Plan {
        writers: ctx.args.writers,
        rate: Some(s.rate),
        batch: 1,
        duration: s.duration,
        mix: Mix::Marketplace,
        run,
        seed: ctx.args.seed,
    };
    let w2 = world.clone();
    let d = drive(
        ctx,
        readers,
        Some(listen),
        plan,
        Some(world.clone()),
        move |w| {
            let c = w.counts(&w2);
            (0..w2.mechanics.len())
                .map(|m| w.expected_for(&c, &w2, m))
                .sum()
        },
        None,
    )
    .await?;
    let counts = d.writes.counts(&world);
    let by_seq = d.writes.by_seq();
    let rep = report(
        d.conns.iter().map(|c| (c.who, c.connected(), &c.tally)),
        |m| d.writes.expected_for(&counts, &world, m),
        |m, seq| {
            by_seq
                .get(seq as usize)
                .copied()
                .flatten()
                .is_some_and(|a| world.sees(m, a))
        },
        d.writes.started_us,
        d.writes.ended_us,
    );
    let lrep = listen_report(&d);
    let ws = write_summary(&d.writes);

    let mut md = format!(
        "{} mechanics in {} workshops, each subscribed to `queue`; {} writer connections at {} events/s for {} s: a marketplace mix (20 % general queued inserts, 30 % workshop inserts, 10 % direct offers, 25 % accepts, 15 % edits), each event delivered to every mechanic who could see the row before or after. Latency = frame receipt − the writer's clock just before its statement (same process). A bare LISTEN connection reads a plain `pg_notify(to_jsonb(NEW))` trigger the bench installs beside pgcast's for the run (the database alone, same commits).\n\n",
        int(s.mechanics as u64),
        ctx.args.workshops,
        ctx.args.writers,
        s.rate,
        s.duration.as_secs_f64()
    );
    let mut rows = vec![reader_row("pgcast, mechanics on queue", &rep)];
    if let Some(l) = &lrep {
        rows.push(reader_row("bare LISTEN (database alone)", l));
    }
    md += &table(&READER_HEADERS, rows);
    md += &format!("\n{}\n\n{}\n", write_line(&ws), cpu_line(&d.cpu));
    md += &problems(&rep);

    let full = !ctx.args.quick && s.mechanics >= 1000 && s.rate >= 500.0;
    let tag = if full { "" } else { " (reduced sizes)" };
    let targets = vec![
        Check::new(
            "p50 ≤ 2 ms (1,000 mechanics, 500 events/s)",
            format!("{} ms{tag}", ms(rep.latency.p50_ms)),
            Some(rep.latency.p50_ms <= 2.0),
        ),
        Check::new(
            "p99 ≤ 10 ms",
            format!("{} ms{tag}", ms(rep.latency.p99_ms)),
            Some(rep.latency.p99_ms <= 10.0),
        ),
        Check::new(
            "zero lost (and nothing unexpected)",
            format!(
                "{} lost, {} unexpected, {} duplicates of {} expected",
                int(rep.lost),
                int(rep.unexpected),
                int(rep.duplicates),
                int(rep.expected)
            ),
            Some(rep.lost == 0 && rep.unexpected == 0 && rep.duplicates == 0),
        ),
    ];
    Ok(Section {
        key: "latency".into(),
        title: "1. Latency under load".into(),
        markdown: md,
        data: json!({
            "mechanics": s.mechanics, "workshops": ctx.args.workshops, "rate": s.rate,
            "writers": ctx.args.writers, "duration_s": s.duration.as_secs_f64(),
            "pgcast": rep, "bare_listen": lrep, "writes": ws, "cpu": d.cpu,
        }),
        targets,
        cpu: vec![("load".into(), d.cpu)],
    })
}

// ---------------------------------------------------------------------------------------------
// 2. Ceiling

#[derive(Debug, Clone, Serialize)]
struct CeilingRow {
    rows_per_tx: u32,
    writers: usize,
    commits_per_s: f64,
    delivered_per_s: f64,
    ratio: f64,
    drained: bool,
    reader: ReaderReport,
    bare_listen: Option<ReaderReport>,
    writes: WriteSummary,
    cpu: CpuUse,
}

async fn ceiling_runs(
    ctx: &mut Ctx,
    target: &WsTarget,
    setup: impl Fn(&Ctx) -> Result<Setup>,
    mode: Mode,
    other_pid: Option<u32>,
    with_listen: bool,
) -> Result<Vec<CeilingRow>> {
    let mut out = Vec::new();
    for (batch, writers) in [
        (1, ctx.args.ceiling_writers),
        (100, ctx.args.ceiling_batch_writers),
    ] {
        let run = ctx.next_run();
        let groups = clients::open(target, vec![(0, setup(ctx)?)], 1, 1, BIG_BUF).await;
        if let Some(e) = groups.iter().flatten().find_map(|c| c.tally.ended.clone()) {
            bail!("the subscriber could not connect: {e}");
        }
        if matches!(mode, Mode::Raw(_)) {
            // No acknowledgement in raw mode: give the server a moment to register the socket.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let listen = if with_listen {
            Some(ListenReader::start(&ctx.db.config, run).await?)
        } else {
            None
        };
        let readers = Readers::start(groups, mode.clone(), run);
        let plan = Plan {
            writers,
            rate: None,
            batch,
            duration: ctx.sizes.ceiling_duration,
            mix: Mix::General,
            run,
            seed: ctx.args.seed,
        };
        let d = drive(
            ctx,
            readers,
            listen,
            plan,
            None,
            Outcome::committed,
            other_pid,
        )
        .await?;
        let rep = conns_report(&d);
        let ws = write_summary(&d.writes);
        let ratio = if ws.commits_per_s > 0.0 {
            (rep.delivered_per_s / ws.commits_per_s * 1000.0).round() / 1000.0
        } else {
            0.0
        };
        out.push(CeilingRow {
            rows_per_tx: batch,
            writers,
            commits_per_s: ws.commits_per_s,
            delivered_per_s: rep.delivered_per_s,
            ratio,
            drained: d.drained,
            bare_listen: listen_report(&d),
            reader: rep,
            writes: ws,
            cpu: d.cpu,
        });
    }
    Ok(out)
}

fn ceiling_table(rows: &[CeilingRow], reader: &str) -> String {
    let mut md = table(
        &[
            "rows/transaction",
            "writers",
            "events committed/s",
            "delivered/s",
            "ratio",
            "lost",
            "last frame after last commit",
            "p50 ms",
            "p99 ms",
        ],
        rows.iter()
            .map(|r| {
                vec![
                    r.rows_per_tx.to_string(),
                    r.writers.to_string(),
                    int(r.commits_per_s as u64),
                    int(r.delivered_per_s as u64),
                    format!("{:.3}", r.ratio),
                    lost_cell(r.reader.lost, r.drained),
                    format!("{:.3} s", r.reader.tail_s),
                    ms(r.reader.latency.p50_ms),
                    ms(r.reader.latency.p99_ms),
                ]
            })
            .collect(),
    );
    md += "\n";
    for r in rows {
        let mut t = vec![reader_row(reader, &r.reader)];
        if let Some(l) = &r.bare_listen {
            t.push(reader_row("bare LISTEN (database alone)", l));
        }
        md += &format!("{} row(s) per transaction:\n\n", r.rows_per_tx);
        md += &table(&READER_HEADERS, t);
        md += &format!("\n{}\n\n{}\n", write_line(&r.writes), cpu_line(&r.cpu));
        md += &problems(&r.reader);
        md += "\n";
    }
    md
}

pub(crate) async fn ceiling(ctx: &mut Ctx) -> Result<Section> {
    let target = ctx.target.clone();
    let rows = ceiling_runs(
        ctx,
        &target,
        |c| c.service_spec(None),
        Mode::Pgcast,
        None,
        true,
    )
    .await?;
    let mut md = format!(
        "Writers commit general queued inserts as fast as the database takes them, for {} s per run; one `service` subscriber on `assignments` receives every event. Ratio = delivered rate (distinct events from the first write to the last frame) ÷ commit rate.\n\n",
        ctx.sizes.ceiling_duration.as_secs_f64()
    );
    md += &ceiling_table(&rows, "pgcast, service on assignments");
    let targets = rows
        .iter()
        .map(|r| {
            Check::new(
                &format!(
                    "delivered ≥ 99 % of commits, {} row(s)/transaction",
                    r.rows_per_tx
                ),
                format!(
                    "{:.3} ({}/s of {}/s), {} lost",
                    r.ratio,
                    int(r.delivered_per_s as u64),
                    int(r.commits_per_s as u64),
                    int(r.reader.lost)
                ),
                Some(r.ratio >= 0.99 && r.reader.lost == 0),
            )
        })
        .collect();
    let cpu = rows
        .iter()
        .map(|r| (format!("{} row(s)/tx", r.rows_per_tx), r.cpu))
        .collect();
    let data = json!({ "runs": rows });
    ctx.memo.ceiling = Some(rows);
    Ok(Section {
        key: "ceiling".into(),
        title: "2. Ceiling (keeps up with the database)".into(),
        markdown: md,
        data,
        targets,
        cpu,
    })
}

// ---------------------------------------------------------------------------------------------
// 3. Fan-out

#[derive(Debug, Clone, Serialize)]
struct Step {
    events_per_s: f64,
    connections: usize,
    offered_deliveries_per_s: f64,
    delivered_per_s: f64,
    sustained: bool,
    /// Every frame arrived before the drain limit (otherwise `lost` counts frames the server
    /// still had queued).
    drained: bool,
    reader: ReaderReport,
    bare_listen: Option<ReaderReport>,
    writes: WriteSummary,
    cpu: CpuUse,
}

async fn fanout_sweep(
    ctx: &mut Ctx,
    target: &WsTarget,
    specs: Vec<(usize, Setup)>,
    mode: Mode,
    other_pid: Option<u32>,
    with_listen: bool,
) -> Result<Vec<Step>> {
    let tasks = ctx.args.reader_tasks;
    let mut groups = clients::open(target, specs, tasks, 64, CONN_BUF).await;
    if matches!(mode, Mode::Raw(_)) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut steps = Vec::new();
    for rate in ctx.sizes.fanout_rates.clone() {
        let run = ctx.next_run();
        let live: usize = groups.iter().flatten().filter(|c| c.connected()).count();
        if live == 0 {
            bail!(
                "no connection could be opened: {}",
                groups
                    .iter()
                    .flatten()
                    .find_map(|c| c.tally.ended.clone())
                    .unwrap_or_default()
            );
        }
        let listen = if with_listen {
            Some(ListenReader::start(&ctx.db.config, run).await?)
        } else {
            None
        };
        let readers = Readers::start(groups, mode.clone(), run);
        let plan = Plan {
            writers: ctx.args.writers,
            rate: Some(rate),
            batch: 1,
            duration: ctx.sizes.fanout_step,
            mix: Mix::General,
            run,
            seed: ctx.args.seed,
        };
        let d = drive(
            ctx,
            readers,
            listen,
            plan,
            None,
            move |w| w.committed() * live as u64,
            other_pid,
        )
        .await?;
        let rep = conns_report(&d);
        let ws = write_summary(&d.writes);
        let offered = ws.commits_per_s * rep.connected as f64;
        let sustained = rep.lost == 0
            && rep.ended_early == 0
            && rep.delivered_per_s >= 0.95 * offered
            && ws.commits_per_s >= 0.95 * rate;
        steps.push(Step {
            events_per_s: rate,
            connections: rep.connected,
            offered_deliveries_per_s: offered.round(),
            delivered_per_s: rep.delivered_per_s,
            sustained,
            drained: d.drained,
            bare_listen: listen_report(&d),
            reader: rep,
            writes: ws,
            cpu: d.cpu,
        });
        groups = clients::regroup(d.conns, tasks);
        if !sustained {
            break;
        }
    }
    Ok(steps)
}

fn steps_table(steps: &[Step]) -> String {
    table(
        &[
            "events/s",
            "connections",
            "offered deliveries/s",
            "delivered/s",
            "sustained",
            "lost",
            "ended early",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "LISTEN p99 ms",
            "CPU bench/pgcast/pg/other",
        ],
        steps
            .iter()
            .map(|s| {
                vec![
                    int(s.events_per_s as u64),
                    int(s.connections as u64),
                    int(s.offered_deliveries_per_s as u64),
                    int(s.delivered_per_s as u64),
                    if s.sustained { "yes" } else { "**no**" }.into(),
                    lost_cell(s.reader.lost, s.drained),
                    int(s.reader.ended_early as u64),
                    ms(s.reader.latency.p50_ms),
                    ms(s.reader.latency.p90_ms),
                    ms(s.reader.latency.p99_ms),
                    ms(s.reader.latency.max_ms),
                    s.bare_listen
                        .as_ref()
                        .map_or("–".into(), |l| ms(l.latency.p99_ms)),
                    format!(
                        "{:.2}/{}/{}/{}",
                        s.cpu.bench_cores,
                        s.cpu.pgcast_cores.map_or("–".into(), |v| format!("{v:.2}")),
                        s.cpu
                            .postgres_cores
                            .map_or("–".into(), |v| format!("{v:.2}")),
                        s.cpu
                            .other_server_cores
                            .map_or("–".into(), |v| format!("{v:.2}")),
                    ),
                ]
            })
            .collect(),
    )
}

pub(crate) async fn fanout(ctx: &mut Ctx) -> Result<Section> {
    let s = ctx.sizes.clone();
    let world = World::new(s.fanout_connections, ctx.args.workshops);
    let specs = ctx.mechanic_specs(&world, Some("queue"))?;
    let target = ctx.target.clone();
    let steps = fanout_sweep(ctx, &target, specs, Mode::Pgcast, None, true).await?;
    let mut md = format!(
        "{} mechanics subscribed to `queue`; {} writers insert general queued assignments (visible to every mechanic) at each offered rate for {} s. A step is sustained when nothing is lost, no connection is closed, and the delivered rate is ≥ 95 % of the offered one; the sweep stops after the first step that is not.\n\n",
        int(s.fanout_connections as u64),
        ctx.args.writers,
        s.fanout_step.as_secs_f64()
    );
    md += &steps_table(&steps);
    for st in &steps {
        md += &problems(&st.reader);
    }
    let best = steps
        .iter()
        .filter(|s| s.sustained)
        .map(|s| s.delivered_per_s)
        .fold(0.0, f64::max);
    let at_million = steps
        .iter()
        .find(|s| s.offered_deliveries_per_s >= 950_000.0);
    let targets = vec![
        Check::new(
            "≥ 1,000,000 frame deliveries/s sustained (1,000 connections)",
            format!("{}/s (best sustained step)", int(best as u64)),
            Some(best >= 1_000_000.0),
        ),
        match at_million {
            Some(st) => Check::new(
                "p99 ≤ 50 ms at that rate",
                format!(
                    "{} ms at {} deliveries/s offered{}",
                    ms(st.reader.latency.p99_ms),
                    int(st.offered_deliveries_per_s as u64),
                    if st.sustained { "" } else { " (not sustained)" }
                ),
                Some(st.sustained && st.reader.latency.p99_ms <= 50.0),
            ),
            None => Check::new(
                "p99 ≤ 50 ms at that rate",
                "not reached: the sweep stopped before 1,000,000 deliveries/s were offered".into(),
                if steps.iter().all(|s| s.sustained) {
                    None
                } else {
                    Some(false)
                },
            ),
        },
    ];
    let cpu = steps
        .iter()
        .map(|s| (format!("{} events/s", int(s.events_per_s as u64)), s.cpu))
        .collect();
    let data = json!({ "connections": s.fanout_connections, "step_s": s.fanout_step.as_secs_f64(), "steps": steps });
    ctx.memo.fanout = Some(steps);
    Ok(Section {
        key: "fanout".into(),
        title: "3. Fan-out".into(),
        markdown: md,
        data,
        targets,
        cpu,
    })
}

// ---------------------------------------------------------------------------------------------
// 4. Memory

pub(crate) async fn memory(ctx: &mut Ctx) -> Result<Section> {
    let mut n = ctx.sizes.memory_connections;
    let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
    // Our sockets, pgcast's (it inherited the same limit), and some spare descriptors.
    let room = soft.saturating_sub(300) as usize;
    let mut md = String::new();
    if n > room {
        md += &format!(
            "The open-file limit ({soft}, hard {hard}) leaves room for {room} connections: measuring {room} instead of {n}.\n\n"
        );
        n = room;
    }
    // A fresh pgcast, so that "0 connections" is a clean baseline.
    if let (Some(old), Some(bin)) = (ctx.pgcast.take(), ctx.pgcast_bin.clone()) {
        old.stop();
        let log = ctx.log_dir.join("pgcast-memory.log");
        let server = Server::pgcast(&bin, &ctx.db, &ctx.secret, log)?;
        ctx.target = server.target.clone();
        ctx.pgcast_pid = Some(server.pid);
        ctx.pgcast = Some(server);
        ctx.track(None);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let Some(pid) = ctx.pgcast_pid else {
        bail!("pgcast's process id is unknown (give --pgcast-pid with --ws-url)");
    };
    let rss0 = rss_kib(pid).context("read pgcast's VmRSS")?;
    let bench0 = rss_kib(std::process::id()).unwrap_or(0);
    let run = ctx.next_run();
    let mut specs = Vec::with_capacity(n);
    for i in 0..n {
        specs.push((
            i,
            Setup::Pgcast {
                token: ctx.token(Uuid::new_v4(), Role::Mechanic, None)?,
                topic: None,
                since: None,
            },
        ));
    }
    let t0 = Instant::now();
    let groups = clients::open(&ctx.target, specs, ctx.args.reader_tasks, 128, 1024).await;
    let connect_s = t0.elapsed().as_secs_f64();
    let connected = groups.iter().flatten().filter(|c| c.connected()).count();
    let failure = groups.iter().flatten().find_map(|c| c.tally.ended.clone());
    let readers = Readers::start(groups, Mode::Pgcast, run);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss1 = rss_kib(pid).context("read pgcast's VmRSS")?;
    let bench1 = rss_kib(std::process::id()).unwrap_or(0);
    let conns = readers.finish().await;
    let ended = conns.iter().filter(|c| c.tally.ended.is_some()).count();
    drop(conns);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss2 = rss_kib(pid).unwrap_or(0);
    let per_conn = if connected > 0 {
        (rss1.saturating_sub(rss0)) as f64 / connected as f64
    } else {
        0.0
    };
    let bench_per_conn = if connected > 0 {
        (bench1.saturating_sub(bench0)) as f64 / connected as f64
    } else {
        0.0
    };
    md += &format!(
        "A fresh pgcast process; {} WebSocket connections opened (128 at a time) and authenticated (`auth` → `ready`), then left idle for 3 s; resident memory is `VmRSS` of the pgcast process.\n\n",
        int(n as u64)
    );
    md += &table(
        &["", "pgcast VmRSS"],
        vec![
            vec!["0 connections".into(), format!("{} KiB", int(rss0))],
            vec![
                format!("{} idle authenticated connections", int(connected as u64)),
                format!("{} KiB", int(rss1)),
            ],
            vec![
                "after they closed (2 s later)".into(),
                format!("{} KiB", int(rss2)),
            ],
            vec!["per connection".into(), format!("**{per_conn:.1} KiB**")],
        ],
    );
    md += &format!(
        "\nOpening and authenticating took {connect_s:.1} s; {} connections ended before the measurement was over. The load generator itself grew by {bench_per_conn:.1} KiB per connection.\n",
        int(ended as u64)
    );
    if let Some(f) = &failure {
        md += &format!("\nFirst connection failure: `{f}`\n");
    }
    let full = n >= 10_000;
    let targets = vec![
        Check::new(
            "≤ 16 KiB resident per idle authenticated connection",
            format!("{per_conn:.1} KiB"),
            Some(connected > 0 && per_conn <= 16.0),
        ),
        Check::new(
            "10,000 connections held",
            format!(
                "{} of {} connected, {} ended early",
                int(connected as u64),
                int(n as u64),
                ended
            ),
            full.then_some(connected == n && ended == 0),
        ),
    ];
    Ok(Section {
        key: "memory".into(),
        title: "4. Memory per connection".into(),
        markdown: md,
        data: json!({
            "connections": n, "connected": connected, "ended_early": ended, "connect_s": round3(connect_s),
            "rss_kib_0": rss0, "rss_kib_n": rss1, "rss_kib_after_close": rss2,
            "kib_per_connection": round3(per_conn), "bench_kib_per_connection": round3(bench_per_conn),
            "fd_limit_soft": soft, "fd_limit_hard": hard, "first_failure": failure,
        }),
        targets,
        cpu: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// 5. Catch-up

pub(crate) async fn catchup(ctx: &mut Ctx) -> Result<Section> {
    let n = ctx.sizes.catchup_events;
    let run = ctx.next_run();
    let (client, connection) = ctx.db.config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let since = log_head(&client).await?;
    let t = Instant::now();
    load::bulk_insert(&client, run, n, 1000).await?;
    let insert_s = t.elapsed().as_secs_f64();
    let last = log_head(&client).await?;
    // Let pgcast's listener digest the live notifications of the inserts first.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let pids = ctx.pids(None);
    let cpu0 = CpuSample::take(pids);
    let start_us = now_us();
    let groups = clients::open(
        &ctx.target,
        vec![(0, ctx.service_spec(Some(since))?)],
        1,
        1,
        BIG_BUF,
    )
    .await;
    let subscribed_us = now_us();
    if let Some(e) = groups.iter().flatten().find_map(|c| c.tally.ended.clone()) {
        bail!("the resuming client could not subscribe: {e}");
    }
    let readers = Readers::start(groups, Mode::Pgcast, run);
    let deadline = Instant::now() + Duration::from_secs(120);
    while readers.received() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let conns = readers.finish().await;
    let cpu = cpu0.until(&CpuSample::take(pids));
    let tally = &conns[0].tally;
    let rep = report(
        [(0, true, tally)],
        |_| n,
        |_, seq| seq < n,
        start_us,
        start_us,
    );
    let caught_up_s = tally.last_us.saturating_sub(start_us) as f64 / 1e6;
    let reached = tally.last_position >= last && rep.lost == 0;
    let mut md = format!(
        "{} events were committed (1,000-row transactions, {:.1} s), then a `service` client connected, authenticated and subscribed to `assignments` with `since` = the position before them. Time = from the start of its connection to the receipt of the last event.\n\n",
        int(n),
        insert_s
    );
    md += &table(
        &[
            "events behind",
            "received",
            "lost",
            "out of order",
            "subscribed after",
            "caught up after",
            "events/s",
            "last position / head",
        ],
        vec![vec![
            int(n),
            int(rep.received),
            int(rep.lost),
            int(tally.out_of_order),
            format!("{:.3} s", (subscribed_us - start_us) as f64 / 1e6),
            format!("**{caught_up_s:.3} s**"),
            int((rep.received as f64 / caught_up_s.max(1e-9)) as u64),
            format!("{} / {}", tally.last_position, last),
        ]],
    );
    md += &format!("\n{}\n", cpu_line(&cpu));
    md += &problems(&rep);
    let target_n = 100_000;
    Ok(Section {
        key: "catchup".into(),
        title: "5. Catch-up".into(),
        markdown: md,
        targets: vec![Check::new(
            "a client 100,000 events behind is caught up in < 2 s",
            format!(
                "{caught_up_s:.3} s for {} events{}",
                int(n),
                if n >= target_n { "" } else { " (reduced size)" }
            ),
            Some(reached && caught_up_s < 2.0),
        )],
        data: json!({
            "events": n, "insert_s": round3(insert_s), "since": since, "head": last,
            "subscribed_s": round3((subscribed_us - start_us) as f64 / 1e6),
            "caught_up_s": round3(caught_up_s), "last_position": tally.last_position,
            "reader": rep, "cpu": cpu,
        }),
        cpu: vec![("replay".into(), cpu)],
    })
}

async fn log_head(client: &tokio_postgres::Client) -> Result<i64> {
    let row = client
        .query_one(
            "SELECT coalesce(max(position), 0) FROM pgcast.assignment_events",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

// ---------------------------------------------------------------------------------------------
// 6. Overhead versus the database alone

pub(crate) async fn overhead(ctx: &mut Ctx) -> Result<Section> {
    let s = ctx.sizes.clone();
    let run = ctx.next_run();
    let world = Arc::new(World::new(100, ctx.args.workshops));
    let groups = clients::open(
        &ctx.target,
        vec![(0, ctx.service_spec(None)?)],
        1,
        1,
        BIG_BUF,
    )
    .await;
    if let Some(e) = groups.iter().flatten().find_map(|c| c.tally.ended.clone()) {
        bail!("the service subscriber could not connect: {e}");
    }
    let listen = ListenReader::start(&ctx.db.config, run).await?;
    let readers = Readers::start(groups, Mode::Pgcast, run);
    let plan = Plan {
        writers: ctx.args.writers,
        rate: Some(s.rate),
        batch: 1,
        duration: s.duration,
        mix: Mix::Marketplace,
        run,
        seed: ctx.args.seed,
    };
    let d = drive(
        ctx,
        readers,
        Some(listen),
        plan,
        Some(world),
        Outcome::committed,
        None,
    )
    .await?;
    let rep = conns_report(&d);
    let lrep = listen_report(&d).unwrap_or_default();
    let ws = write_summary(&d.writes);
    let delta = |a: f64, b: f64| format!("{:+.2} ms", a - b);
    let mut md = format!(
        "The same marketplace load as scenario 1 ({} events/s for {} s) read at once by a bare tokio-postgres LISTEN connection (the database alone: a plain `pg_notify(to_jsonb(NEW))` row trigger the bench installs beside pgcast's for the run, NOTIFY, one socket) and by one pgcast `service` subscriber on `assignments` (doorbell NOTIFY, log read, decoding, routing, serialization, WebSocket). The difference is what pgcast adds, the doorbell's log read included.\n\n",
        s.rate,
        s.duration.as_secs_f64()
    );
    md += &table(
        &READER_HEADERS,
        vec![
            reader_row("bare LISTEN (database alone)", &lrep),
            reader_row("pgcast service subscriber", &rep),
        ],
    );
    md += &format!(
        "\nAdded by the gateway: p50 {}, p90 {}, p99 {}.\n\n{}\n\n{}\n",
        delta(rep.latency.p50_ms, lrep.latency.p50_ms),
        delta(rep.latency.p90_ms, lrep.latency.p90_ms),
        delta(rep.latency.p99_ms, lrep.latency.p99_ms),
        write_line(&ws),
        cpu_line(&d.cpu)
    );
    md += &problems(&rep);
    Ok(Section {
        key: "overhead".into(),
        title: "6. Overhead versus the database alone".into(),
        markdown: md,
        data: json!({
            "rate": s.rate, "duration_s": s.duration.as_secs_f64(),
            "bare_listen": lrep, "pgcast_service": rep, "writes": ws, "cpu": d.cpu,
            "added_p50_ms": round3(rep.latency.p50_ms - lrep.latency.p50_ms),
            "added_p99_ms": round3(rep.latency.p99_ms - lrep.latency.p99_ms),
        }),
        targets: Vec::new(),
        cpu: vec![("load".into(), d.cpu)],
    })
}

// ---------------------------------------------------------------------------------------------
// 7. Other servers

pub(crate) async fn raw(ctx: &mut Ctx) -> Result<Section> {
    let pointer = crate::jsonptr::Pointer::parse(&ctx.args.raw_id_pointer)?;
    let mut md = format!(
        "The loads of scenarios 2 and 3 pointed at WebSocket servers that forward NOTIFY payloads as text frames, to every connection (they do no auth, no routing, no resume). pgcast's NOTIFY is a doorbell without content, so for this scenario the bench installs the trigger such a server is usually fed by — a plain `pg_notify('pgcast_bench_bare', to_jsonb(NEW)::text)` row trigger, beside pgcast's — and the servers forward that channel. A frame counts as an event when the JSON pointer `{}` resolves in it.\n\n",
        ctx.args.raw_id_pointer
    );
    let mut targets = Vec::new();
    let mut cpu = Vec::new();
    let mut data = serde_json::Map::new();
    let mut servers: Vec<(String, WsTarget, Option<String>, Option<Server>)> = Vec::new();
    if let Some(url) = &ctx.args.raw_url {
        servers.push((
            format!("raw {url}"),
            crate::ws::parse_ws_url(url)?,
            ctx.args.raw_first_frame.clone(),
            None,
        ));
    }
    if ctx.args.compare_node {
        let log = ctx.log_dir.join("node-relay.log");
        let relay = Server::node_relay(&ctx.args.node_relay_dir, &ctx.db, log)?;
        ctx.track(Some(relay.pid));
        servers.push((
            "Node.js pg + ws relay (bench/node-relay)".into(),
            relay.target.clone(),
            None,
            Some(relay),
        ));
    }
    for (name, target, first_frame, server) in servers {
        let pid = server.as_ref().map(|s| s.pid);
        let n = ctx.sizes.fanout_connections;
        let specs: Vec<(usize, Setup)> = (0..n)
            .map(|i| {
                (
                    i,
                    Setup::Raw {
                        first_frame: first_frame.clone(),
                    },
                )
            })
            .collect();
        let mode = Mode::Raw(pointer.clone());
        // The channel these servers forward is fed by the baseline trigger, for this run only.
        let trigger = clients::BareTrigger::install(&ctx.db.config).await?;
        let result = async {
            let steps = fanout_sweep(ctx, &target, specs, mode.clone(), pid, false).await?;
            let ff = first_frame.clone();
            let ceil = ceiling_runs(
                ctx,
                &target,
                move |_| {
                    Ok(Setup::Raw {
                        first_frame: ff.clone(),
                    })
                },
                mode.clone(),
                pid,
                false,
            )
            .await?;
            Ok::<_, anyhow::Error>((steps, ceil))
        }
        .await;
        trigger.remove().await;
        if let Some(s) = server {
            s.stop();
        }
        let (steps, ceil) = result.with_context(|| format!("{name} ({})", target.url))?;
        md += &format!("### {name}\n\nFan-out ({} connections):\n\n", int(n as u64));
        md += &steps_table(&steps);
        md += "\nCeiling (one connection):\n\n";
        md += &ceiling_table(&ceil, &name);
        for s in &steps {
            cpu.push((
                format!("{name}, fan-out {} events/s", int(s.events_per_s as u64)),
                s.cpu,
            ));
        }
        for r in &ceil {
            cpu.push((
                format!("{name}, ceiling {} row(s)/tx", r.rows_per_tx),
                r.cpu,
            ));
        }
        if let Some(ours) = &ctx.memo.fanout {
            // The highest delivered rate of any step, sustained or not: a server that falls
            // behind still delivers at its own pace (its backlog shows in the latency).
            let peak = |v: &[Step]| v.iter().map(|s| s.delivered_per_s).fold(0.0, f64::max);
            let (p_ours, p_theirs) = (peak(ours), peak(&steps));
            targets.push(Check::new(
                &format!("≥ 2× the delivered rate of {name}"),
                format!(
                    "pgcast {}/s vs {}/s: {:.2}×",
                    int(p_ours as u64),
                    int(p_theirs as u64),
                    p_ours / p_theirs.max(1.0)
                ),
                Some(p_ours >= 2.0 * p_theirs),
            ));
            // p99 at the highest offered rate both were put under.
            let common = ours
                .iter()
                .filter_map(|a| {
                    steps
                        .iter()
                        .find(|b| b.events_per_s == a.events_per_s)
                        .map(|b| (a, b))
                })
                .next_back();
            targets.push(match common {
                Some((a, b)) => Check::new(
                    &format!("≤ ½ the p99 of {name}"),
                    format!(
                        "at {} events/s: pgcast {} ms vs {} ms",
                        int(a.events_per_s as u64),
                        ms(a.reader.latency.p99_ms),
                        ms(b.reader.latency.p99_ms)
                    ),
                    Some(a.reader.latency.p99_ms <= 0.5 * b.reader.latency.p99_ms),
                ),
                None => Check::new(
                    &format!("≤ ½ the p99 of {name}"),
                    "no common step".into(),
                    None,
                ),
            });
        }
        if let Some(ours) = &ctx.memo.ceiling {
            let mut rows = Vec::new();
            for (a, b) in ours.iter().zip(&ceil) {
                rows.push(vec![
                    a.rows_per_tx.to_string(),
                    format!("{} ({:.3})", int(a.delivered_per_s as u64), a.ratio),
                    format!("{} ({:.3})", int(b.delivered_per_s as u64), b.ratio),
                    ms(a.reader.latency.p99_ms),
                    ms(b.reader.latency.p99_ms),
                ]);
            }
            md += &format!("Ceiling, pgcast versus {name}:\n\n");
            md += &table(
                &[
                    "rows/tx",
                    "pgcast delivered/s (ratio)",
                    "other delivered/s (ratio)",
                    "pgcast p99 ms",
                    "other p99 ms",
                ],
                rows,
            );
            md += "\n";
        }
        data.insert(
            name.clone(),
            json!({ "url": target.url, "fanout": steps, "ceiling": ceil }),
        );
    }
    if ctx.memo.fanout.is_none() {
        md += "\n(Run the `fanout` scenario in the same invocation to compare with pgcast.)\n";
    }
    Ok(Section {
        key: "raw".into(),
        title: "7. Other servers".into(),
        markdown: md,
        data: serde_json::Value::Object(data),
        targets,
        cpu,
    })
}
