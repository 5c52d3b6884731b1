//! Scenario 2, the ceiling: writers commit as fast as PostgreSQL takes them, 1-row and
//! 100-row transactions, and one subscriber must keep up (delivered ÷ committed). The runs
//! are shared with the raw scenario, which points them at other servers.

use anyhow::Result;
use serde::Serialize;
use serde_json::json;

use crate::clients::{Mode, ReaderReport, Setup};
use crate::load::{Mix, Outcome, Plan};
use crate::report::{cpu_line, int, ms, reader_row, table, Check, Section, READER_HEADERS};
use crate::stats::CpuUse;
use crate::ws::WsTarget;

use super::context::{
    conns_report, drive, listen_report, lost_cell, open_one, problems, write_line, write_summary,
    Ctx, Load, WriteSummary,
};

#[derive(Debug, Clone, Serialize)]
pub(crate) struct CeilingRow {
    pub(crate) rows_per_tx: u32,
    writers: usize,
    commits_per_s: f64,
    pub(crate) delivered_per_s: f64,
    pub(crate) ratio: f64,
    drained: bool,
    pub(crate) reader: ReaderReport,
    bare_listen: Option<ReaderReport>,
    writes: WriteSummary,
    pub(crate) cpu: CpuUse,
}

/// One run per transaction size against `target`, one subscriber set up by `setup`.
pub(crate) async fn ceiling_runs(
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
        let groups = open_one(target, setup(ctx)?, &mode, "the subscriber").await?;
        let load = Load {
            plan: Plan {
                writers,
                rate: None,
                batch,
                duration: ctx.sizes.ceiling_duration,
                mix: Mix::General,
                run,
                seed: ctx.args.seed,
            },
            world: None,
            listen: with_listen,
            other_pid,
        };
        let d = drive(ctx, groups, mode.clone(), load, Outcome::committed).await?;
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

pub(crate) fn ceiling_table(rows: &[CeilingRow], reader: &str) -> String {
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

pub(crate) async fn run(ctx: &mut Ctx) -> Result<Section> {
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
