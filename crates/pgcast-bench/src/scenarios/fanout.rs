//! Scenario 3, fan-out: every event visible to every connection, at stepped rates, against
//! pgcast and then, in the same run and under the same load, against the bare broadcaster
//! (the floor: [`crate::floor`], a process of its own). Reports deliveries/s and latency per
//! step, and each server's CPU per delivered frame next to the floor's.

use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::json;

use crate::bare::BareTrigger;
use crate::clients::{self, Mode, ReaderReport, Setup};
use crate::env::Server;
use crate::jsonptr::Pointer;
use crate::load::{Mix, Plan, World};
use crate::report::{int, ms, table, Check, Section};
use crate::stats::{round3, CpuUse};
use crate::ws::WsTarget;

use super::context::{
    conns_report, drive, first_failure, listen_report, lost_cell, problems, settle, write_summary,
    Ctx, Load, WriteSummary, CONN_BUF,
};

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Step {
    pub(crate) events_per_s: f64,
    connections: usize,
    offered_deliveries_per_s: f64,
    pub(crate) delivered_per_s: f64,
    sustained: bool,
    /// Every frame arrived before the drain limit (otherwise `lost` counts frames the server
    /// still had queued).
    drained: bool,
    pub(crate) reader: ReaderReport,
    pub(crate) bare_listen: Option<ReaderReport>,
    writes: WriteSummary,
    pub(crate) cpu: CpuUse,
}

/// CPU seconds of the server under test per delivered frame, in µs (`cores` over the step's
/// measured window, divided by the distinct frames received).
fn us_per_delivery(cores: Option<f64>, step: &Step) -> Option<f64> {
    let cores = cores?;
    (step.reader.received > 0)
        .then(|| round3(cores * step.cpu.wall_s * 1e6 / step.reader.received as f64))
}

/// A step counts as the fan-out target's rate when it offered this many deliveries/s: the
/// writers pace 1,000 events/s to 1,000 connections a little under a million.
const MILLION_OFFERED: f64 = 950_000.0;

/// The offered event rates of a sweep, each held for `step`.
#[derive(Debug, Clone)]
pub(crate) struct Rates {
    pub(crate) rates: Vec<f64>,
    pub(crate) step: Duration,
}

impl Rates {
    /// The fan-out scenario's own steps (`--fanout-rates`, `--fanout-step`).
    pub(crate) fn fanout(ctx: &Ctx) -> Rates {
        Rates {
            rates: ctx.sizes.fanout_rates.clone(),
            step: ctx.sizes.fanout_step,
        }
    }
}

/// The stepped load against `target`: one connection per spec, the same sockets for every
/// step; stops after the first step that is not sustained.
pub(crate) async fn fanout_sweep(
    ctx: &mut Ctx,
    target: &WsTarget,
    specs: Vec<(usize, Setup)>,
    mode: Mode,
    other_pid: Option<u32>,
    with_listen: bool,
    rates: &Rates,
) -> Result<Vec<Step>> {
    let tasks = ctx.args.reader_tasks;
    let mut groups = clients::open(target, specs, tasks, 64, CONN_BUF).await;
    settle(&mode, std::time::Duration::from_millis(500)).await;
    let mut steps = Vec::new();
    for &rate in &rates.rates {
        let run = ctx.next_run();
        let live: usize = groups.iter().flatten().filter(|c| c.connected()).count();
        if live == 0 {
            bail!(
                "no connection could be opened: {}",
                first_failure(&groups).unwrap_or_default()
            );
        }
        let load = Load {
            plan: Plan {
                writers: ctx.args.writers,
                rate: Some(rate),
                batch: 1,
                duration: rates.step,
                mix: Mix::General,
                run,
                seed: ctx.args.seed,
            },
            world: None,
            listen: with_listen,
            other_pid,
        };
        let d = drive(ctx, groups, mode.clone(), load, move |w| {
            w.committed() * live as u64
        })
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

pub(crate) fn steps_table(steps: &[Step]) -> String {
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

/// A sweep against the bare broadcaster with `connections` plain sockets, the broadcaster
/// started for it and stopped after; `with_listen`: a bare LISTEN reader of the same commits
/// in each step too.
pub(crate) async fn floor_sweep(
    ctx: &mut Ctx,
    connections: usize,
    rates: &Rates,
    with_listen: bool,
) -> Result<(Vec<Step>, String)> {
    let log = ctx.log_dir.join("floor.log");
    let url = ctx.db.url.clone();
    let floor = tokio::task::spawn_blocking(move || Server::floor(&url, log)).await??;
    ctx.track(Some(floor.pid));
    let (pid, target) = (floor.pid, floor.target.clone());
    // The channel the floor forwards is fed by the baseline trigger, for this sweep only.
    let trigger = BareTrigger::install(&ctx.db.config).await;
    let steps = match trigger {
        Ok(trigger) => {
            let specs = (0..connections)
                .map(|i| (i, Setup::Raw { first_frame: None }))
                .collect();
            let mode = Mode::Raw(Pointer::parse("/id")?);
            let steps =
                fanout_sweep(ctx, &target, specs, mode, Some(pid), with_listen, rates).await;
            trigger.remove().await;
            steps
        }
        Err(e) => Err(e),
    };
    tokio::task::spawn_blocking(move || floor.stop()).await?;
    ctx.track(None);
    Ok((steps?, target.url))
}

/// pgcast's and the floor's step at each rate both were put under, side by side.
fn versus_table(ours: &[Step], floor: &[Step]) -> String {
    let mut rows = Vec::new();
    for a in ours {
        let Some(b) = floor.iter().find(|b| b.events_per_s == a.events_per_s) else {
            continue;
        };
        let (ua, ub) = (
            us_per_delivery(a.cpu.pgcast_cores, a),
            us_per_delivery(b.cpu.other_server_cores, b),
        );
        let ratio = match (ua, ub) {
            (Some(x), Some(y)) if y > 0.0 => format!("**{:.2}×**", x / y),
            _ => "–".into(),
        };
        let row = |name: &str, s: &Step, cores: Option<f64>, us: Option<f64>, ratio: String| {
            vec![
                int(s.events_per_s as u64),
                name.to_owned(),
                int(s.delivered_per_s as u64),
                if s.sustained { "yes" } else { "**no**" }.into(),
                ms(s.reader.latency.p50_ms),
                ms(s.reader.latency.p99_ms),
                cores.map_or("–".into(), |v| format!("{v:.2}")),
                us.map_or("–".into(), |v| format!("{v:.2}")),
                ratio,
            ]
        };
        rows.push(row("pgcast", a, a.cpu.pgcast_cores, ua, ratio));
        rows.push(row(
            "bare broadcaster (floor)",
            b,
            b.cpu.other_server_cores,
            ub,
            String::new(),
        ));
    }
    table(
        &[
            "events/s",
            "server (same run, same load)",
            "delivered/s",
            "sustained",
            "p50 ms",
            "p99 ms",
            "server CPU (cores)",
            "server CPU µs per delivery",
            "pgcast ÷ floor (same run)",
        ],
        rows,
    )
}

/// The targets on CPU per delivery, at the first rate both servers were put under that offered
/// about a million deliveries/s, else at the highest rate both were put under.
fn cost_checks(ours: &[Step], floor: Option<&[Step]>) -> Vec<Check> {
    // At the fan-out target's rate: the first step that offered about a million deliveries/s
    // (per delivery both cost more at lower rates, where waking threads dominates, and less
    // past it, where each wake writes more frames); the highest step both ran if the sweep
    // stopped before it.
    let common = floor.and_then(|floor| {
        let both: Vec<_> = ours
            .iter()
            .filter_map(|a| Some((a, floor.iter().find(|b| b.events_per_s == a.events_per_s)?)))
            .collect();
        both.iter()
            .find(|(a, _)| a.offered_deliveries_per_s >= MILLION_OFFERED)
            .or(both.last())
            .copied()
    });
    let Some((a, b)) = common else {
        let why = "not measured: no step of the floor in this run";
        return vec![
            Check::new("pgcast CPU ≤ 1.0 µs per delivered frame", why.into(), None),
            Check::new(
                "pgcast CPU per delivery ≤ 1.5× the bare broadcaster's (same run)",
                why.into(),
                None,
            ),
        ];
    };
    let ua = us_per_delivery(a.cpu.pgcast_cores, a);
    let ub = us_per_delivery(b.cpu.other_server_cores, b);
    let at = format!(
        "at {} events/s × {} connections",
        int(a.events_per_s as u64),
        int(a.connections as u64)
    );
    let ratio = match (ua, ub) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    };
    vec![
        Check::new(
            "pgcast CPU ≤ 1.0 µs per delivered frame",
            match ua {
                Some(u) => format!("{u:.2} µs {at}"),
                None => "not measured: pgcast's process id is unknown".into(),
            },
            ua.map(|u| u <= 1.0),
        ),
        Check::new(
            "pgcast CPU per delivery ≤ 1.5× the bare broadcaster's (same run)",
            match (ua, ub, ratio) {
                (Some(x), Some(y), Some(r)) => format!("{x:.2} vs {y:.2} µs: {r:.2}× {at}"),
                _ => "not measured".into(),
            },
            ratio.map(|r| r <= 1.5),
        ),
    ]
}

pub(crate) async fn run(ctx: &mut Ctx) -> Result<Section> {
    let s = ctx.sizes.clone();
    let world = World::new(s.fanout_connections, ctx.args.workshops);
    let specs = ctx.mechanic_specs(&world, Some("queue"))?;
    let target = ctx.target.clone();
    let rates = Rates::fanout(ctx);
    let steps = fanout_sweep(ctx, &target, specs, Mode::Pgcast, None, true, &rates).await?;
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

    eprintln!("   the same load against the bare broadcaster …");
    let floor = floor_sweep(ctx, s.fanout_connections, &rates, false).await;
    md += &format!(
        "\n### The floor: a bare broadcaster, same run, same load\n\nA minimal tokio-tungstenite server, run as a process of its own (`pgcast-bench --serve-floor`) so that its CPU is read apart from the load generator's: one tokio-postgres LISTEN connection on `pgcast_bench_bare` (a plain `pg_notify(to_jsonb(NEW))` row trigger the bench installs for this sweep), each payload forwarded as it is, as one text frame, to every connected socket — no auth, no routing, no serialization, no resume. {} plain connections, the same writers, rates and step length as above; a frame counts when `/id` resolves in it. CPU µs per delivery = the server's CPU time over the step ÷ the distinct frames delivered.\n\n",
        int(s.fanout_connections as u64)
    );
    let floor_steps = match floor {
        Ok((floor_steps, url)) => {
            md += &steps_table(&floor_steps);
            for st in &floor_steps {
                md += &problems(&st.reader);
            }
            md += &format!("\n(The floor served on {url}; its CPU is the *other* column.)\n\nCPU per delivered frame, pgcast and the floor, same run:\n\n");
            md += &versus_table(&steps, &floor_steps);
            Some(floor_steps)
        }
        Err(e) => {
            eprintln!("   the bare broadcaster failed: {e:#}");
            md += &format!("The bare broadcaster failed: `{e:#}`\n");
            None
        }
    };

    let best = steps
        .iter()
        .filter(|s| s.sustained)
        .map(|s| s.delivered_per_s)
        .fold(0.0, f64::max);
    let at_million = steps
        .iter()
        .find(|s| s.offered_deliveries_per_s >= MILLION_OFFERED);
    let mut targets = vec![
        Check::new(
            "≥ 1,000,000 frame deliveries/s sustained (1,000 connections)",
            format!("{}/s (best sustained step)", int(best as u64)),
            Some(best >= 1_000_000.0),
        ),
        match at_million {
            Some(st) => Check::new(
                "p99 ≤ 50 ms at that rate",
                format!(
                    "{} ms at {} deliveries/s offered{}{}",
                    ms(st.reader.latency.p99_ms),
                    int(st.offered_deliveries_per_s as u64),
                    if st.sustained { "" } else { " (not sustained)" },
                    floor_steps
                        .iter()
                        .flatten()
                        .find(|f| f.events_per_s == st.events_per_s)
                        .map(|f| format!(
                            "; the bare broadcaster, same step: {} ms",
                            ms(f.reader.latency.p99_ms)
                        ))
                        .unwrap_or_default()
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
    targets.extend(cost_checks(&steps, floor_steps.as_deref()));
    let mut cpu: Vec<(String, CpuUse)> = steps
        .iter()
        .map(|s| (format!("{} events/s", int(s.events_per_s as u64)), s.cpu))
        .collect();
    for st in floor_steps.iter().flatten() {
        cpu.push((
            format!("bare broadcaster, {} events/s", int(st.events_per_s as u64)),
            st.cpu,
        ));
    }
    let per_delivery = |v: &[Step], pgcast: bool| -> Vec<Option<f64>> {
        v.iter()
            .map(|s| {
                let cores = if pgcast {
                    s.cpu.pgcast_cores
                } else {
                    s.cpu.other_server_cores
                };
                us_per_delivery(cores, s)
            })
            .collect()
    };
    let data = json!({
        "connections": s.fanout_connections, "step_s": s.fanout_step.as_secs_f64(), "steps": steps,
        "pgcast_cpu_us_per_delivery": per_delivery(&steps, true),
        "floor": floor_steps,
        "floor_cpu_us_per_delivery": floor_steps.as_deref().map(|f| per_delivery(f, false)),
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    fn step(rate: f64, received: u64, wall_s: f64, pgcast: f64, other: f64) -> Step {
        Step {
            events_per_s: rate,
            connections: 1000,
            offered_deliveries_per_s: rate * 1000.0,
            delivered_per_s: received as f64 / wall_s,
            sustained: true,
            drained: true,
            reader: ReaderReport {
                received,
                ..ReaderReport::default()
            },
            bare_listen: None,
            writes: write_summary(&crate::load::Outcome::default()),
            cpu: CpuUse {
                wall_s,
                pgcast_cores: Some(pgcast),
                other_server_cores: Some(other),
                ..CpuUse::default()
            },
        }
    }

    #[test]
    fn short_of_a_million_offered_cost_is_compared_at_the_highest_common_rate() {
        // 2,000,000 frames in 2 s: 1 core = 1 µs per frame; 0.5 core = 0.5 µs.
        let ours = [
            step(250.0, 500_000, 2.0, 0.5, 0.0),
            step(500.0, 2_000_000, 2.0, 1.0, 0.0),
        ];
        let floor = [
            step(250.0, 500_000, 2.0, 0.0, 0.25),
            step(500.0, 2_000_000, 2.0, 0.0, 0.5),
            step(1000.0, 4_000_000, 2.0, 0.0, 0.9),
        ];
        assert_eq!(
            us_per_delivery(ours[1].cpu.pgcast_cores, &ours[1]),
            Some(1.0)
        );
        let checks = cost_checks(&ours, Some(&floor));
        assert_eq!(checks[0].met, Some(true), "{:?}", checks[0]);
        assert_eq!(checks[1].met, Some(false), "2× the floor: {:?}", checks[1]);
        assert!(
            checks[1].measured.contains("at 500 events/s"),
            "{:?}",
            checks[1]
        );
        assert!(cost_checks(&ours, None).iter().all(|c| c.met.is_none()));
        let md = versus_table(&ours, &floor);
        assert!(md.contains("**2.00×**"), "{md}");
        assert!(
            !md.contains("1,000 |"),
            "steps only the floor ran are not compared: {md}"
        );
    }

    #[test]
    fn cost_per_delivery_is_compared_at_the_first_step_offering_a_million() {
        // At 1,000 events/s (a million offered) 1.0 vs 0.5 µs; past it 0.6 vs 0.5 µs.
        let ours = [
            step(500.0, 1_000_000, 2.0, 1.0, 0.0),
            step(1000.0, 2_000_000, 2.0, 1.0, 0.0),
            step(1500.0, 3_000_000, 2.0, 0.9, 0.0),
        ];
        let floor = [
            step(500.0, 1_000_000, 2.0, 0.0, 0.5),
            step(1000.0, 2_000_000, 2.0, 0.0, 0.5),
            step(1500.0, 3_000_000, 2.0, 0.0, 0.75),
        ];
        let checks = cost_checks(&ours, Some(&floor));
        assert!(
            checks[1].measured.contains("2.00× at 1,000 events/s"),
            "{:?}",
            checks[1]
        );
        assert_eq!(checks[1].met, Some(false), "{:?}", checks[1]);
        assert_eq!(checks[0].met, Some(true), "1.0 µs: {:?}", checks[0]);
    }
}
