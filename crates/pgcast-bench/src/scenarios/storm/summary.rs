//! The reconnect storm's section: the targets of issue 12 against the figures, and the text
//! and tables of results.md.

use std::collections::BTreeMap;

use crate::report::{cpu_line, int, ms, table, Check};
use crate::stats::Percentiles;

use super::figures::Figures;
use super::mechanic::{
    ATTEMPT_TIMEOUT, BACKOFF_BASE, BACKOFF_CAP, FIRST_DELAY_MS, MECHANICS_PER_ADDRESS,
};
use super::{BEFORE, TCP_COUNTERS};

/// Targets of issue 12.
const LIVE_TARGET_S: f64 = 5.0;

/// The targets of issue 12 against what was measured.
pub(super) fn checks(f: &Figures, full: bool) -> Vec<Check> {
    let tag = if full { "" } else { " (reduced sizes)" };
    let s_of = |p: f64| format!("{:.3} s", p / 1000.0);
    vec![
        Check::new(
            "reconnect storm: every mechanic re-subscribed with `since` within 2 s of the restarted pgcast being ready",
            format!(
                "{} of {} re-subscribed, {} within 2 s; p99 {}, max {} after ready{tag}",
                int(f.resubscribed as u64),
                int(f.mechanics as u64),
                int(f.within_target_of_ready as u64),
                s_of(f.resubscribed_from_ready.p99_ms),
                s_of(f.resubscribed_from_ready.max_ms)
            ),
            Some(f.within_target_of_ready == f.mechanics),
        ),
        Check::new(
            "reconnect storm: p99 time to live ≤ 5 s",
            format!(
                "p99 {} after ready ({} from the kill), {} never caught up{tag}",
                s_of(f.live_from_ready.p99_ms),
                s_of(f.live_from_kill.p99_ms),
                int(f.never_live as u64)
            ),
            Some(f.never_live == 0 && f.live_from_ready.p99_ms / 1000.0 <= LIVE_TARGET_S),
        ),
        Check::new(
            "reconnect storm: no `unavailable`",
            format!("{} unavailable errors", int(f.unavailable)),
            Some(f.unavailable == 0),
        ),
        Check::new(
            "reconnect storm: each ends with exactly the events it may see",
            format!(
                "{} lost, {} unexpected, {} duplicates of {} expected; {} mechanics got resync",
                int(f.lost),
                int(f.unexpected),
                int(f.duplicates),
                int(f.expected),
                int(f.resync_clients as u64)
            ),
            Some(
                f.lost == 0
                    && f.unexpected == 0
                    && f.duplicates == 0
                    && f.resync_clients == 0
                    && f.initial_failures == 0,
            ),
        ),
    ]
}

pub(super) fn describe(f: &Figures) -> String {
    let mut md = format!(
        "{} mechanics ({} workshops, {} freelancers) subscribed to `queue` (opened in {:.1} s); {} writers commit the marketplace mix of scenario 1 at {} events/s before, during and after the outage. After {} s pgcast is SIGKILLed, left dead for {} s, and started again on the same port. Against an IPv4 address the mechanics connect from {} loopback addresses (127.1.x.y, {} each; from one address, reconnects reuse ports the killed process's connections left in TIME_WAIT and wait a second for a SYN retransmission, which real clients, on many addresses, do not). Each mechanic reconnects like a real client: first attempt after {}–{} ms, then exponential backoff ({} ms doubling, capped at {} s, jitter 50–100 %), each attempt `auth` then `subscribe` with `since` = the last position it received. *Ready* = the new process logged `pgcast ready`; the outage (kill → ready) lasted **{:.3} s**, {:.3} s of it pgcast's own start-up. *Time to live* = until the mechanic holds every event it may see that was committed before ready (positions and commit times read from the log afterwards).\n\n",
        int(f.mechanics as u64),
        f.workshops,
        int(f.freelancers as u64),
        f.open_s,
        f.writers,
        f.rate,
        BEFORE.as_secs_f64(),
        f.down_s,
        f.mechanics.div_ceil(MECHANICS_PER_ADDRESS),
        MECHANICS_PER_ADDRESS,
        FIRST_DELAY_MS.0,
        FIRST_DELAY_MS.1,
        BACKOFF_BASE.as_millis(),
        BACKOFF_CAP.as_secs_f64(),
        f.outage_s,
        f.startup_s,
    );
    let row = |name: &str, p: &Percentiles| {
        vec![
            name.to_owned(),
            int(p.samples),
            ms(p.p50_ms),
            ms(p.p90_ms),
            ms(p.p99_ms),
            ms(p.max_ms),
        ]
    };
    md += &table(
        &[
            "per mechanic",
            "mechanics",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
        ],
        vec![
            row("socket end noticed, from the kill", &f.noticed_from_kill),
            row("re-subscribed, from the kill", &f.resubscribed_from_kill),
            row("re-subscribed, from ready", &f.resubscribed_from_ready),
            row(
                "… its last attempt started, from ready (0 = before)",
                &f.won_attempt_from_ready,
            ),
            row(
                "… that attempt: start → WebSocket open",
                &f.won_attempt_to_open,
            ),
            row(
                "… that attempt: start → `subscribed`",
                &f.won_attempt_to_subscribed,
            ),
            row("**time to live, from ready**", &f.live_from_ready),
            row("time to live, from the kill", &f.live_from_kill),
        ],
    );
    let joined = |m: &BTreeMap<String, u64>| {
        if m.is_empty() {
            "none".to_owned()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k} ×{}", int(*v)))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    md += "\n";
    md += &table(
        &["", ""],
        vec![
            vec![
                "connected before the kill".into(),
                format!(
                    "{} of {}",
                    int(f.connected_at_kill as u64),
                    int(f.mechanics as u64)
                ),
            ],
            vec![
                "re-subscribed (within 2 s of ready)".into(),
                format!(
                    "{} ({})",
                    int(f.resubscribed as u64),
                    int(f.within_target_of_ready as u64)
                ),
            ],
            vec![
                "caught up (never)".into(),
                format!("{} ({})", int(f.live as u64), int(f.never_live as u64)),
            ],
            vec![
                "attempts until re-subscribed: mean / p50 / p99 / max".into(),
                format!(
                    "{:.2} / {} / {} / {}",
                    f.attempts.mean, f.attempts.p50, f.attempts.p99, f.attempts.max
                ),
            ],
            vec![
                "failed attempts: refused / timed out / other".into(),
                format!(
                    "{} / {} / {}",
                    int(f.refused_attempts),
                    int(f.timed_out_attempts),
                    int(f.other_failed_attempts)
                ),
            ],
            vec![
                "events to catch up per mechanic: mean / p99 / max".into(),
                format!(
                    "{:.1} / {} / {}",
                    f.caught_up_events.mean, f.caught_up_events.p99, f.caught_up_events.max
                ),
            ],
            vec![
                "TCP, kill → drained: listen overflows / drops / SYN retransmits".into(),
                tcp_line(&f.tcp),
            ],
            vec![
                "… of which kill → ready".into(),
                tcp_line(&f.tcp_until_ready),
            ],
            vec!["`unavailable` errors".into(), int(f.unavailable)],
            vec!["other errors".into(), joined(&f.other_errors)],
            vec![
                "`resync` (mechanics)".into(),
                format!("{} ({})", int(f.resyncs), int(f.resync_clients as u64)),
            ],
            vec!["connection ends".into(), joined(&f.connection_ends)],
            vec![
                "received / expected".into(),
                format!("{} / {}", int(f.received), int(f.expected)),
            ],
            vec![
                "lost / unexpected / duplicates / out of order".into(),
                format!(
                    "{} / {} / {} / {}",
                    int(f.lost),
                    int(f.unexpected),
                    int(f.duplicates),
                    int(f.out_of_order)
                ),
            ],
        ],
    );
    md += &format!(
        "\nWrites: {} events committed ({} before the kill, {} while pgcast was down, {} after ready), {} failed.{}\n",
        int(f.committed),
        int(f.committed_before_kill),
        int(f.committed_while_down),
        int(f.committed_after_ready),
        int(f.failed_writes),
        f.first_write_errors
            .first()
            .map(|e| format!(" First error: `{e}`."))
            .unwrap_or_default()
    );
    let overflows = f.tcp.get("ListenOverflows").copied().unwrap_or(0);
    if overflows > 0 {
        md += &format!(
            "\nThe kernel dropped {} connection attempts because a listener's accept queue was full (`ListenOverflows`, machine-wide; pgcast's is the only listener under this load): those clients waited for SYN retransmits (1 s, then 2 s, 4 s, …) or for their attempt's {} s timeout.\n",
            int(overflows),
            ATTEMPT_TIMEOUT.as_secs()
        );
    }
    if f.covered_by_snapshot > 0 {
        md += &format!(
            "\n{} expected events were replaced by the snapshot a mechanic took after `resync` (not counted as lost).\n",
            int(f.covered_by_snapshot)
        );
    }
    if !f.drained {
        md += "\nThe drain ended before every expected event arrived (no progress for 3 s, or the 60 s recovery limit).\n";
    }
    if let Some(e) = &f.first_initial_failure {
        md += &format!("\nFirst failed initial connection: `{e}`\n");
    }
    if let Some(e) = &f.first_failed_attempt {
        md += &format!("\nFirst failed reconnect attempt (other than refused): `{e}`\n");
    }
    md += &format!(
        "\nSteady state before the kill: {}\n\nRecovery (ready → drained; the new process's start-up is not in it): {}\n",
        cpu_line(&f.steady_cpu),
        cpu_line(&f.recovery_cpu)
    );
    md
}

fn tcp_line(counters: &std::collections::BTreeMap<String, u64>) -> String {
    TCP_COUNTERS
        .iter()
        .map(|k| counters.get(*k).map_or("–".into(), |v| int(*v)))
        .collect::<Vec<_>>()
        .join(" / ")
}
