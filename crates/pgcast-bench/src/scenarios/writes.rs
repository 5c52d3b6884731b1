//! Scenario 9, the cost of the trigger on writes (issue 14): the commit rate of general queued
//! inserts into `session_assignments` with no trigger, with a bare NOTIFY trigger (the
//! baseline `pg_notify(channel, to_jsonb(NEW)::text)` per row, `sql/bare_notify.sql`), with the
//! two floors of a durable, commit-ordered log (`sql/ordered_log_floor.sql` and their reader,
//! `log_floor.rs`: the row alone, and the content of pgcast's events) and with pgcast's
//! triggers as `pgcast migrate` installs them; 1-row and 100-row transactions.
//!
//! ```text
//!  per size: round 1: none ▸ bare ▸ floor ▸ content floor ▸ pgcast   round 2: …
//!            each a few seconds, the same writers flat out; CPU of PostgreSQL read around each
//! ```
//!
//! One table, one cluster, the same writer connections: the variants are switched between
//! rounds with `ALTER TABLE … DISABLE/ENABLE TRIGGER` (pgcast's trigger function records only
//! the table it was installed on, so there is no second table), and interleaved so that the
//! machine's noise falls on all of them alike. Every trigger has its reader, as in production:
//! the pgcast under test reads its log at each doorbell, a bare LISTEN connection reads the
//! baseline channel, the floors' reader their log. Whatever happens, pgcast's triggers are
//! enabled again (on a connection of their own) and the baseline and the floors dropped at the
//! end.

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;
use tokio_postgres::{Client, NoTls};

use crate::bare::{execute_once, ListenReader};
use crate::load::{self, Mix, Plan};
use crate::log_floor::LogFloor;
use crate::report::{int, table, Check, Section};
use crate::stats::{round3, CpuSample, CpuUse};

use super::context::Ctx;

/// The trigger variants, in the order each round runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Variant {
    NoTrigger,
    BareNotify,
    LogFloor,
    ContentFloor,
    Pgcast,
}

impl Variant {
    const ALL: [Variant; 5] = [
        Variant::NoTrigger,
        Variant::BareNotify,
        Variant::LogFloor,
        Variant::ContentFloor,
        Variant::Pgcast,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::NoTrigger => "no trigger",
            Variant::BareNotify => "bare NOTIFY trigger",
            Variant::LogFloor => "ordered-log floor",
            Variant::ContentFloor => "event-content floor",
            Variant::Pgcast => "pgcast trigger",
        }
    }

    /// The triggers on `session_assignments` that make this variant: the migrations' (three
    /// statement triggers capture; with them off nothing is captured, so the commit-time
    /// trigger never fires), `sql/bare_notify.sql`'s and the two of `sql/ordered_log_floor.sql`.
    fn triggers(self) -> &'static [&'static str] {
        match self {
            Variant::NoTrigger => &[],
            Variant::BareNotify => &["pgcast_bench_bare_notify"],
            Variant::LogFloor => &["pgcast_bench_log_floor"],
            Variant::ContentFloor => &["pgcast_bench_content_floor"],
            Variant::Pgcast => &[
                "pgcast_capture_insert",
                "pgcast_capture_update",
                "pgcast_capture_delete",
            ],
        }
    }

    /// The statement that leaves exactly this variant's triggers enabled.
    fn switch(self) -> String {
        let each = Variant::ALL.iter().flat_map(|v| {
            let state = if *v == self { "ENABLE" } else { "DISABLE" };
            v.triggers()
                .iter()
                .map(move |t| format!("{state} TRIGGER {t}"))
        });
        format!(
            "ALTER TABLE session_assignments {}",
            each.collect::<Vec<_>>().join(", ")
        )
    }
}

/// One variant at one transaction size, summed over its rounds.
#[derive(Debug, Clone, Default, Serialize)]
struct Totals {
    rows: u64,
    failed: u64,
    seconds: f64,
    /// CPU seconds of the postmaster and its backends over the rounds (`None`: the cluster is
    /// not ours).
    postgres_cpu_s: Option<f64>,
    /// Transactions per second of each round, in order.
    round_tx_per_s: Vec<f64>,
    rounds: Vec<CpuUse>,
    first_error: Option<String>,
}

impl Totals {
    fn add(&mut self, rows: u64, failed: u64, seconds: f64, tx_per_s: f64, cpu: CpuUse) {
        self.rows += rows;
        self.failed += failed;
        self.seconds += seconds;
        let pg = cpu.postgres_cores.map(|c| c * cpu.wall_s);
        self.postgres_cpu_s = match (self.postgres_cpu_s, pg) {
            (Some(a), Some(b)) => Some(a + b),
            (None, b) if self.rounds.is_empty() => b,
            _ => None,
        };
        self.round_tx_per_s.push(tx_per_s.round());
        self.rounds.push(cpu);
    }

    fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.seconds.max(1e-9)
    }

    fn cpu_us_per_row(&self) -> Option<f64> {
        let s = self.postgres_cpu_s?;
        (self.rows > 0).then(|| s * 1e6 / self.rows as f64)
    }
}

/// The variants at one transaction size.
#[derive(Debug, Clone, Serialize)]
struct Size {
    rows_per_tx: u32,
    writers: usize,
    variants: Vec<(Variant, Totals)>,
}

impl Size {
    fn get(&self, v: Variant) -> &Totals {
        &self
            .variants
            .iter()
            .find(|(w, _)| *w == v)
            .expect("every variant is measured")
            .1
    }

    /// Commit rate of `a` ÷ that of `b`.
    fn ratio(&self, a: Variant, b: Variant) -> f64 {
        self.get(a).rows_per_s() / self.get(b).rows_per_s().max(1e-9)
    }
}

pub(crate) async fn run(ctx: &mut Ctx) -> Result<Section> {
    let run = ctx.next_run();
    // Installs the baseline trigger and reads its channel for the whole scenario.
    let listen = ListenReader::start(&ctx.db.config, run).await?;
    let floor = match LogFloor::start(&ctx.db.config).await {
        Ok(floor) => floor,
        Err(e) => {
            listen.finish().await;
            return Err(e);
        }
    };
    let measured = switched(ctx, run).await;
    // Whatever happened (a lost connection may be what failed), on a connection of its own:
    // pgcast's triggers enabled. The baseline and the floors are dropped by their own `finish`.
    let enable = Variant::Pgcast
        .triggers()
        .iter()
        .map(|t| format!("ENABLE TRIGGER {t}"))
        .collect::<Vec<_>>()
        .join(", ");
    let restored = execute_once(
        &ctx.db.config,
        &format!("ALTER TABLE session_assignments {enable}"),
    )
    .await
    .context("enable pgcast's triggers again");
    let floor_read = floor.finish().await;
    listen.finish().await;
    let sizes = measured?;
    restored?;
    Ok(section(ctx, &sizes, floor_read?))
}

/// Measures every variant, switching between them on one admin connection.
async fn switched(ctx: &Ctx, run: u32) -> Result<Vec<Size>> {
    let (admin, connection) = ctx.db.config.connect(NoTls).await?;
    let driver = tokio::spawn(connection);
    let measured = measure(ctx, &admin, run).await;
    drop(admin);
    let _ = driver.await;
    measured
}

async fn measure(ctx: &Ctx, admin: &Client, run: u32) -> Result<Vec<Size>> {
    let (round, rounds) = (ctx.sizes.writes_round, ctx.sizes.writes_rounds);
    let mut sizes = Vec::new();
    for (batch, writers) in [
        (1, ctx.args.ceiling_writers),
        (100, ctx.args.ceiling_batch_writers),
    ] {
        let clients = load::connect_writers(&ctx.db.config, writers).await?;
        let mut size = Size {
            rows_per_tx: batch,
            writers,
            variants: Variant::ALL
                .iter()
                .map(|v| (*v, Totals::default()))
                .collect(),
        };
        for _ in 0..rounds {
            for (variant, tally) in &mut size.variants {
                admin
                    .batch_execute(&variant.switch())
                    .await
                    .with_context(|| format!("switch to {}", variant.label()))?;
                let plan = Plan {
                    writers,
                    rate: None,
                    batch,
                    duration: round,
                    mix: Mix::General,
                    run,
                    seed: ctx.args.seed,
                };
                let pids = ctx.pids(None);
                let cpu0 = CpuSample::take(pids);
                let out = load::run(&clients, plan, None).await;
                let cpu = cpu0.until(&CpuSample::take(pids));
                let seconds = out.ended_us.saturating_sub(out.started_us) as f64 / 1e6;
                let rows = out.committed();
                let tx_per_s = rows as f64 / f64::from(batch) / seconds.max(1e-9);
                tally.add(rows, out.failed, seconds, tx_per_s, cpu);
                if tally.first_error.is_none() {
                    tally.first_error = out.errors.first().cloned();
                }
            }
        }
        sizes.push(size);
    }
    Ok(sizes)
}

fn section(ctx: &Ctx, sizes: &[Size], floor_read: u64) -> Section {
    let (round, rounds) = (ctx.sizes.writes_round, ctx.sizes.writes_rounds);
    let mut md = format!(
        "Writers commit general queued inserts into `session_assignments` as fast as the database takes them — 1-row transactions ({} writers) and 100-row transactions ({} writers; one multi-row `INSERT … SELECT … generate_series` statement of 100 rows, as in scenario 2). Five variants of the same table in the same cluster: **no trigger**; a **bare NOTIFY trigger** (`pg_notify('pgcast_bench_bare', to_jsonb(NEW)::text)` per row, read by a bare LISTEN connection); the **ordered-log floor**, the least a durable, commit-ordered log that readers resume from must do (`crates/pgcast-bench/sql/ordered_log_floor.sql`: a deferred row trigger that takes an ordering lock, draws a position, appends `to_json(NEW)` to a logged table with only its primary key and rings an empty doorbell; both floors store json, as pgcast's log does); the **event-content floor**, the same trigger appending what each of pgcast's log rows carries instead (op, the row, its old status, mechanic and workshop, the session's customer looked up per row, position and commit time; built before the lock), run as its owner with a fixed search_path (SECURITY DEFINER: writers need no right on the log) — a trusted log of pgcast's events with nothing else, row by row, so the lock is held through every row after a transaction's first; one reader reads both floors' rows after its position at each doorbell, on a connection beside its LISTEN connection, as pgcast's listener does; **pgcast's triggers** as `pgcast migrate` installs them (since schema version 4 a statement trigger writes each statement's rows, their events built, to the log's content table while the statement runs; at commit one deferred trigger per statement takes the commit-order lock and records the statement's block of positions in one row, so the lock is held for one small insert per statement however many rows it changed; one doorbell NOTIFY per transaction; read by the pgcast under test). They are switched with `ALTER TABLE … DISABLE/ENABLE TRIGGER` and interleaved: {} rounds of {} s each, every round no trigger ▸ bare ▸ floor ▸ content floor ▸ pgcast, the same writer connections throughout. PostgreSQL CPU = the postmaster and all its backends (from `/proc`), per committed row.\n\n",
        ctx.args.ceiling_writers,
        ctx.args.ceiling_batch_writers,
        rounds,
        round.as_secs_f64(),
    );
    let mut rows = Vec::new();
    for s in sizes {
        for (v, t) in &s.variants {
            let spread = {
                let min = t.round_tx_per_s.iter().copied().fold(f64::MAX, f64::min);
                let max = t.round_tx_per_s.iter().copied().fold(0.0, f64::max);
                format!("{}–{}", int(min as u64), int(max as u64))
            };
            rows.push(vec![
                s.rows_per_tx.to_string(),
                v.label().into(),
                int((t.rows_per_s() / f64::from(s.rows_per_tx)) as u64),
                int(t.rows_per_s() as u64),
                t.cpu_us_per_row().map_or("–".into(), |u| format!("{u:.1}")),
                spread,
                int(t.failed),
            ]);
        }
    }
    md += &table(
        &[
            "rows/tx",
            "trigger (same run)",
            "tx/s",
            "rows/s",
            "PostgreSQL CPU µs/row",
            "tx/s per round (min–max)",
            "failed",
        ],
        rows,
    );
    md += "\n";
    md += &table(
        &[
            "rows/tx",
            "pgcast ÷ bare NOTIFY (same run)",
            "ordered-log floor ÷ bare NOTIFY",
            "event-content floor ÷ bare NOTIFY",
            "pgcast ÷ ordered-log floor",
            "pgcast ÷ event-content floor",
            "bare NOTIFY ÷ no trigger",
        ],
        sizes
            .iter()
            .map(|s| {
                let pct = |a, b| format!("{:.0} %", 100.0 * s.ratio(a, b));
                vec![
                    s.rows_per_tx.to_string(),
                    format!("**{}**", pct(Variant::Pgcast, Variant::BareNotify)),
                    pct(Variant::LogFloor, Variant::BareNotify),
                    pct(Variant::ContentFloor, Variant::BareNotify),
                    pct(Variant::Pgcast, Variant::LogFloor),
                    pct(Variant::Pgcast, Variant::ContentFloor),
                    pct(Variant::BareNotify, Variant::NoTrigger),
                ]
            })
            .collect(),
    );
    let floor_rows: u64 = sizes
        .iter()
        .map(|s| s.get(Variant::LogFloor).rows + s.get(Variant::ContentFloor).rows)
        .sum();
    md += &format!(
        "\nThe floors' reader read {} of the {} rows the floors' rounds committed{}.\n",
        int(floor_read),
        int(floor_rows),
        if floor_read == floor_rows {
            ""
        } else {
            " (not equal: its figures are suspect)"
        }
    );
    for s in sizes {
        for (v, t) in &s.variants {
            if let Some(e) = &t.first_error {
                md += &format!(
                    "\nFirst error, {} row(s)/tx, {}: `{e}`\n",
                    s.rows_per_tx,
                    v.label()
                );
            }
        }
    }
    let tag = if ctx.args.quick { " (quick run)" } else { "" };
    let mut targets = Vec::new();
    for s in sizes {
        let r = s.ratio(Variant::Pgcast, Variant::BareNotify);
        let pct = |v| format!("{:.0} %", 100.0 * s.ratio(v, Variant::BareNotify));
        targets.push(Check::new(
            &format!(
                "pgcast trigger ≥ 70 % of the bare NOTIFY trigger's commit rate, {} row(s)/transaction (same run)",
                s.rows_per_tx
            ),
            format!(
                "{:.0} % ({} vs {} rows/s){tag}",
                100.0 * r,
                int(s.get(Variant::Pgcast).rows_per_s() as u64),
                int(s.get(Variant::BareNotify).rows_per_s() as u64)
            ),
            Some(r >= 0.7),
        ));
        targets.push(Check::new(
            &format!(
                "the floors, {} row(s)/transaction: a durable, commit-ordered log of the row alone, and of pgcast's event content, ÷ the bare NOTIFY trigger (same run)",
                s.rows_per_tx
            ),
            format!(
                "ordered-log floor {}, event-content floor {}; pgcast {}{tag}",
                pct(Variant::LogFloor),
                pct(Variant::ContentFloor),
                pct(Variant::Pgcast)
            ),
            None,
        ));
    }
    let mut cpu = Vec::new();
    for s in sizes {
        for (v, t) in &s.variants {
            for (i, c) in t.rounds.iter().enumerate() {
                cpu.push((
                    format!(
                        "{} row(s)/tx, {}, round {}",
                        s.rows_per_tx,
                        v.label(),
                        i + 1
                    ),
                    *c,
                ));
            }
        }
    }
    let data = json!({
        "floor_rows_read": floor_read,
        "round_s": round.as_secs_f64(),
        "rounds": rounds,
        "sizes": sizes.iter().map(|s| json!({
            "rows_per_tx": s.rows_per_tx,
            "writers": s.writers,
            "variants": s.variants.iter().map(|(v, t)| json!({
                "variant": v,
                "rows": t.rows,
                "failed": t.failed,
                "seconds": round3(t.seconds),
                "tx_per_s": (t.rows_per_s() / f64::from(s.rows_per_tx)).round(),
                "rows_per_s": t.rows_per_s().round(),
                "postgres_cpu_us_per_row": t.cpu_us_per_row().map(round3),
                "round_tx_per_s": t.round_tx_per_s,
                "first_error": t.first_error,
            })).collect::<Vec<_>>(),
            "pgcast_over_bare": round3(s.ratio(Variant::Pgcast, Variant::BareNotify)),
            "floor_over_bare": round3(s.ratio(Variant::LogFloor, Variant::BareNotify)),
            "content_floor_over_bare": round3(s.ratio(Variant::ContentFloor, Variant::BareNotify)),
            "pgcast_over_floor": round3(s.ratio(Variant::Pgcast, Variant::LogFloor)),
            "pgcast_over_content_floor": round3(s.ratio(Variant::Pgcast, Variant::ContentFloor)),
            "bare_over_none": round3(s.ratio(Variant::BareNotify, Variant::NoTrigger)),
            "pgcast_over_none": round3(s.ratio(Variant::Pgcast, Variant::NoTrigger)),
        })).collect::<Vec<_>>(),
    });
    Section {
        key: "writes".into(),
        title: "9. Write cost of the trigger".into(),
        markdown: md,
        data,
        targets,
        cpu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_sum_rounds_and_ratios_compare_rows() {
        let cpu = |pg: Option<f64>| CpuUse {
            wall_s: 2.0,
            postgres_cores: pg,
            ..CpuUse::default()
        };
        let mut bare = Totals::default();
        bare.add(10_000, 0, 1.0, 10_000.0, cpu(Some(1.0)));
        bare.add(10_000, 0, 1.0, 10_000.0, cpu(Some(1.0)));
        // 4 CPU seconds for 20,000 rows.
        assert_eq!(bare.cpu_us_per_row(), Some(200.0));
        let mut ours = Totals::default();
        ours.add(7_500, 0, 1.0, 7_500.0, cpu(None));
        ours.add(6_500, 0, 1.0, 6_500.0, cpu(Some(1.0)));
        assert_eq!(ours.cpu_us_per_row(), None, "a round without a reading");
        let size = Size {
            rows_per_tx: 1,
            writers: 8,
            variants: vec![
                (Variant::NoTrigger, bare.clone()),
                (Variant::BareNotify, bare),
                (Variant::Pgcast, ours),
            ],
        };
        assert!((size.ratio(Variant::Pgcast, Variant::BareNotify) - 0.7).abs() < 1e-9);
    }

    #[test]
    fn a_switch_enables_its_variant_and_disables_every_other_trigger() {
        assert_eq!(
            Variant::LogFloor.switch(),
            "ALTER TABLE session_assignments DISABLE TRIGGER pgcast_bench_bare_notify, \
             ENABLE TRIGGER pgcast_bench_log_floor, DISABLE TRIGGER pgcast_bench_content_floor, \
             DISABLE TRIGGER pgcast_capture_insert, DISABLE TRIGGER pgcast_capture_update, \
             DISABLE TRIGGER pgcast_capture_delete"
        );
        let none = Variant::NoTrigger.switch();
        assert!(
            !none.contains("ENABLE") && none.matches("DISABLE").count() == 6,
            "{none}"
        );
    }
}
