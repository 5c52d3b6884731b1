//! Scenario 1, latency under load: mechanics on `queue` in workshops, a marketplace write mix
//! at a paced rate; latency, loss against each mechanic's visibility set, leaks and duplicates,
//! next to what a bare LISTEN connection sees of the same commits; then the floor — the bare
//! broadcaster of scenario 3 writing as many frames per second to as many sockets — and what
//! it adds over its own LISTEN reader.

use std::sync::Arc;

use anyhow::Result;
use serde_json::json;

use crate::clients::{self, report, Mode, ReaderReport};
use crate::load::{Mix, Plan, World};
use crate::report::{cpu_line, int, ms, reader_row, table, Check, Section, READER_HEADERS};

use super::context::{
    drive, listen_report, problems, write_line, write_summary, Ctx, Load, CONN_BUF,
};
use super::fanout::{floor_sweep, steps_table, Rates};

pub(crate) async fn run(ctx: &mut Ctx) -> Result<Section> {
    let s = ctx.sizes.clone();
    let run = ctx.next_run();
    let world = Arc::new(World::new(s.mechanics, ctx.args.workshops));
    let specs = ctx.mechanic_specs(&world, Some("queue"))?;
    let groups = clients::open(&ctx.target, specs, ctx.args.reader_tasks, 64, CONN_BUF).await;
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
        world: Some(world.clone()),
        listen: true,
        other_pid: None,
    };
    let w2 = world.clone();
    let d = drive(ctx, groups, Mode::Pgcast, load, move |w| {
        let c = w.counts(&w2);
        (0..w2.mechanics.len())
            .map(|m| w.expected_for(&c, &w2, m))
            .sum()
    })
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

    // The floor at the delivered rate pgcast just sustained, to the same number of sockets.
    eprintln!("   the bare broadcaster at the same delivered rate …");
    let floor_rate = (rep.delivered_per_s / rep.connected.max(1) as f64)
        .round()
        .max(1.0);
    let rates = Rates {
        rates: vec![floor_rate],
        step: s.duration,
    };
    let floor = floor_sweep(ctx, s.mechanics, &rates, true).await;
    md += &format!(
        "\n### The floor at the same delivered rate, same run\n\nThe bare broadcaster of scenario 3 (one LISTEN, each payload written as it is to every socket; no auth, routing, serialization or resume) with {} plain sockets, at {} general inserts/s for {} s, so that it writes about as many frames per second as pgcast delivered above ({} /s); a bare LISTEN connection reads the same commits. What it adds over that LISTEN reader is what this machine adds to any server writing that many frames while the load generator shares its cores.\n\n",
        int(s.mechanics as u64),
        floor_rate,
        s.duration.as_secs_f64(),
        int(rep.delivered_per_s as u64),
    );
    let floor_step = match floor {
        Ok((steps, _url)) => {
            md += &steps_table(&steps);
            steps.into_iter().next()
        }
        Err(e) => {
            md += &format!("The floor could not be measured: {e:#}\n");
            None
        }
    };

    let full = !ctx.args.quick && s.mechanics >= 1000 && s.rate >= 500.0;
    let tag = if full { "" } else { " (reduced sizes)" };
    let mut targets = vec![
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
    let added = |reader: &ReaderReport, listen: Option<&ReaderReport>| {
        listen.map(|l| {
            (
                reader.latency.p50_ms - l.latency.p50_ms,
                reader.latency.p99_ms - l.latency.p99_ms,
            )
        })
    };
    let floor_added = floor_step
        .as_ref()
        .and_then(|f| added(&f.reader, f.bare_listen.as_ref()));
    if let (Some((p50, p99)), Some((f50, f99))) = (added(&rep, lrep.as_ref()), floor_added) {
        targets.push(Check::new(
            "the floor: what the bare broadcaster adds over its LISTEN reader at the same delivered rate (same run)",
            format!("pgcast adds {p50:.1} ms p50, {p99:.1} ms p99; the floor adds {f50:.1} ms p50, {f99:.1} ms p99{tag}"),
            None,
        ));
    }
    let mut cpu_rows = vec![("load".into(), d.cpu)];
    if let Some(f) = &floor_step {
        cpu_rows.push(("bare broadcaster, same delivered rate".into(), f.cpu));
    }
    Ok(Section {
        key: "latency".into(),
        title: "1. Latency under load".into(),
        markdown: md,
        data: json!({
            "mechanics": s.mechanics, "workshops": ctx.args.workshops, "rate": s.rate,
            "writers": ctx.args.writers, "duration_s": s.duration.as_secs_f64(),
            "pgcast": rep, "bare_listen": lrep, "writes": ws, "cpu": d.cpu,
            "floor": floor_step,
        }),
        targets,
        cpu: cpu_rows,
    })
}
