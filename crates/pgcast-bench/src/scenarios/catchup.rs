//! Scenario 5, catch-up: many events committed while nobody listens, then a `service`
//! client resumes with `since`; time from its connection to the last event.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;
use tokio_postgres::NoTls;

use crate::clients::{report, Mode, Readers};
use crate::load;
use crate::report::{cpu_line, int, table, Check, Section};
use crate::stats::{now_us, round3, CpuSample};

use super::context::{log_head, open_one, problems, Ctx};

pub(crate) async fn run(ctx: &mut Ctx) -> Result<Section> {
    let n = ctx.sizes.catchup_events;
    let run = ctx.next_run();
    let (client, connection) = ctx.db.config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let since = log_head(&ctx.db.config).await?;
    let t = Instant::now();
    load::bulk_insert(&client, run, n, 1000).await?;
    let insert_s = t.elapsed().as_secs_f64();
    let last = log_head(&ctx.db.config).await?;
    // Let pgcast's listener digest the live notifications of the inserts first.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let pids = ctx.pids(None);
    let cpu0 = CpuSample::take(pids);
    let start_us = now_us();
    let setup = ctx.service_spec(Some(since))?;
    let groups = open_one(&ctx.target, setup, &Mode::Pgcast, "the resuming client").await?;
    let subscribed_us = now_us();
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
