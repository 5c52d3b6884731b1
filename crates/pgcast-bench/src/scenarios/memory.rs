//! Scenario 4, memory: a fresh pgcast's resident memory (`VmRSS`) with no connection and with
//! many idle authenticated ones, per connection.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pgcast_events::Role;
use serde_json::json;
use uuid::Uuid;

use crate::clients::{self, Mode, Readers, Setup};
use crate::report::{int, table, Check, Section};
use crate::stats::{round3, rss_kib};

use super::context::Ctx;

pub(crate) async fn run(ctx: &mut Ctx) -> Result<Section> {
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
    if ctx.pgcast.is_some() {
        ctx.restart_pgcast("127.0.0.1:0", "pgcast-memory.log")
            .await?;
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
