//! Scenario 8, the reconnect storm (issue 12): many mechanics on `queue` while writers commit
//! a marketplace mix; pgcast is SIGKILLed, stays dead for `--storm-down`, and is started again
//! on the same port. Every mechanic notices its socket end, reconnects with jittered
//! exponential backoff like a real client, and resumes with `since` = the last position it
//! received.
//!
//! ```text
//!  writers  ─ commit ─ commit ─ commit ─ commit ─ commit ─ commit ─ commit ─ commit ─▶
//!  pgcast   ═══════════╡ SIGKILL      (down)      start ─ ready ═════════════════════
//!  mechanic ─ events ──┤ end ─ attempt ─ attempt ─ … ─ subscribed(since) ─ replay ─ live
//!                      kill                             ready ├ reconnect ┤
//!                                                             ├── time to live ──────┤
//! ```
//!
//! Measured per mechanic: when it re-subscribed (from the kill and from the moment the new
//! process logged ready), and its *time to live*: from ready until it holds every event it may
//! see that was committed before ready (it is caught up). Afterwards each one's received set
//! is checked against what the writers committed and who may see it (docs/architecture.md §5): nothing
//! lost, nothing extra, no duplicates; `resync`, `unavailable` and close codes are counted.
//! Commit times and positions come from the log itself, read once after the run.
//!
//! The load generator stays light: each connection is one future in a few `FuturesUnordered`
//! (as in `clients`), event frames are recognised by a prefix and their marker and position
//! found by substring scans; only the rare control frames (`subscribed`, `resync`, `error`)
//! are parsed.

mod figures;
mod mechanic;
mod summary;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use pgcast_events::Role;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::load::{self, find_marker, Mix, Outcome, Plan, World};
use crate::report::Section;
use crate::stats::{now_us, round3, CpuSample};

use self::figures::{tally, Figures, Timeline};
use self::mechanic::{group, Mech, Shared, State};
use self::summary::{checks, describe};
use super::context::{log_head, Ctx, DRAIN_STALL};

/// Writes before the kill, with every mechanic connected: the steady state.
const BEFORE: Duration = Duration::from_secs(3);
/// Initial connections set up at once (the storm itself has no such bound).
const OPEN_CONCURRENCY: usize = 128;
/// After ready: how long everyone may take to come back and catch up before the run ends.
const RECOVERY_MAX: Duration = Duration::from_secs(60);
const FULL_SIZE: usize = 10_000;

/// A free loopback port below the ephemeral range. While pgcast is down its clients keep
/// connecting to the port; one with a port in that range could be given the very same port
/// as its source and connect to itself (TCP simultaneous open), holding it against the
/// restart.
fn stable_port() -> Result<u16> {
    let low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let start = low.saturating_sub(10_000).max(1025);
    let span = low.saturating_sub(start).max(1);
    let offset = rand::random::<u32>() % span;
    for i in 0..span {
        let port = (start + (offset + i) % span) as u16;
        if std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port below the ephemeral range ({low})")
}

/// TCP counters of this network namespace (`/proc/net/netstat`) that tell why connections
/// waited: the listener's accept queue overflowed (the SYN or the handshake's last ACK was
/// dropped) and SYNs had to be sent again (after 1 s, then 3 s, …).
const TCP_COUNTERS: [&str; 3] = ["ListenOverflows", "ListenDrops", "TCPSynRetrans"];

fn tcp_counters() -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return BTreeMap::new();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter(|(n, _)| TCP_COUNTERS.contains(n))
        .filter_map(|(n, v)| Some((n.to_owned(), v.parse().ok()?)))
        .collect()
}

fn counters_since(before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    tcp_counters()
        .into_iter()
        .map(|(k, v)| {
            let d = v.saturating_sub(before.get(&k).copied().unwrap_or(0));
            (k, d)
        })
        .collect()
}

fn unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn skipped(reason: &str) -> Section {
    eprintln!("   skipped: {reason}");
    Section {
        key: "storm".into(),
        title: "8. Reconnect storm (skipped)".into(),
        markdown: format!("Skipped: {reason}\n"),
        data: json!({ "skipped": reason }),
        targets: Vec::new(),
        cpu: Vec::new(),
    }
}

/// Position and commit time (unix µs) of each of run `run`'s events, by sequence number.
async fn read_log(
    pg: &tokio_postgres::Config,
    after: i64,
    run: u32,
    len: usize,
) -> Result<Vec<Option<(i64, i64)>>> {
    let (client, connection) = pg.connect(NoTls).await?;
    let driver = tokio::spawn(connection);
    let rows = client
        .query(
            "SELECT c.first_position + ch.ordinal - 1, \
                    (extract(epoch FROM c.committed_at) * 1000000)::bigint, \
                    ch.event -> 'row' ->> 'customer_name' \
             FROM pgcast.committed_statements c \
             JOIN pgcast.assignment_changes ch ON ch.statement = c.statement \
             WHERE c.last_position > $1 AND c.first_position + ch.ordinal - 1 > $1",
            &[&after],
        )
        .await
        .context("read the log of the run")?;
    drop(client);
    let _ = driver.await;
    let mut logged = vec![None; len];
    for row in rows {
        let name: Option<String> = row.get(2);
        let Some(m) = name.as_deref().and_then(|n| find_marker(n.as_bytes())) else {
            continue;
        };
        if m.run == run {
            if let Some(slot) = logged.get_mut(m.seq as usize) {
                *slot = Some((row.get(0), row.get(1)));
            }
        }
    }
    Ok(logged)
}

pub(crate) async fn run(ctx: &mut Ctx) -> Result<Section> {
    if ctx.args.ws_url.is_some() {
        return Ok(skipped(
            "the reconnect storm kills and restarts pgcast, so it needs a pgcast of its own; it does not run against --ws-url.",
        ));
    }
    if ctx.pgcast_bin.is_none() {
        return Ok(skipped("no pgcast binary to start."));
    }
    let s = ctx.sizes.clone();
    let mut n = s.storm_mechanics;
    let mut md = String::new();
    let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
    // Our sockets, pgcast's (it inherits the same limit), and some spare descriptors.
    let room = soft.saturating_sub(300) as usize;
    if n > room {
        md += &format!(
            "The open-file limit ({soft}, hard {hard}) leaves room for {room} connections: measuring {room} mechanics instead of {n}.\n\n"
        );
        n = room;
    }
    let workshops = ctx.args.storm_workshops;
    let world = {
        let ws: Vec<Uuid> = (0..workshops).map(|_| Uuid::new_v4()).collect();
        World {
            mechanics: (0..n)
                .map(|i| {
                    let w = (workshops > 0 && i % 5 != 4).then(|| (i % workshops) as u16);
                    (Uuid::new_v4(), w)
                })
                .collect(),
            workshops: ws,
        }
    };
    let world = Arc::new(world);

    // A pgcast of this scenario's own, on a port that outlives the process.
    let port = stable_port()?;
    let listen = format!("127.0.0.1:{port}");
    ctx.restart_pgcast(&listen, "pgcast-storm-1.log").await?;

    // Distinct from the runs of the other scenarios (below 10^8), so their rows never count.
    let run = 1_000_000_000 + rand::random::<u32>() % 1_000_000_000;
    let mut mechs = Vec::with_capacity(n);
    for (who, (id, w)) in world.mechanics.iter().enumerate() {
        let workshop = w.map(|w| world.workshops[usize::from(w)]);
        mechs.push(Mech {
            who,
            token: ctx.token(*id, Role::Mechanic, workshop)?,
            ws: None,
            st: State::default(),
        });
    }
    let shared = Arc::new(Shared {
        target: ctx.target.clone(),
        run,
        kill_us: AtomicU64::new(0),
        open: Semaphore::new(OPEN_CONCURRENCY),
        initial_done: AtomicUsize::new(0),
        initial_ok: AtomicUsize::new(0),
        resubscribed: AtomicUsize::new(0),
        distinct: AtomicU64::new(0),
    });
    let stop = CancellationToken::new();
    // However this scenario ends, the mechanics stop.
    let _stop_guard = stop.clone().drop_guard();
    let groups = ctx.args.reader_tasks.max(1);
    let mut split: Vec<Vec<Mech>> = (0..groups).map(|_| Vec::new()).collect();
    for (i, m) in mechs.into_iter().enumerate() {
        split[i % groups].push(m);
    }
    let tasks: Vec<JoinHandle<Vec<Mech>>> = split
        .into_iter()
        .map(|g| tokio::spawn(group(g, shared.clone(), stop.clone())))
        .collect();

    let t_open = Instant::now();
    while shared.initial_done.load(Ordering::Relaxed) < n {
        if t_open.elapsed() > Duration::from_secs(120) {
            bail!("the mechanics' first connections did not finish within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected_at_start = shared.initial_ok.load(Ordering::Relaxed);
    if connected_at_start == 0 {
        stop.cancel();
        let mut first = None;
        for t in tasks {
            for m in t.await.unwrap_or_default() {
                first = first.or(m.st.initial_failure);
            }
        }
        bail!("no mechanic could connect: {}", first.unwrap_or_default());
    }
    let open_s = t_open.elapsed().as_secs_f64();

    // The writers: before, during and after the outage.
    let writers = load::connect_writers(&ctx.db.config, ctx.args.writers).await?;
    let plan = Plan {
        writers: ctx.args.writers,
        rate: Some(s.storm_rate),
        batch: 1,
        duration: BEFORE + ctx.args.storm_down + s.storm_after,
        mix: Mix::Marketplace,
        run,
        seed: ctx.args.seed,
    };
    let log_start = log_head(&ctx.db.config).await?;
    let cpu0 = CpuSample::take(ctx.pids(None));
    let w2 = world.clone();
    let mut writes_task = tokio::spawn(async move { load::run(&writers, plan, Some(w2)).await });
    tokio::time::sleep(BEFORE).await;
    let steady_cpu = cpu0.until(&CpuSample::take(ctx.pids(None)));

    // The crash.
    let connected_at_kill = shared.initial_ok.load(Ordering::Relaxed);
    let tcp0 = tcp_counters();
    let kill_wall = unix_us();
    let kill_us = now_us();
    shared.kill_us.store(kill_us, Ordering::Relaxed);
    let old = ctx
        .pgcast
        .take()
        .ok_or_else(|| anyhow!("no pgcast to kill"))?;
    tokio::task::spawn_blocking(move || old.kill()).await??;
    ctx.track(None);
    eprintln!(
        "   pgcast SIGKILLed; restarting it in {:?}",
        ctx.args.storm_down
    );
    tokio::time::sleep(ctx.args.storm_down).await;
    let respawn_us = now_us();
    ctx.restart_pgcast(&listen, "pgcast-storm-2.log")
        .await
        .context("restart pgcast on the same port")?;
    let ready_us = now_us();
    let ready_wall = unix_us();
    let tcp_until_ready = counters_since(&tcp0);
    let cpu1 = CpuSample::take(ctx.pids(None));

    // Recovery: everyone back, writes over, every event delivered (or no progress).
    let deadline = Instant::now() + RECOVERY_MAX;
    let mut writes: Option<Outcome> = None;
    let mut want = u64::MAX;
    let mut last = u64::MAX;
    let mut changed = Instant::now();
    let drained = loop {
        if writes.is_none() && writes_task.is_finished() {
            let w = (&mut writes_task).await.context("the writers failed")?;
            let c = w.counts(&world);
            want = (0..n).map(|m| w.expected_for(&c, &world, m)).sum();
            writes = Some(w);
        }
        let back = shared.resubscribed.load(Ordering::Relaxed) >= connected_at_kill;
        let got = shared.distinct.load(Ordering::Relaxed);
        if writes.is_some() && back {
            if got >= want {
                break true;
            }
            if got != last {
                last = got;
                changed = Instant::now();
            } else if changed.elapsed() > DRAIN_STALL {
                break false;
            }
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let recovery_cpu = cpu1.until(&CpuSample::take(ctx.pids(None)));
    let tcp = counters_since(&tcp0);
    stop.cancel();
    let mut mechs = Vec::with_capacity(n);
    for t in tasks {
        mechs.extend(t.await.context("a reader task failed")?);
    }
    let writes = match writes {
        Some(w) => w,
        None => writes_task.await.context("the writers failed")?,
    };
    if writes.committed() == 0 {
        bail!("no write committed: {:?}", writes.errors);
    }

    // Positions and commit times of this run's events, from the log.
    let logged = read_log(&ctx.db.config, log_start, run, writes.by_seq().len()).await?;
    let t = Timeline {
        kill_us,
        kill_wall,
        respawn_us,
        ready_us,
        ready_wall,
    };
    let mut f = Figures {
        mechanics: n,
        workshops,
        freelancers: world.mechanics.iter().filter(|(_, w)| w.is_none()).count(),
        rate: s.storm_rate,
        writers: ctx.args.writers,
        down_s: ctx.args.storm_down.as_secs_f64(),
        open_s: round3(open_s),
        connected_at_kill,
        initial_failures: n - connected_at_start,
        drained,
        failed_writes: writes.failed,
        first_write_errors: writes.errors.clone(),
        steady_cpu,
        recovery_cpu,
        tcp,
        tcp_until_ready,
        ..Figures::default()
    };
    tally(&mut f, &mechs, &world, &writes, &logged, &t);
    md += &describe(&f);
    Ok(Section {
        key: "storm".into(),
        title: "8. Reconnect storm".into(),
        markdown: md,
        data: json!({ "figures": f, "port": port }),
        targets: checks(&f, n >= FULL_SIZE && !ctx.args.quick),
        cpu: vec![
            ("steady, before the kill".into(), f.steady_cpu),
            ("recovery, ready → drained".into(), f.recovery_cpu),
        ],
    })
}
