//! Scenario 6, overhead versus the database alone: one pgcast `service` subscriber and a bare
//! tokio-postgres LISTEN connection read the same marketplace load; the difference in latency
//! is what pgcast adds.

use std::sync::Arc;

use anyhow::Result;
use serde_json::json;

use crate::clients::Mode;
use crate::load::{Mix, Outcome, Plan, World};
use crate::report::{cpu_line, reader_row, table, Section, READER_HEADERS};
use crate::stats::round3;

use super::context::{
    conns_report, drive, listen_report, open_one, problems, write_line, write_summary, Ctx, Load,
};

pub(crate) async fn run(ctx: &mut Ctx) -> Result<Section> {
    let s = ctx.sizes.clone();
    let run = ctx.next_run();
    let world = Arc::new(World::new(100, ctx.args.workshops));
    let groups = open_one(
        &ctx.target,
        ctx.service_spec(None)?,
        &Mode::Pgcast,
        "the service subscriber",
    )
    .await?;
    let load = Load {
        plan: Plan {
            writers: ctx.args.writers,
            rate: Some(s.rate),
            batch: 1,
            duration: s.duration,
            mix: Mix::Marketplace,
            run,
            seed: ctx.args.seed,
        },
        world: Some(world),
        listen: true,
        other_pid: None,
    };
    let d = drive(ctx, groups, Mode::Pgcast, load, Outcome::committed).await?;
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
