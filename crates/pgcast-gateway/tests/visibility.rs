//! Who sees what (docs/architecture.md §5) over real sockets and a real database: every topic rule, the
//! "before or after" delivery of updates, authorization of subscriptions, queue snapshots, and
//! a randomized comparison of every client's received frames with the rules.
//!
//! Absence is proven without sleeping: events reach one connection in position order, so
//! when a later "marker" row (general and queued: in every mechanic's queue) arrives, every
//! earlier frame for that connection has arrived too.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use common::*;
use pgcast_events::{Principal, Role};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_postgres::GenericClient;
use uuid::Uuid;

fn id_of(ev: &Value) -> Uuid {
    ev["assignment"]["id"].as_str().unwrap().parse().unwrap()
}

fn pos_of(ev: &Value) -> i64 {
    ev["position"].as_i64().unwrap()
}

/// Inserts the marker: a general queued row, in every mechanic's queue.
async fn marker(h: &Harness) -> Uuid {
    h.insert(Uuid::new_v4(), "queued", None, None).await
}

/// Every event frame before the `marker` row's frame (which must arrive, on `queue`).
async fn until_marker(ws: &mut Ws, marker: Uuid) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let ev = ws.events(1).await.remove(0);
        if id_of(&ev) == marker {
            assert_eq!(ev["topic"], "queue", "{ev}");
            return got;
        }
        got.push(ev);
    }
}

/// (assignment id, status, old_status) of each frame, in order.
fn steps(events: &[Value]) -> Vec<(Uuid, String, Option<String>)> {
    events
        .iter()
        .map(|e| {
            (
                id_of(e),
                e["assignment"]["status"].as_str().unwrap().to_owned(),
                e["old_status"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

async fn queue_clients(h: &Harness, who: &[Principal]) -> Vec<Ws> {
    let mut clients = Vec::new();
    for p in who {
        let mut ws = h.client(p).await;
        ws.subscribe("queue", json!({})).await;
        clients.push(ws);
    }
    clients
}

#[tokio::test]
async fn queue_holds_general_own_workshop_and_own_offers_only() {
    let h = Harness::start().await;
    let (wa, wb) = (Uuid::new_v4(), Uuid::new_v4());
    let a1 = mechanic(Some(wa));
    let a2 = mechanic(Some(wa));
    let b1 = mechanic(Some(wb));
    let f1 = mechanic(None);
    let f2 = mechanic(None);
    let mut clients = queue_clients(&h, &[a1, a2, b1, f1, f2]).await;

    let s = Uuid::new_v4();
    let general = h.insert(s, "queued", None, None).await;
    let for_a = h.insert(s, "queued", None, Some(wa)).await;
    let for_b = h.insert(s, "queued", None, Some(wb)).await;
    let offered_f2 = h.insert(s, "offered", Some(f2.user_id), None).await;
    // Offered directly to a1 inside workshop A: not for a1's colleague a2.
    let offered_a1 = h.insert(s, "offered", Some(a1.user_id), Some(wa)).await;
    let m = marker(&h).await;

    let expected = [
        vec![general, for_a, offered_a1],
        vec![general, for_a],
        vec![general, for_b],
        vec![general],
        vec![general, offered_f2],
    ];
    for (ws, want) in clients.iter_mut().zip(expected) {
        let got = until_marker(ws, m).await;
        for e in &got {
            assert_eq!(e["topic"], "queue");
            assert_eq!(e["event"], "assignment.created");
            assert_eq!(e["old_status"], Value::Null);
        }
        assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), want);
    }
    h.stop().await;
}

#[tokio::test]
async fn leaving_the_queue_reaches_every_mechanic_who_could_see_it() {
    let h = Harness::start().await;
    let (wa, wb) = (Uuid::new_v4(), Uuid::new_v4());
    let who = [
        mechanic(Some(wa)),
        mechanic(Some(wa)),
        mechanic(Some(wb)),
        mechanic(None),
        mechanic(None),
    ];
    let [a1, a2, _b1, f1, f2] = who;
    let mut clients = queue_clients(&h, &who).await;
    let all = [0, 1, 2, 3, 4];
    let mut expect: Vec<Vec<(Uuid, String, Option<String>)>> = vec![Vec::new(); 5];
    let mut note = |to: &[usize], id: Uuid, status: &str, old: Option<&str>| {
        for &i in to {
            expect[i].push((id, status.to_owned(), old.map(str::to_owned)));
        }
    };

    let s = Uuid::new_v4();
    let g1 = h.insert(s, "queued", None, None).await;
    note(&all, g1, "queued", None);
    let g2 = h.insert(s, "queued", None, None).await;
    note(&all, g2, "queued", None);
    let g3 = h.insert(s, "queued", None, None).await;
    note(&all, g3, "queued", None);
    let ra = h.insert(s, "queued", None, Some(wa)).await;
    note(&[0, 1], ra, "queued", None);
    let off = h.insert(s, "offered", Some(f2.user_id), None).await;
    note(&[4], off, "offered", None);

    // A workshop mechanic takes a general assignment: every mechanic's card disappears.
    h.update(g1, "accepted", Some(a1.user_id), Some(wa)).await;
    note(&all, g1, "accepted", Some("queued"));
    // A freelancer takes one.
    h.update(g2, "accepted", Some(f1.user_id), None).await;
    note(&all, g2, "accepted", Some("queued"));
    // Cancelled / expired also leave every queue that held them.
    h.update(g3, "cancelled", None, None).await;
    note(&all, g3, "cancelled", Some("queued"));
    // Workshop A's row accepted by a2: workshop A only.
    h.update(ra, "accepted", Some(a2.user_id), Some(wa)).await;
    note(&[0, 1], ra, "accepted", Some("queued"));
    // The direct offer accepted: the offered mechanic only.
    h.update(off, "accepted", Some(f2.user_id), None).await;
    note(&[4], off, "accepted", Some("offered"));
    // Out of every queue before and after: no queue event at all.
    h.update(g1, "completed", Some(a1.user_id), Some(wa)).await;
    let m = marker(&h).await;

    for (i, ws) in clients.iter_mut().enumerate() {
        let got = until_marker(ws, m).await;
        assert_eq!(steps(&got), expect[i], "mechanic #{i}");
        for e in &got {
            assert_eq!(e["topic"], "queue");
        }
    }
    h.stop().await;
}

#[tokio::test]
async fn a_row_moving_between_workshops_reaches_both_sides_and_nobody_else() {
    let h = Harness::start().await;
    let (wa, wb, wc) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let who = [
        mechanic(Some(wa)),
        mechanic(Some(wb)),
        mechanic(Some(wc)),
        mechanic(None),
    ];
    let mut clients = Vec::new();
    for p in &who {
        let mut ws = h.client(p).await;
        ws.subscribe("queue", json!({})).await;
        if let Some(w) = p.workshop_id {
            ws.subscribe(&format!("workshop:{w}"), json!({})).await;
        }
        clients.push(ws);
    }
    let q = "queue".to_owned();
    let ws_topic = |w: Uuid| format!("workshop:{w}");
    let mut expect: Vec<BTreeSet<(i64, String)>> = vec![BTreeSet::new(); 4];

    let s = Uuid::new_v4();
    let r = h.insert(s, "queued", None, Some(wa)).await;
    let p = h.log_head().await;
    expect[0].extend([(p, q.clone()), (p, ws_topic(wa))]);
    // A → B, still queued: both sides, queue and workshop topics.
    h.update(r, "queued", None, Some(wb)).await;
    let p = h.log_head().await;
    expect[0].extend([(p, q.clone()), (p, ws_topic(wa))]);
    expect[1].extend([(p, q.clone()), (p, ws_topic(wb))]);
    // B → general: everybody's queue, and workshop B sees it leave.
    h.update(r, "queued", None, None).await;
    let p = h.log_head().await;
    for e in &mut expect {
        e.insert((p, q.clone()));
    }
    expect[1].insert((p, ws_topic(wb)));
    // general → C: everybody's queue (it leaves), workshop C sees it arrive.
    h.update(r, "queued", None, Some(wc)).await;
    let p = h.log_head().await;
    for e in &mut expect {
        e.insert((p, q.clone()));
    }
    expect[2].insert((p, ws_topic(wc)));
    // C → A: C and A only; not B, not the freelancer.
    h.update(r, "queued", None, Some(wa)).await;
    let p = h.log_head().await;
    expect[2].extend([(p, q.clone()), (p, ws_topic(wc))]);
    expect[0].extend([(p, q.clone()), (p, ws_topic(wa))]);
    let m = marker(&h).await;

    for (i, ws) in clients.iter_mut().enumerate() {
        let got = until_marker(ws, m).await;
        let set: BTreeSet<(i64, String)> = got
            .iter()
            .map(|e| (pos_of(e), e["topic"].as_str().unwrap().to_owned()))
            .collect();
        assert_eq!(set.len(), got.len(), "duplicates for mechanic #{i}");
        assert_eq!(set, expect[i], "mechanic #{i}");
        assert!(got.iter().all(|e| id_of(e) == r));
    }
    h.stop().await;
}

#[tokio::test]
async fn subscriptions_are_authorized_by_claims() {
    let h = Harness::start().await;
    let (wa, wb) = (Uuid::new_v4(), Uuid::new_v4());
    let m1 = mechanic(Some(wa));
    let m2 = mechanic(Some(wb));
    let free = mechanic(None);
    let cust = customer();
    let svc = service();

    let mut w1 = h.client(&m1).await;
    for topic in [
        format!("mechanic:{}", m2.user_id),
        format!("workshop:{wb}"),
        "assignments".to_owned(),
    ] {
        w1.subscribe_err(&topic, "forbidden").await;
        w1.ping().await;
    }
    w1.subscribe(&format!("mechanic:{}", m1.user_id), json!({}))
        .await;
    w1.subscribe(&format!("workshop:{wa}"), json!({})).await;
    w1.subscribe("queue", json!({})).await;

    let mut wf = h.client(&free).await;
    wf.subscribe_err(&format!("workshop:{wa}"), "forbidden")
        .await;
    wf.subscribe_err(&format!("mechanic:{}", m1.user_id), "forbidden")
        .await;
    wf.ping().await;
    wf.subscribe("queue", json!({})).await;

    let mut wc = h.client(&cust).await;
    for topic in [
        "queue".to_owned(),
        "assignments".to_owned(),
        format!("mechanic:{}", cust.user_id),
        format!("workshop:{wa}"),
    ] {
        wc.subscribe_err(&topic, "forbidden").await;
        wc.ping().await;
    }

    let mut ws = h.client(&svc).await;
    ws.subscribe_err("queue", "forbidden").await;
    ws.ping().await;
    ws.subscribe("assignments", json!({})).await;

    let mut w2 = h.client(&m2).await;
    w2.subscribe("queue", json!({})).await;

    // Refused subscriptions deliver nothing: m1 sees only its own rows.
    let s = Uuid::new_v4();
    let x1 = h.insert(s, "accepted", Some(m2.user_id), Some(wb)).await;
    let x2 = h.insert(s, "accepted", Some(m1.user_id), Some(wa)).await;
    let m = marker(&h).await;

    let got: BTreeSet<(Uuid, String)> = until_marker(&mut w1, m)
        .await
        .iter()
        .map(|e| (id_of(e), e["topic"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(
        got,
        BTreeSet::from([
            (x2, format!("mechanic:{}", m1.user_id)),
            (x2, format!("workshop:{wa}")),
        ])
    );
    assert!(until_marker(&mut wf, m).await.is_empty());
    assert!(until_marker(&mut w2, m).await.is_empty());
    let all = ws.events(3).await;
    assert_eq!(all.iter().map(id_of).collect::<Vec<_>>(), vec![x1, x2, m]);
    assert!(all.iter().all(|e| e["topic"] == "assignments"));
    wc.ping().await;
    h.stop().await;
}

#[tokio::test]
async fn a_session_is_followed_by_its_customer_and_assigned_mechanic_only() {
    let h = Harness::start().await;
    let c = customer();
    let c2 = customer();
    let m = mechanic(None);
    let m2 = mechanic(Some(Uuid::new_v4()));
    let s = h.insert_session(c.user_id).await;
    let s2 = h.insert_session(c2.user_id).await;
    let topic = format!("session:{s}");

    let mut wc = h.client(&c).await;
    wc.subscribe(&topic, json!({})).await;
    // Another customer's session, and a session that does not exist.
    wc.subscribe_err(&format!("session:{s2}"), "forbidden")
        .await;
    wc.subscribe_err(&format!("session:{}", Uuid::new_v4()), "forbidden")
        .await;
    wc.ping().await;

    let mut wc2 = h.client(&c2).await;
    wc2.subscribe_err(&topic, "forbidden").await;
    wc2.ping().await;
    wc2.subscribe(&format!("session:{s2}"), json!({})).await;

    // Not assigned yet: no access.
    let mut wm = h.client(&m).await;
    wm.subscribe_err(&topic, "forbidden").await;
    wm.ping().await;

    let a = h.insert(s, "queued", None, None).await;
    let ev = wc.events(1).await.remove(0);
    assert_eq!(ev["topic"], topic.as_str());
    assert_eq!(ev["event"], "assignment.created");
    assert_eq!(ev["assignment"]["id"], a.to_string());
    assert_eq!(ev["assignment"]["session_id"], s.to_string());
    assert_eq!(ev["assignment"]["status"], "queued");

    h.update(a, "accepted", Some(m.user_id), None).await;
    let ev = wc.events(1).await.remove(0);
    assert_eq!(ev["event"], "assignment.updated");
    assert_eq!(ev["old_status"], "queued");
    assert_eq!(ev["assignment"]["status"], "accepted");
    assert_eq!(ev["assignment"]["mechanic_id"], m.user_id.to_string());

    // Now assigned: the mechanic may follow the session; an unrelated one may not.
    wm.subscribe(&topic, json!({})).await;
    let mut wm2 = h.client(&m2).await;
    wm2.subscribe_err(&topic, "forbidden").await;
    wm2.ping().await;

    h.update(a, "completed", Some(m.user_id), None).await;
    for ws in [&mut wc, &mut wm] {
        let ev = ws.events(1).await.remove(0);
        assert_eq!(ev["topic"], topic.as_str());
        assert_eq!(ev["old_status"], "accepted");
        assert_eq!(ev["assignment"]["status"], "completed");
    }

    // Another session's event reaches its own customer only: the next frame c and m get is
    // the later event of their session.
    let other = h.insert(s2, "queued", None, None).await;
    let last = h.insert(s, "queued", None, None).await;
    assert_eq!(id_of(&wc2.events(1).await[0]), other);
    assert_eq!(id_of(&wc.events(1).await[0]), last);
    assert_eq!(id_of(&wm.events(1).await[0]), last);
    h.stop().await;
}

#[tokio::test]
async fn a_queue_snapshot_holds_exactly_the_rows_the_rules_allow() {
    let h = Harness::start().await;
    let (wa, wb) = (Uuid::new_v4(), Uuid::new_v4());
    let me = mechanic(Some(wa));
    let colleague = mechanic(Some(wa));
    let other = mechanic(Some(wb));
    let free = mechanic(None);
    let s = Uuid::new_v4();
    let (me_id, col_id, free_id) = (
        Some(me.user_id),
        Some(colleague.user_id),
        Some(free.user_id),
    );

    let general = h.insert(s, "queued", None, None).await;
    let for_a = h.insert(s, "queued", None, Some(wa)).await;
    let for_b = h.insert(s, "queued", None, Some(wb)).await;
    let offered_me = h.insert(s, "offered", me_id, Some(wa)).await;
    let offered_me_plain = h.insert(s, "offered", me_id, None).await;
    let direct_me = h.insert(s, "queued", me_id, None).await;
    let offered_free = h.insert(s, "offered", free_id, None).await;
    // Never in my queue: offers and direct rows of others (even my colleague's), rows out of
    // the queue, an offer to nobody.
    let offered_col = h.insert(s, "offered", col_id, Some(wa)).await;
    let direct_col = h.insert(s, "queued", col_id, Some(wa)).await;
    h.insert(s, "accepted", me_id, Some(wa)).await;
    h.insert(s, "accepted", None, None).await;
    h.insert(s, "cancelled", None, Some(wa)).await;
    h.insert(s, "expired", None, None).await;
    h.insert(s, "completed", me_id, None).await;
    h.insert(s, "declined", me_id, Some(wa)).await;
    h.insert(s, "offered", None, Some(wa)).await;
    // One that leaves the general queue before the snapshot.
    let taken = h.insert(s, "queued", None, None).await;
    h.update(taken, "accepted", Some(other.user_id), None).await;
    let head = h.log_head().await;

    for (who, want) in [
        (
            me,
            vec![general, for_a, offered_me, offered_me_plain, direct_me],
        ),
        (other, vec![general, for_b]),
        (free, vec![general, offered_free]),
        (colleague, vec![general, for_a, offered_col, direct_col]),
    ] {
        let mut ws = h.client(&who).await;
        let sub = ws.subscribe("queue", json!({"snapshot": true})).await;
        assert_eq!(sub["position"], head);
        let snap = ws.recv().await;
        assert_eq!(snap["type"], "snapshot", "{snap}");
        assert_eq!(snap["position"], head);
        let got: BTreeSet<Uuid> = snap["assignments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_str().unwrap().parse().unwrap())
            .collect();
        assert_eq!(got.len(), snap["assignments"].as_array().unwrap().len());
        let names = [
            (general, "general"),
            (for_a, "for_a"),
            (for_b, "for_b"),
            (offered_me, "offered_me"),
            (offered_me_plain, "offered_me_plain"),
            (direct_me, "direct_me"),
            (offered_free, "offered_free"),
            (offered_col, "offered_col"),
            (direct_col, "direct_col"),
        ];
        let name = |id: &Uuid| {
            names
                .iter()
                .find(|(n, _)| n == id)
                .map_or_else(|| id.to_string(), |(_, s)| (*s).to_owned())
        };
        let want: BTreeSet<Uuid> = want.into_iter().collect();
        assert_eq!(
            got,
            want,
            "snapshot of {who:?}: extra {:?}, missing {:?}",
            got.difference(&want).map(name).collect::<Vec<_>>(),
            want.difference(&got).map(name).collect::<Vec<_>>()
        );
    }
    // Cross-user data is not in a customer's reach at all.
    let mut wc = h.client(&customer()).await;
    wc.send(json!({"type": "subscribe", "id": "bad", "topic": "queue", "snapshot": true}))
        .await;
    wc.expect_error("forbidden").await;
    wc.ping().await;
    h.stop().await;
}

// ---- Randomized comparison with the rules -------------------------------------------------

// Who may see what comes from the test kit's oracle, written from the README and not taken
// from `pgcast_events`, so a wrong rule in the library shows up as a difference.
use pgcast_testkit::oracle::{self, Row as RowSt, STATUSES};

fn status(s: &str) -> &'static str {
    oracle::status(s)
}

fn state_of(a: &Value) -> RowSt {
    RowSt::from_json(a)
}

/// Is `mechanic` a member of `session` with the rows as they stand in `rows`?
fn member(rows: &HashMap<Uuid, RowSt>, session: Uuid, mechanic: Uuid) -> bool {
    oracle::is_member(rows.values(), session, mechanic)
}

/// May `who` on `topic` see `s`? (A mechanic on `session:<id>` is judged by [`member`].)
/// `customer_of` maps the sessions that have a `sessions` row to their customer.
fn visible(topic: &str, who: &Principal, s: &RowSt, customer_of: &HashMap<Uuid, Uuid>) -> bool {
    oracle::may_see(topic, who, s, customer_of.get(&s.session).copied())
}

#[derive(Debug, Clone, Copy)]
enum OpKind {
    Insert,
    Update,
    Delete,
}

/// One write of the simulation, in commit order.
#[derive(Debug, Clone, Copy)]
struct Op {
    id: Uuid,
    kind: OpKind,
    /// The row as written (for a delete: as it was).
    row: RowSt,
}

async fn apply(c: &impl GenericClient, op: &Op) {
    let r = &op.row;
    let n = match op.kind {
        OpKind::Insert => {
            c.execute(
                "INSERT INTO session_assignments (id, session_id, status, mechanic_id,
                    workshop_id, customer_name, vehicle_summary, concern)
                 VALUES ($1, $2, $3, $4, $5, 'Ana', '2014 VW Golf', 'noise')",
                &[&op.id, &r.session, &r.status, &r.mechanic, &r.workshop],
            )
            .await
        }
        OpKind::Update => {
            c.execute(
                "UPDATE session_assignments SET status = $2, mechanic_id = $3, workshop_id = $4,
                    updated_at = now() WHERE id = $1",
                &[&op.id, &r.status, &r.mechanic, &r.workshop],
            )
            .await
        }
        OpKind::Delete => {
            c.execute("DELETE FROM session_assignments WHERE id = $1", &[&op.id])
                .await
        }
    };
    assert_eq!(n.unwrap(), 1, "{op:?}");
}

struct Client {
    who: Principal,
    topics: Vec<String>,
    /// The marker whose frame ends this client's stream.
    last_marker: Uuid,
    /// Sends a fresh token (same claims) after this many frames: delivery must not notice.
    refresh_after: Option<usize>,
    /// How many frames carry the last marker (one per topic that sees it).
    marker_frames: usize,
}

/// What one client's socket delivered: event frames, and for each `revoked` frame its topic and
/// the number of event frames before it.
#[derive(Default)]
struct Stream {
    events: Vec<Value>,
    revoked: Vec<(String, usize)>,
    refreshed: bool,
}

#[tokio::test]
async fn random_writes_reach_exactly_the_subscribers_the_rules_allow() {
    let seed: u64 = std::env::var("PGCAST_TEST_SEED")
        .ok()
        .map(|s| s.parse().expect("PGCAST_TEST_SEED must be a u64"))
        .unwrap_or_else(rand::random);
    eprintln!("random visibility test: seed {seed} (rerun with PGCAST_TEST_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = std::time::Instant::now();

    let h = Harness::start().await;
    let workshops: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    // A workshop nobody belongs to, and a mechanic nobody is: their rows reach no mechanic.
    let stranger_workshop = Uuid::new_v4();
    let stranger_mechanic = Uuid::new_v4();
    let mut mechanics = Vec::new();
    for i in 0..30 {
        mechanics.push(mechanic(workshops.get(i % 5).copied()));
    }
    // Sessions: four owned by a subscribed customer, four nobody follows.
    let customers: Vec<Principal> = (0..4).map(|_| customer()).collect();
    let mut sessions = Vec::new();
    for c in &customers {
        sessions.push(h.insert_session(c.user_id).await);
    }
    sessions.extend((0..4).map(|_| Uuid::new_v4()));

    // Mechanics who follow a session: each holds an accepted assignment in it before
    // subscribing. The random writes reassign, cancel and delete those rows, so followers lose
    // (and some regain) their right while they listen.
    let mut current: HashMap<Uuid, RowSt> = HashMap::new();
    let mut live: Vec<Uuid> = Vec::new();
    let mut followers: Vec<(usize, Uuid)> = Vec::new(); // (mechanic index, session)
    for (k, i) in (1..30).step_by(4).enumerate() {
        let session = sessions[k % customers.len()];
        let row = RowSt {
            session,
            status: "accepted",
            mechanic: Some(mechanics[i].user_id),
            workshop: mechanics[i].workshop_id,
        };
        let id = Uuid::new_v4();
        apply(
            &h.admin,
            &Op {
                id,
                kind: OpKind::Insert,
                row,
            },
        )
        .await;
        current.insert(id, row);
        live.push(id);
        followers.push((i, session));
    }
    let start_head = h.log_head().await;
    let live_at_start = live.clone();
    let current_at_start = current.clone();

    // Markers: one general queued row per followed session, for its customer, and a final one
    // in a session nobody follows (a follower's session topic never carries it), written last,
    // so that every client sees its marker and knows its stream is done.
    let markers: Vec<Uuid> = (0..customers.len()).map(|_| Uuid::new_v4()).collect();
    let final_marker = Uuid::new_v4();

    let mut clients = Vec::new();
    let mut sockets = Vec::new();
    for (i, who) in mechanics.iter().enumerate() {
        let mut topics = vec!["queue".to_owned()];
        if i % 3 == 0 {
            if let Some(w) = who.workshop_id {
                topics.push(format!("workshop:{w}"));
            }
        }
        if i % 2 == 0 {
            topics.push(format!("mechanic:{}", who.user_id));
        }
        topics.extend(
            followers
                .iter()
                .filter(|(f, _)| *f == i)
                .map(|(_, s)| format!("session:{s}")),
        );
        clients.push(Client {
            who: *who,
            topics,
            last_marker: final_marker,
            refresh_after: (i % 7 == 3).then_some(5 + i),
            marker_frames: 1,
        });
    }
    for (i, who) in customers.iter().enumerate() {
        // Every customer follows their session; half of them also their whole account
        // (customer:<id>), which carries the same session's events under another topic.
        let mut topics = vec![format!("session:{}", sessions[i])];
        if i % 2 == 0 {
            topics.push(format!("customer:{}", who.user_id));
        }
        clients.push(Client {
            who: *who,
            marker_frames: topics.len(),
            topics,
            last_marker: markers[i],
            refresh_after: (i == 1).then_some(3),
        });
    }
    let customer_of: HashMap<Uuid, Uuid> = customers
        .iter()
        .zip(&sessions)
        .map(|(c, s)| (*s, c.user_id))
        .collect();
    let svc = service();
    clients.push(Client {
        who: svc,
        topics: vec!["assignments".to_owned()],
        last_marker: final_marker,
        refresh_after: Some(100),
        marker_frames: 1,
    });
    for c in &clients {
        let mut ws = h.client(&c.who).await;
        for t in &c.topics {
            // From the set-up's end exactly: its own events may still be on their way through
            // the listener, and must not count.
            ws.subscribe(t, json!({"since": start_head})).await;
        }
        sockets.push(ws);
    }

    // Every client reads concurrently with the writes until its last marker, refreshing its
    // token on the way when told to.
    let mut readers = Vec::new();
    for (c, mut ws) in clients.iter().zip(sockets) {
        let stop = c.last_marker;
        let mut stop_frames = c.marker_frames;
        let refresh = c.refresh_after.map(|n| (n, h.token(&c.who)));
        readers.push(tokio::spawn(async move {
            let mut got = Stream::default();
            loop {
                if let Some((n, token)) = &refresh {
                    if got.events.len() == *n && !got.refreshed {
                        ws.send(json!({"type": "auth", "token": token})).await;
                        got.refreshed = true;
                    }
                }
                let frame = match ws.next(WAIT).await {
                    Next::Json(v) => v,
                    other => panic!("after {} events: {other:?}", got.events.len()),
                };
                match frame["type"].as_str() {
                    Some("event") => {}
                    Some("revoked") => {
                        let topic = frame["topic"].as_str().unwrap_or_default().to_owned();
                        got.revoked.push((topic, got.events.len()));
                        continue;
                    }
                    Some("ready") if got.refreshed => continue,
                    _ => panic!("unexpected frame {frame}"),
                }
                if id_of(&frame) == stop {
                    stop_frames -= 1;
                }
                got.events.push(frame);
                if stop_frames == 0 {
                    return got;
                }
            }
        }));
    }

    // The writes.
    let mut writer = h.db.connect().await.unwrap();
    let mut ops: Vec<Op> = Vec::new();
    let mechanic_ids: Vec<Uuid> = mechanics.iter().map(|m| m.user_id).collect();
    let random_state = |rng: &mut rand::rngs::StdRng, session: Uuid| RowSt {
        session,
        // Mostly open rows, so the queues move.
        status: match rng.random_range(0..10) {
            0..=3 => "queued",
            4..=5 => "offered",
            _ => STATUSES[rng.random_range(2..7)],
        },
        mechanic: match rng.random_range(0..20) {
            0..=9 => None,
            10 => Some(stranger_mechanic),
            _ => Some(*mechanic_ids.choose(rng).unwrap()),
        },
        workshop: match rng.random_range(0..10) {
            0..=2 => None,
            3 => Some(stranger_workshop),
            _ => Some(*workshops.choose(rng).unwrap()),
        },
    };
    let target_ops = 450;
    while ops.len() < target_ops {
        // Sometimes several changes commit in one transaction.
        let batch = if rng.random_bool(0.15) {
            rng.random_range(2..6)
        } else {
            1
        };
        let mut pending = Vec::new();
        for _ in 0..batch {
            let roll = rng.random_range(0..100);
            let op = if live.len() < 8 || roll < 30 {
                let session = *sessions.choose(&mut rng).unwrap();
                let id = Uuid::new_v4();
                live.push(id);
                Op {
                    id,
                    kind: OpKind::Insert,
                    row: random_state(&mut rng, session),
                }
            } else {
                let i = rng.random_range(0..live.len());
                let id = live[i];
                let before = current[&id];
                let mut row = before;
                let kind = match roll {
                    30..=44 => {
                        // A move between workshops (or to/from none), status kept.
                        row.workshop = match rng.random_range(0..5) {
                            0 => None,
                            _ => Some(*workshops.choose(&mut rng).unwrap()),
                        };
                        if rng.random_bool(0.7) {
                            row.status = "queued";
                            row.mechanic = None;
                        }
                        OpKind::Update
                    }
                    45..=54 => {
                        // Taken by a mechanic.
                        row.status = "accepted";
                        row.mechanic = Some(*mechanic_ids.choose(&mut rng).unwrap());
                        OpKind::Update
                    }
                    55..=57 => {
                        live.swap_remove(i);
                        OpKind::Delete
                    }
                    _ => {
                        row = random_state(&mut rng, before.session);
                        OpKind::Update
                    }
                };
                Op { id, kind, row }
            };
            match op.kind {
                OpKind::Delete => current.remove(&op.id),
                _ => current.insert(op.id, op.row),
            };
            pending.push(op);
        }
        if pending.len() == 1 {
            apply(&writer, &pending[0]).await;
        } else {
            let tx = writer.transaction().await.unwrap();
            for op in &pending {
                apply(&tx, op).await;
            }
            tx.commit().await.unwrap();
        }
        ops.extend(pending);
    }
    let head_before_markers = h.log_head().await;
    let marker_sessions = sessions[..customers.len()]
        .iter()
        .chain(std::iter::once(&sessions[customers.len()]));
    for (&id, &session) in markers
        .iter()
        .chain(std::iter::once(&final_marker))
        .zip(marker_sessions)
    {
        let op = Op {
            id,
            kind: OpKind::Insert,
            row: RowSt {
                session,
                status: "queued",
                mechanic: None,
                workshop: None,
            },
        };
        apply(&writer, &op).await;
        ops.push(op);
    }

    let mut received = Vec::new();
    for r in readers {
        received.push(r.await.expect("reader"));
    }
    for (c, got) in clients.iter().zip(&received) {
        assert_eq!(got.refreshed, c.refresh_after.is_some(), "seed {seed}");
    }
    let service_stream = &received.last().unwrap().events;

    // The service saw every event of the log after the set-up, in order, exactly as written.
    let log: Vec<i64> = h
        .admin
        .query(
            "SELECT position FROM pgcast.assignment_events WHERE position > $1 ORDER BY position",
            &[&start_head],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let service_positions: Vec<i64> = service_stream.iter().map(pos_of).collect();
    assert_eq!(service_positions, log, "seed {seed}");
    assert!(service_positions.contains(&head_before_markers));
    assert_eq!(service_stream.len(), ops.len(), "seed {seed}");

    // Replay the service stream: before = the row as last seen (tracked here, the wire only
    // carries old_status), after = the row in the frame. Expected (position, topic) per client.
    let mut expected: Vec<BTreeSet<(i64, String)>> = vec![BTreeSet::new(); clients.len()];
    // Per client and followed session: the position of the change that revoked it.
    let mut revoked_at: Vec<BTreeMap<String, i64>> = vec![BTreeMap::new(); clients.len()];
    let mut by_position: HashMap<i64, &Value> = HashMap::new();
    let mut seen: HashMap<Uuid, RowSt> = HashMap::new();
    for id in &live_at_start {
        seen.insert(*id, current_at_start[id]);
    }
    let mut before_only = 0usize;
    for (ev, op) in service_stream.iter().zip(&ops) {
        let id = id_of(ev);
        let row = state_of(&ev["assignment"]);
        assert_eq!((id, row), (op.id, op.row), "seed {seed}: frame {ev}");
        let before = seen.get(&id).copied();
        let (kind, after) = match op.kind {
            OpKind::Insert => ("assignment.created", Some(row)),
            OpKind::Update => ("assignment.updated", Some(row)),
            OpKind::Delete => ("assignment.deleted", None),
        };
        assert_eq!(ev["event"], kind, "seed {seed}: {ev}");
        assert_eq!(
            opt_status(&ev["old_status"]),
            before.map(|b| b.status),
            "seed {seed}: old_status of {ev}"
        );
        let session_rows_before = seen.clone();
        match after {
            Some(a) => seen.insert(id, a),
            None => seen.remove(&id),
        };
        by_position.insert(pos_of(ev), ev);
        for ((c, want), gone) in clients
            .iter()
            .zip(expected.iter_mut())
            .zip(revoked_at.iter_mut())
        {
            for t in &c.topics {
                let follower = c.who.role == Role::Mechanic && t.starts_with("session:");
                let (saw_before, sees_after) = if follower {
                    if gone.contains_key(t) {
                        continue;
                    }
                    let session: Uuid = t["session:".len()..].parse().unwrap();
                    let row_session = before.or(after).map(|r| r.session);
                    if row_session != Some(session) {
                        continue;
                    }
                    (
                        member(&session_rows_before, session, c.who.user_id),
                        member(&seen, session, c.who.user_id),
                    )
                } else {
                    (
                        before.is_some_and(|b| visible(t, &c.who, &b, &customer_of)),
                        after.is_some_and(|a| visible(t, &c.who, &a, &customer_of)),
                    )
                };
                if saw_before || sees_after {
                    want.insert((pos_of(ev), t.clone()));
                }
                if follower && saw_before && !sees_after {
                    gone.insert(t.clone(), pos_of(ev));
                }
                if saw_before && !sees_after && t == "queue" {
                    before_only += 1;
                }
            }
        }
    }

    // Each client got exactly its expected set: nothing missing, nothing extra, no duplicate,
    // positions increasing per topic, and the frame content of the event.
    let mut total = 0;
    let mut revocations = 0;
    for (i, (c, stream)) in clients.iter().zip(&received).enumerate() {
        let got = &stream.events;
        // A `revoked` frame comes right after the change that removed the right, and only
        // then.
        let mut revoked: BTreeMap<String, i64> = BTreeMap::new();
        for (topic, after_events) in &stream.revoked {
            let last = &got[after_events - 1];
            assert_eq!(last["topic"], topic.as_str(), "seed {seed}: client #{i}");
            assert!(
                revoked.insert(topic.clone(), pos_of(last)).is_none(),
                "seed {seed}: client #{i}: {topic} revoked twice"
            );
        }
        assert_eq!(
            revoked, revoked_at[i],
            "seed {seed}: client #{i} revocations"
        );
        revocations += revoked.len();
        let mut set = BTreeSet::new();
        let mut last: BTreeMap<String, i64> = BTreeMap::new();
        for ev in got {
            let topic = ev["topic"].as_str().unwrap().to_owned();
            let p = pos_of(ev);
            assert!(
                c.topics.contains(&topic),
                "seed {seed}: client #{i} got a frame for a topic it did not subscribe: {ev}"
            );
            if let Some(prev) = last.insert(topic.clone(), p) {
                assert!(
                    p > prev,
                    "seed {seed}: client #{i} {topic}: {p} after {prev}"
                );
            }
            let original = by_position[&p];
            assert_eq!(ev["assignment"], original["assignment"], "seed {seed}");
            assert_eq!(ev["old_status"], original["old_status"], "seed {seed}");
            assert_eq!(ev["event"], original["event"], "seed {seed}");
            assert!(set.insert((p, topic)), "seed {seed}: duplicate {ev}");
        }
        let want = &expected[i];
        if set != *want {
            let describe = |(p, t): &(i64, String)| {
                let ev = by_position[p];
                let a = &ev["assignment"];
                format!(
                    "{p} {t}: {} {} old_status={} now: status={} mechanic={} workshop={} \
                     session={}",
                    ev["event"],
                    a["id"],
                    ev["old_status"],
                    a["status"],
                    a["mechanic_id"],
                    a["workshop_id"],
                    a["session_id"]
                )
            };
            let missing: Vec<String> = want.difference(&set).take(5).map(describe).collect();
            let extra: Vec<String> = set.difference(want).take(5).map(describe).collect();
            panic!(
                "seed {seed}: client #{i} ({:?}, workshop {:?}, topics {:?}): {} missing, {} \
                 extra\nmissing: {missing:#?}\nextra: {extra:#?}",
                c.who.role,
                c.who.workshop_id,
                c.topics,
                want.difference(&set).count(),
                set.difference(want).count(),
            );
        }
        total += set.len();
    }
    // The simulation exercised what it is meant to.
    assert!(
        before_only > 50,
        "too few cards left a queue: {before_only}"
    );
    assert!(total > 2000, "too few frames: {total}");
    assert!(
        revocations >= 2,
        "too few session followers lost their right: {revocations}"
    );
    eprintln!(
        "{} events, {total} frames checked, {before_only} queue departures, {revocations} \
         revocations, {:?}",
        ops.len(),
        started.elapsed()
    );
    h.stop().await;
}

fn opt_status(v: &Value) -> Option<&'static str> {
    v.as_str().map(status)
}
