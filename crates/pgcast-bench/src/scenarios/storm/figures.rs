//! What the reconnect storm measured: each mechanic judged against what the writers
//! committed and who may see it (lost, unexpected, when it was live again), and the figures
//! of the whole run.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::load::{Audience, Outcome, World};
use crate::stats::{round3, CpuUse, Histogram, Percentiles};

use super::mechanic::Mech;

/// Target of issue 12: back within this long of ready.
const RECONNECT_TARGET_S: f64 = 2.0;

/// Per-mechanic results after the run.
#[derive(Debug, Default)]
pub(super) struct Verdict {
    expected: u64,
    received: u64,
    lost: u64,
    unexpected: u64,
    covered: u64,
    /// Events committed before ready after its `since`: what it had to catch up on.
    needed: u64,
    live_us: Option<u64>,
}

pub(super) fn judge(
    m: &Mech,
    world: &World,
    by_seq: &[Option<Audience>],
    logged: &[Option<(i64, i64)>],
    ready_wall: i64,
) -> Verdict {
    let st = &m.st;
    let mut v = Verdict::default();
    let covered = |seq: usize| {
        logged
            .get(seq)
            .copied()
            .flatten()
            .is_some_and(|(p, _)| st.covered.iter().any(|&(a, b)| p > a && p <= b))
    };
    let mut got = vec![false; by_seq.len()];
    for seq in st.seen.iter() {
        if let Some(g) = got.get_mut(seq as usize) {
            *g = true;
        }
    }
    let mut after = st.after.clone();
    after.sort_unstable();
    let mut live = st.resubscribed_us.max(st.snapshot_us);
    let mut caught_up = st.resubscribed_us != 0;
    for (seq, audience) in by_seq.iter().enumerate() {
        let Some(audience) = audience else { continue };
        if !world.sees(m.who, *audience) {
            continue;
        }
        if covered(seq) {
            v.covered += 1;
            continue;
        }
        v.expected += 1;
        if !got[seq] {
            v.lost += 1;
        }
        let (Some(since), Some((position, committed))) = (st.storm_since, logged[seq]) else {
            continue;
        };
        if position <= since || committed > ready_wall {
            continue;
        }
        v.needed += 1;
        match after.binary_search_by_key(&position, |&(p, _)| p) {
            Ok(i) => live = live.max(after[i].1),
            Err(_) => caught_up = false,
        }
    }
    for seq in st.seen.iter() {
        let visible = by_seq
            .get(seq as usize)
            .copied()
            .flatten()
            .is_some_and(|a| world.sees(m.who, a));
        if visible {
            v.received += 1;
        } else {
            v.unexpected += 1;
        }
    }
    v.live_us = caught_up.then_some(live);
    v
}

#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct Counts {
    pub(super) mean: f64,
    pub(super) p50: u64,
    pub(super) p99: u64,
    pub(super) max: u64,
}

pub(super) fn counts(mut v: Vec<u64>) -> Counts {
    if v.is_empty() {
        return Counts::default();
    }
    v.sort_unstable();
    let q = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Counts {
        mean: round3(v.iter().sum::<u64>() as f64 / v.len() as f64),
        p50: q(0.5),
        p99: q(0.99),
        max: v[v.len() - 1],
    }
}

/// Everything the section reports, also written as JSON.
#[derive(Debug, Default, Serialize)]
pub(super) struct Figures {
    pub(super) mechanics: usize,
    pub(super) workshops: usize,
    pub(super) freelancers: usize,
    pub(super) rate: f64,
    pub(super) writers: usize,
    pub(super) down_s: f64,
    /// Opening the first connections, before the run.
    pub(super) open_s: f64,
    pub(super) connected_at_kill: usize,
    pub(super) initial_failures: usize,
    pub(super) first_initial_failure: Option<String>,
    /// Kill → the new process logged ready.
    pub(super) outage_s: f64,
    /// Respawn → ready: pgcast's own start-up.
    pub(super) startup_s: f64,
    pub(super) noticed_from_kill: Percentiles,
    pub(super) resubscribed: usize,
    pub(super) resubscribed_from_kill: Percentiles,
    pub(super) resubscribed_from_ready: Percentiles,
    /// The attempt that re-subscribed: its start from ready (0 when it started before), and
    /// its own length to the WebSocket handshake and to `subscribed`.
    pub(super) won_attempt_from_ready: Percentiles,
    pub(super) won_attempt_to_open: Percentiles,
    pub(super) won_attempt_to_subscribed: Percentiles,
    pub(super) within_target_of_ready: usize,
    pub(super) attempts: Counts,
    pub(super) refused_attempts: u64,
    pub(super) timed_out_attempts: u64,
    pub(super) other_failed_attempts: u64,
    pub(super) first_failed_attempt: Option<String>,
    pub(super) live: usize,
    pub(super) never_live: usize,
    pub(super) live_from_ready: Percentiles,
    pub(super) live_from_kill: Percentiles,
    pub(super) caught_up_events: Counts,
    pub(super) unavailable: u64,
    pub(super) other_errors: BTreeMap<String, u64>,
    pub(super) resync_clients: usize,
    pub(super) resyncs: u64,
    pub(super) snapshots: u64,
    pub(super) connection_ends: BTreeMap<String, u64>,
    pub(super) expected: u64,
    pub(super) received: u64,
    pub(super) lost: u64,
    pub(super) unexpected: u64,
    pub(super) duplicates: u64,
    pub(super) out_of_order: u64,
    pub(super) foreign: u64,
    pub(super) covered_by_snapshot: u64,
    pub(super) drained: bool,
    pub(super) committed: u64,
    pub(super) committed_before_kill: u64,
    pub(super) committed_while_down: u64,
    pub(super) committed_after_ready: u64,
    pub(super) failed_writes: u64,
    pub(super) first_write_errors: Vec<String>,
    pub(super) steady_cpu: CpuUse,
    pub(super) recovery_cpu: CpuUse,
    /// Machine-wide TCP counters from the kill to the end of the drain.
    pub(super) tcp: BTreeMap<String, u64>,
    /// The same counters from the kill to ready (the part of `tcp` before pgcast accepted).
    pub(super) tcp_until_ready: BTreeMap<String, u64>,
}

/// The moments of the outage: `now_us()` and unix µs (to compare with the log's commit times).
pub(super) struct Timeline {
    pub(super) kill_us: u64,
    pub(super) kill_wall: i64,
    pub(super) respawn_us: u64,
    pub(super) ready_us: u64,
    pub(super) ready_wall: i64,
}

/// Fills in the per-mechanic figures.
pub(super) fn tally(
    f: &mut Figures,
    mechs: &[Mech],
    world: &World,
    writes: &Outcome,
    logged: &[Option<(i64, i64)>],
    t: &Timeline,
) {
    let by_seq = writes.by_seq();
    f.committed = writes.committed();
    for (seq, a) in by_seq.iter().enumerate() {
        if a.is_none() {
            continue;
        }
        match logged.get(seq).copied().flatten() {
            Some((_, c)) if c < t.kill_wall => f.committed_before_kill += 1,
            Some((_, c)) if c <= t.ready_wall => f.committed_while_down += 1,
            _ => f.committed_after_ready += 1,
        }
    }
    f.outage_s = round3(t.ready_us.saturating_sub(t.kill_us) as f64 / 1e6);
    f.startup_s = round3(t.ready_us.saturating_sub(t.respawn_us) as f64 / 1e6);
    let mut noticed = Histogram::default();
    let mut from_kill = Histogram::default();
    let mut from_ready = Histogram::default();
    let mut won_start = Histogram::default();
    let mut won_open = Histogram::default();
    let mut won_subscribed = Histogram::default();
    let mut live_ready = Histogram::default();
    let mut live_kill = Histogram::default();
    let mut attempts = Vec::new();
    let mut needed = Vec::new();
    for m in mechs {
        let st = &m.st;
        if f.first_initial_failure.is_none() {
            f.first_initial_failure = st.initial_failure.clone();
        }
        if st.dropped_us != 0 {
            noticed.record(st.dropped_us.saturating_sub(t.kill_us));
        }
        if st.resubscribed_us != 0 {
            f.resubscribed += 1;
            from_kill.record(st.resubscribed_us.saturating_sub(t.kill_us));
            let r = st.resubscribed_us.saturating_sub(t.ready_us);
            from_ready.record(r);
            won_start.record(st.won_attempt_us.saturating_sub(t.ready_us));
            won_open.record(st.connected_us.saturating_sub(st.won_attempt_us));
            won_subscribed.record(st.resubscribed_us.saturating_sub(st.won_attempt_us));
            if r as f64 / 1e6 <= RECONNECT_TARGET_S {
                f.within_target_of_ready += 1;
            }
            attempts.push(u64::from(st.attempts));
        }
        f.refused_attempts += u64::from(st.refused);
        f.timed_out_attempts += u64::from(st.timeouts);
        f.other_failed_attempts += u64::from(st.other_failures);
        if f.first_failed_attempt.is_none() {
            f.first_failed_attempt = st.first_failure.clone();
        }
        f.unavailable += u64::from(st.unavailable);
        for e in &st.other_errors {
            *f.other_errors.entry(e.clone()).or_default() += 1;
        }
        if st.resyncs > 0 {
            f.resync_clients += 1;
        }
        f.resyncs += u64::from(st.resyncs);
        f.snapshots += u64::from(st.snapshots);
        for e in &st.ends {
            *f.connection_ends.entry(e.label()).or_default() += 1;
        }
        f.duplicates += st.dups;
        f.out_of_order += st.out_of_order;
        f.foreign += st.foreign;
        let v = judge(m, world, &by_seq, logged, t.ready_wall);
        f.expected += v.expected;
        f.received += v.received;
        f.lost += v.lost;
        f.unexpected += v.unexpected;
        f.covered_by_snapshot += v.covered;
        match (st.resubscribed_us, v.live_us) {
            (0, _) | (_, None) => f.never_live += 1,
            (_, Some(live)) => {
                f.live += 1;
                needed.push(v.needed);
                live_ready.record(live.saturating_sub(t.ready_us));
                live_kill.record(live.saturating_sub(t.kill_us));
            }
        }
    }
    f.noticed_from_kill = noticed.summary();
    f.resubscribed_from_kill = from_kill.summary();
    f.resubscribed_from_ready = from_ready.summary();
    f.won_attempt_from_ready = won_start.summary();
    f.won_attempt_to_open = won_open.summary();
    f.won_attempt_to_subscribed = won_subscribed.summary();
    f.live_from_ready = live_ready.summary();
    f.live_from_kill = live_kill.summary();
    f.attempts = counts(attempts);
    f.caught_up_events = counts(needed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenarios::storm::mechanic::State;
    use uuid::Uuid;

    #[test]
    fn a_mechanic_is_live_once_it_holds_what_was_committed_before_ready() {
        let world = World {
            workshops: vec![Uuid::new_v4()],
            mechanics: vec![(Uuid::new_v4(), Some(0)), (Uuid::new_v4(), None)],
        };
        // seq 0: general, before the kill; 1: workshop 0, while down; 2: general, while
        // down; 3: general, after ready.
        let by_seq = vec![
            Some(Audience::General),
            Some(Audience::Workshop(0)),
            Some(Audience::General),
            Some(Audience::General),
        ];
        let logged = vec![
            Some((10, 100)),
            Some((11, 200)),
            Some((12, 210)),
            Some((13, 400)),
        ];
        let ready_wall = 300;
        let mech = |who: usize, received: &[(u64, i64, u64)]| {
            let mut st = State {
                storm_since: Some(10),
                resubscribed_us: 1_000,
                ..State::default()
            };
            for &(seq, pos, t) in received {
                st.seen.insert(seq);
                if pos > 10 {
                    st.after.push((pos, t));
                }
            }
            Mech {
                who,
                token: String::new(),
                ws: None,
                st,
            }
        };
        let full = mech(
            0,
            &[(0, 10, 0), (1, 11, 1_500), (2, 12, 1_700), (3, 13, 2_500)],
        );
        let v = judge(&full, &world, &by_seq, &logged, ready_wall);
        assert_eq!((v.expected, v.lost, v.unexpected, v.needed), (4, 0, 0, 2));
        assert_eq!(v.live_us, Some(1_700));
        // The freelancer may not see seq 1; it misses seq 2.
        let leaky = mech(1, &[(0, 10, 0), (1, 11, 1_500), (3, 13, 2_500)]);
        let v = judge(&leaky, &world, &by_seq, &logged, ready_wall);
        assert_eq!((v.expected, v.lost, v.unexpected), (3, 1, 1));
        assert_eq!(v.live_us, None);
    }
}
