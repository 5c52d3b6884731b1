//! Scenario 7, other servers (raw mode): the loads of the ceiling and fan-out scenarios
//! pointed at WebSocket servers that forward the baseline trigger's NOTIFY payloads as text
//! frames (`--raw-url`, the Node.js relay of `--compare-node`), compared with pgcast's figures
//! of the same invocation.

use anyhow::{Context, Result};
use serde_json::json;

use crate::bare::BareTrigger;
use crate::clients::{Mode, Setup};
use crate::env::Server;
use crate::report::{int, ms, table, Check, Section};
use crate::ws::WsTarget;

use super::ceiling::{ceiling_runs, ceiling_table};
use super::context::Ctx;
use super::fanout::{fanout_sweep, steps_table, Rates, Step};

pub(crate) async fn run(ctx: &mut Ctx) -> Result<Section> {
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
        let trigger = BareTrigger::install(&ctx.db.config).await?;
        let result = async {
            let rates = Rates::fanout(ctx);
            let steps = fanout_sweep(ctx, &target, specs, mode.clone(), pid, false, &rates).await?;
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
            // Peaks, each at the offered rate where it reached it.
            let peak = |v: &[Step]| {
                v.iter()
                    .map(|s| (s.delivered_per_s, s.events_per_s))
                    .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a })
            };
            let ((p_ours, at_ours), (p_theirs, at_theirs)) = (peak(ours), peak(&steps));
            targets.push(Check::new(
                &format!("≥ 2× the delivered rate of {name}"),
                format!(
                    "peaks: pgcast {}/s (at {} events/s) vs {}/s (at {} events/s): {:.2}×",
                    int(p_ours as u64),
                    int(at_ours as u64),
                    int(p_theirs as u64),
                    int(at_theirs as u64),
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
