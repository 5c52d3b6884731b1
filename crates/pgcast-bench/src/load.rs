//! The write side: writer connections committing assignment INSERTs and UPDATEs, paced or as
//! fast as the database commits, each row stamped with a marker, and the log of what was
//! committed and who may see it (the expected set of every reader).
//!
//! The marker `pgcb:<run>:<seq>:<t_us>:` goes into `customer_name`: `run` tells this run's rows
//! from any other, `seq` numbers events densely from 0 (for loss and duplicate counting with a
//! bit set), `t_us` is the writer's clock just before its statement (for latency).
//!
//! (Over 500 lines with its tests: about 200 are the test that the expected sets agree with
//! pgcast's own visibility rule, kept next to the code it checks.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::{Context, Result};
use memchr::memmem::Finder;
use pgcast_events::{Principal, Role};
use pgcast_testkit::oracle;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

use crate::stats::{now_us, Histogram};

const VEHICLE: &str = "2014 VW Golf 1.6 TDI";
const CONCERN: &str = "Grinding noise when braking, worse in the morning.";

const INSERT_ONE: &str = "INSERT INTO session_assignments \
    (id, session_id, mechanic_id, workshop_id, status, urgent, customer_name, vehicle_summary, concern) \
    VALUES ($1, $2, $3, $4, $5, false, $6, $7, $8)";
/// General queued rows, `$6` per transaction, each with its own sequence number.
const INSERT_MANY: &str = "INSERT INTO session_assignments \
    (session_id, status, customer_name, vehicle_summary, concern) \
    SELECT gen_random_uuid(), 'queued', \
           'pgcb:' || $1::int || ':' || ($2::bigint + g) || ':' || $3::bigint || ':', $4::text, $5::text \
    FROM generate_series(0, $6::int - 1) AS g";
const ACCEPT: &str = "UPDATE session_assignments \
    SET status = 'accepted', mechanic_id = $2, customer_name = $3, updated_at = now() WHERE id = $1";
const TOUCH: &str = "UPDATE session_assignments \
    SET urgent = NOT urgent, customer_name = $2, updated_at = now() WHERE id = $1";

/// The marker of one event.
pub(crate) fn marker(run: u32, seq: u64, t_us: u64) -> String {
    format!("pgcb:{run}:{seq}:{t_us}:")
}

/// A marker found in a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Marker {
    pub(crate) run: u32,
    pub(crate) seq: u64,
    pub(crate) t_us: u64,
}

/// Finds the marker in a frame or payload, whatever its JSON formatting.
pub(crate) fn find_marker(payload: &[u8]) -> Option<Marker> {
    static FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"pgcb:"));
    let start = FINDER.find(payload)? + 5;
    let mut fields = [0u64; 3];
    let mut i = start;
    for field in &mut fields {
        let digits = i;
        while let Some(d @ b'0'..=b'9') = payload.get(i) {
            *field = field.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            i += 1;
        }
        if i == digits || payload.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
    }
    Some(Marker {
        run: u32::try_from(fields[0]).ok()?,
        seq: fields[1],
        t_us: fields[2],
    })
}

/// Who may see an event on the `queue` topic (docs/architecture.md §5), in the bench's own terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Audience {
    /// A general queued assignment (no workshop, no mechanic), or one leaving that queue:
    /// every mechanic.
    General,
    /// Queued for workshop `n`, or leaving that queue: its mechanics.
    Workshop(u16),
    /// Offered to mechanic `n` directly: that mechanic only.
    Mechanic(u32),
}

/// The mechanics and workshops of a scenario.
#[derive(Debug, Clone)]
pub(crate) struct World {
    pub(crate) workshops: Vec<Uuid>,
    /// Each mechanic's id and workshop index.
    pub(crate) mechanics: Vec<(Uuid, Option<u16>)>,
}

impl World {
    /// `mechanics` spread evenly over `workshops` (none when 0).
    pub(crate) fn new(mechanics: usize, workshops: usize) -> World {
        let ws: Vec<Uuid> = (0..workshops).map(|_| Uuid::new_v4()).collect();
        World {
            mechanics: (0..mechanics)
                .map(|i| {
                    let w = (workshops > 0).then(|| (i % workshops) as u16);
                    (Uuid::new_v4(), w)
                })
                .collect(),
            workshops: ws,
        }
    }

    /// Does mechanic `m` (subscribed to `queue`) receive an event of `audience`? Judged by the
    /// tests' independent visibility oracle ([`pgcast_testkit::oracle`]) on the row an event of
    /// that audience stands in while it is in the queue: general or workshop `queued`, or
    /// `offered` to one mechanic (an event leaving a queue reaches who saw it before).
    pub(crate) fn sees(&self, m: usize, audience: Audience) -> bool {
        let (id, workshop) = self.mechanics[m];
        let who = Principal {
            user_id: id,
            role: Role::Mechanic,
            workshop_id: workshop.map(|w| self.workshops[usize::from(w)]),
        };
        let row = match audience {
            Audience::General => queued_row(None, None),
            Audience::Workshop(w) => queued_row(None, Some(self.workshops[usize::from(w)])),
            Audience::Mechanic(n) => oracle::Row {
                status: "offered",
                ..queued_row(Some(self.mechanics[n as usize].0), None)
            },
        };
        oracle::may_see("queue", &who, &row, None)
    }
}

/// A `queued` row as the oracle judges it (the session plays no part on `queue`).
fn queued_row(mechanic: Option<Uuid>, workshop: Option<Uuid>) -> oracle::Row {
    oracle::Row {
        session: Uuid::nil(),
        status: "queued",
        mechanic,
        workshop,
    }
}

/// What the writers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mix {
    /// Only general queued inserts (visible to every mechanic and every service).
    General,
    /// A marketplace: 20 % general inserts, 30 % workshop inserts, 10 % direct offers,
    /// 25 % accepts of an open row, 15 % edits of an open row.
    Marketplace,
}

/// A write load.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) writers: usize,
    /// Total events per second; `None` = as fast as the database commits.
    pub(crate) rate: Option<f64>,
    /// Rows per transaction (`Mix::General` only).
    pub(crate) batch: u32,
    pub(crate) duration: Duration,
    pub(crate) mix: Mix,
    pub(crate) run: u32,
    pub(crate) seed: u64,
}

/// One committed event.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rec {
    pub(crate) seq: u64,
    pub(crate) audience: Audience,
}

/// What the writers committed.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) recs: Vec<Rec>,
    pub(crate) failed: u64,
    pub(crate) errors: Vec<String>,
    /// Statement round trips (execute + commit), µs.
    pub(crate) rtt: Histogram,
    pub(crate) started_us: u64,
    pub(crate) ended_us: u64,
}

impl Outcome {
    pub(crate) fn committed(&self) -> u64 {
        self.recs.len() as u64
    }

    /// Audience of every sequence number (`None`: never committed).
    pub(crate) fn by_seq(&self) -> Vec<Option<Audience>> {
        let len = self.recs.iter().map(|r| r.seq + 1).max().unwrap_or(0);
        let mut v = vec![None; len as usize];
        for r in &self.recs {
            v[r.seq as usize] = Some(r.audience);
        }
        v
    }

    /// Events mechanic `m` of `world` must receive on `queue`: the committed events of every
    /// audience [`World::sees`] gives them.
    pub(crate) fn expected_for(&self, counts: &AudienceCounts, world: &World, m: usize) -> u64 {
        let mut n = 0;
        if world.sees(m, Audience::General) {
            n += counts.general;
        }
        for (w, c) in counts.workshop.iter().enumerate() {
            if *c > 0 && world.sees(m, Audience::Workshop(w as u16)) {
                n += c;
            }
        }
        for (other, c) in counts.mechanic.iter().enumerate() {
            if *c > 0 && world.sees(m, Audience::Mechanic(other as u32)) {
                n += c;
            }
        }
        n
    }

    pub(crate) fn counts(&self, world: &World) -> AudienceCounts {
        let mut c = AudienceCounts {
            general: 0,
            workshop: vec![0; world.workshops.len()],
            mechanic: vec![0; world.mechanics.len()],
        };
        for r in &self.recs {
            match r.audience {
                Audience::General => c.general += 1,
                Audience::Workshop(w) => c.workshop[usize::from(w)] += 1,
                Audience::Mechanic(m) => c.mechanic[m as usize] += 1,
            }
        }
        c
    }
}

/// Committed events per audience.
#[derive(Debug, Clone)]
pub(crate) struct AudienceCounts {
    pub(crate) general: u64,
    pub(crate) workshop: Vec<u64>,
    pub(crate) mechanic: Vec<u64>,
}

/// Connects `n` writer sessions.
pub(crate) async fn connect_writers(pg: &tokio_postgres::Config, n: usize) -> Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let (client, connection) = pg.connect(NoTls).await.context("connect a writer")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        clients.push(client);
    }
    Ok(clients)
}

/// Runs `plan` on `clients` (one per writer) and returns what was committed.
pub(crate) async fn run(clients: &[Client], plan: Plan, world: Option<Arc<World>>) -> Outcome {
    let seq = Arc::new(AtomicU64::new(0));
    let started_us = now_us();
    let outs = futures::future::join_all(
        clients
            .iter()
            .enumerate()
            .map(|(i, client)| writer(i, client, plan, seq.clone(), world.clone())),
    )
    .await;
    let mut total = Outcome {
        started_us,
        ended_us: now_us(),
        ..Outcome::default()
    };
    for o in outs {
        total.recs.extend(o.recs);
        total.failed += o.failed;
        total.rtt.merge(&o.rtt);
        for e in o.errors {
            if total.errors.len() < 5 {
                total.errors.push(e);
            }
        }
    }
    total
}

async fn writer(
    index: usize,
    client: &Client,
    plan: Plan,
    seq: Arc<AtomicU64>,
    world: Option<Arc<World>>,
) -> Outcome {
    let mut out = Outcome::default();
    let prepared = async {
        Ok::<_, tokio_postgres::Error>((
            client.prepare(INSERT_ONE).await?,
            client.prepare(INSERT_MANY).await?,
            client.prepare(ACCEPT).await?,
            client.prepare(TOUCH).await?,
        ))
    }
    .await;
    let (insert_one, insert_many, accept, touch) = match prepared {
        Ok(s) => s,
        Err(e) => {
            out.errors.push(format!("prepare: {e}"));
            return out;
        }
    };
    let mut rng = StdRng::seed_from_u64(plan.seed.wrapping_add(index as u64));
    let writers = plan.writers.max(1) as f64;
    let mut ticker = plan.rate.map(|rate| {
        let period = Duration::from_secs_f64(f64::from(plan.batch) * writers / rate);
        let offset = period.mul_f64(index as f64 / writers);
        tokio::time::interval_at(tokio::time::Instant::now() + offset, period)
    });
    let deadline = tokio::time::Instant::now() + plan.duration;
    // This writer's open queued rows: (id, audience), for accepts and edits.
    let mut open: Vec<(Uuid, Audience)> = Vec::new();
    let run = plan.run as i32;
    loop {
        if let Some(t) = ticker.as_mut() {
            t.tick().await;
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        let result = match plan.mix {
            Mix::General => {
                let n = plan.batch.max(1);
                let base = seq.fetch_add(u64::from(n), Ordering::Relaxed);
                let t = now_us();
                let r = client
                    .execute(
                        &insert_many,
                        &[
                            &run,
                            &(base as i64),
                            &(t as i64),
                            &VEHICLE,
                            &CONCERN,
                            &(n as i32),
                        ],
                    )
                    .await;
                out.rtt.record(now_us() - t);
                r.map(|rows| {
                    for s in base..base + rows {
                        out.recs.push(Rec {
                            seq: s,
                            audience: Audience::General,
                        });
                    }
                })
            }
            Mix::Marketplace => {
                let world = world.as_deref().expect("a marketplace load needs a world");
                let s = seq.fetch_add(1, Ordering::Relaxed);
                let roll = rng.random_range(0..100u32);
                let op = match roll {
                    0..20 => Op::General,
                    20..50 if !world.workshops.is_empty() => Op::Workshop,
                    20..50 => Op::General,
                    50..60 => Op::Offer,
                    60..85 if !open.is_empty() => Op::Accept,
                    85..100 if !open.is_empty() => Op::Touch,
                    _ => Op::General,
                };
                let t = now_us();
                let name = marker(plan.run, s, t);
                let r = match op {
                    Op::General | Op::Workshop | Op::Offer => {
                        let id = Uuid::new_v4();
                        let (mechanic, workshop, status, audience) = match op {
                            Op::General => (None, None, "queued", Audience::General),
                            Op::Workshop => {
                                let w = rng.random_range(0..world.workshops.len());
                                (
                                    None,
                                    Some(world.workshops[w]),
                                    "queued",
                                    Audience::Workshop(w as u16),
                                )
                            }
                            _ => {
                                let m = rng.random_range(0..world.mechanics.len());
                                (
                                    Some(world.mechanics[m].0),
                                    None,
                                    "offered",
                                    Audience::Mechanic(m as u32),
                                )
                            }
                        };
                        let r = client
                            .execute(
                                &insert_one,
                                &[
                                    &id,
                                    &Uuid::new_v4(),
                                    &mechanic,
                                    &workshop,
                                    &status,
                                    &name,
                                    &VEHICLE,
                                    &CONCERN,
                                ],
                            )
                            .await;
                        if r.is_ok() && status == "queued" {
                            open.push((id, audience));
                        }
                        r.map(|n| (n, audience))
                    }
                    Op::Accept => {
                        let (id, audience) = open.swap_remove(rng.random_range(0..open.len()));
                        let m = world.mechanics[rng.random_range(0..world.mechanics.len())].0;
                        client
                            .execute(&accept, &[&id, &m, &name])
                            .await
                            .map(|n| (n, audience))
                    }
                    Op::Touch => {
                        let (id, audience) = open[rng.random_range(0..open.len())];
                        client
                            .execute(&touch, &[&id, &name])
                            .await
                            .map(|n| (n, audience))
                    }
                };
                out.rtt.record(now_us() - t);
                r.map(|(n, audience)| {
                    if n == 1 {
                        out.recs.push(Rec { seq: s, audience });
                    }
                })
            }
        };
        if let Err(e) = result {
            out.failed += 1;
            if out.errors.len() < 5 {
                out.errors.push(e.to_string());
            }
            if client.is_closed() {
                break;
            }
        }
    }
    out
}

#[derive(Debug, Clone, Copy)]
enum Op {
    General,
    Workshop,
    Offer,
    Accept,
    Touch,
}

/// Inserts `n` general queued rows in transactions of `batch` rows (catch-up set-up).
pub(crate) async fn bulk_insert(client: &Client, run: u32, n: u64, batch: u32) -> Result<()> {
    let stmt = client.prepare(INSERT_MANY).await?;
    let mut done = 0u64;
    while done < n {
        let rows = (n - done).min(u64::from(batch)) as i32;
        client
            .execute(
                &stmt,
                &[
                    &(run as i32),
                    &(done as i64),
                    &(now_us() as i64),
                    &VEHICLE,
                    &CONCERN,
                    &rows,
                ],
            )
            .await
            .context("bulk insert")?;
        done += rows as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgcast_events::{
        Assignment, AssignmentEvent, EventKind, Principal, PriorState, Role, Status, Topic,
    };

    #[test]
    fn markers_round_trip_in_any_json_formatting() {
        let m = marker(3, 17, 123_456);
        for text in [
            format!(r#"{{"customer_name":"{m}","x":1}}"#),
            format!(r#"{{"row": {{"customer_name": "{m}"}}}}"#),
        ] {
            assert_eq!(
                find_marker(text.as_bytes()),
                Some(Marker {
                    run: 3,
                    seq: 17,
                    t_us: 123_456
                })
            );
        }
        assert_eq!(find_marker(b"no marker"), None);
        assert_eq!(find_marker(b"pgcb:1:2:"), None);
        assert_eq!(find_marker(b"pgcb:1:x:3:"), None);
    }

    /// The bench's expected sets must agree with pgcast's own visibility rule for every kind
    /// of write the marketplace load makes.
    #[test]
    fn audiences_agree_with_the_queue_rule() {
        let world = World::new(6, 2);
        let other_workshop = Uuid::new_v4();
        let row = |mechanic: Option<Uuid>, workshop: Option<Uuid>, status: Status| Assignment {
            id: Uuid::new_v4(),
            session_id: Uuid::new_v4(),
            mechanic_id: mechanic,
            workshop_id: workshop,
            status,
            urgent: false,
            customer_name: None,
            vehicle_summary: None,
            concern: None,
            created_at: None,
            updated_at: None,
        };
        let event = |kind, assignment, prior| AssignmentEvent {
            position: 1,
            kind,
            assignment,
            prior,
            committed_at: chrono::DateTime::UNIX_EPOCH,
            customer_id: None,
        };
        let queued = |workshop| PriorState {
            status: Status::Queued,
            mechanic_id: None,
            workshop_id: workshop,
        };
        let w0 = world.workshops[0];
        let m3 = world.mechanics[3].0;
        let cases = [
            (
                event(EventKind::Created, row(None, None, Status::Queued), None),
                Audience::General,
            ),
            (
                event(
                    EventKind::Created,
                    row(None, Some(w0), Status::Queued),
                    None,
                ),
                Audience::Workshop(0),
            ),
            (
                event(
                    EventKind::Created,
                    row(Some(m3), None, Status::Offered),
                    None,
                ),
                Audience::Mechanic(3),
            ),
            (
                event(
                    EventKind::Updated,
                    row(Some(m3), None, Status::Accepted),
                    Some(queued(None)),
                ),
                Audience::General,
            ),
            (
                event(
                    EventKind::Updated,
                    row(Some(m3), Some(w0), Status::Accepted),
                    Some(queued(Some(w0))),
                ),
                Audience::Workshop(0),
            ),
            (
                event(
                    EventKind::Updated,
                    row(None, Some(w0), Status::Queued),
                    Some(queued(Some(w0))),
                ),
                Audience::Workshop(0),
            ),
        ];
        let mut principals: Vec<(Option<usize>, Principal)> = world
            .mechanics
            .iter()
            .enumerate()
            .map(|(i, (id, w))| {
                (
                    Some(i),
                    Principal {
                        user_id: *id,
                        role: Role::Mechanic,
                        workshop_id: w.map(|w| world.workshops[usize::from(w)]),
                    },
                )
            })
            .collect();
        // A mechanic of a workshop the load never writes to sees only general rows.
        principals.push((
            None,
            Principal {
                user_id: Uuid::new_v4(),
                role: Role::Mechanic,
                workshop_id: Some(other_workshop),
            },
        ));
        for (ev, audience) in &cases {
            for (m, p) in &principals {
                let rule = Topic::Queue.matches(p, ev);
                let ours = match m {
                    Some(m) => world.sees(*m, *audience),
                    None => *audience == Audience::General,
                };
                assert_eq!(rule, ours, "{audience:?} for {p:?}");
            }
        }
    }

    #[test]
    fn expected_counts_follow_audiences() {
        let world = World::new(4, 2);
        let out = Outcome {
            recs: vec![
                Rec {
                    seq: 0,
                    audience: Audience::General,
                },
                Rec {
                    seq: 1,
                    audience: Audience::Workshop(1),
                },
                Rec {
                    seq: 3,
                    audience: Audience::Mechanic(2),
                },
            ],
            ..Outcome::default()
        };
        let counts = out.counts(&world);
        // Mechanics 0 and 2 are in workshop 0, 1 and 3 in workshop 1.
        let expected: Vec<u64> = (0..4)
            .map(|m| out.expected_for(&counts, &world, m))
            .collect();
        assert_eq!(expected, vec![1, 2, 2, 2]);
        let by_seq = out.by_seq();
        assert_eq!(by_seq.len(), 4);
        assert_eq!(by_seq[2], None);
    }
}
