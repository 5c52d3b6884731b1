//! Topic `customer:<id>` (docs/architecture.md §5): every assignment event of every session of one customer,
//! for an "active session" banner on any page — the customer's own id only, with a snapshot of
//! their open assignments and resume with `since`.

mod common;

use common::*;
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
async fn a_customer_follows_every_session_of_their_own_and_nobody_elses() {
    let h = Harness::start().await;
    let ana = customer();
    let bob = customer();
    let ana_topic = format!("customer:{}", ana.user_id);
    let mut ws = h.client(&ana).await;
    ws.subscribe(&ana_topic, json!({})).await;
    // Another customer's id, a mechanic, and nobody's id are refused.
    ws.subscribe_err(&format!("customer:{}", bob.user_id), "forbidden")
        .await;
    let mut m = h.client(&mechanic(None)).await;
    m.subscribe_err(&ana_topic, "forbidden").await;

    // Ana opens a session, a mechanic accepts, it completes; she opens a second one.
    let first = h.insert_session(ana.user_id).await;
    let a = h.insert(first, "queued", None, None).await;
    let mech = Uuid::new_v4();
    h.update(a, "accepted", Some(mech), None).await;
    // Bob's session and a row without a session row never reach Ana.
    let bobs = h.insert_session(bob.user_id).await;
    h.insert(bobs, "queued", None, None).await;
    h.insert(Uuid::new_v4(), "queued", None, None).await;
    h.update(a, "completed", Some(mech), None).await;
    let second = h.insert_session(ana.user_id).await;
    let b = h.insert(second, "queued", None, None).await;

    let got = ws.events(4).await;
    let seen: Vec<(String, String)> = got
        .iter()
        .map(|e| {
            assert_eq!(e["topic"], ana_topic.as_str());
            (
                e["assignment"]["id"].as_str().unwrap().to_owned(),
                e["assignment"]["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (a.to_string(), "queued".to_owned()),
            (a.to_string(), "accepted".to_owned()),
            (a.to_string(), "completed".to_owned()),
            (b.to_string(), "queued".to_owned()),
        ]
    );
    h.nothing_more(&mut ws, &ana).await;

    // A service may follow any customer.
    let mut svc = h.client(&service()).await;
    svc.subscribe(&ana_topic, json!({})).await;
    h.update(b, "cancelled", None, None).await;
    assert_eq!(svc.events(1).await[0]["assignment"]["id"], b.to_string());
    assert_eq!(ws.events(1).await[0]["assignment"]["status"], "cancelled");
    h.stop().await;
}

#[tokio::test]
async fn the_snapshot_holds_the_open_assignments_and_since_resumes() {
    let h = Harness::start().await;
    let ana = customer();
    let topic = format!("customer:{}", ana.user_id);
    let start = h.log_head().await;
    let done = h.insert_session(ana.user_id).await;
    let finished = h.insert(done, "queued", None, None).await;
    h.update(finished, "completed", Some(Uuid::new_v4()), None)
        .await;
    let open = h.insert_session(ana.user_id).await;
    let queued = h.insert(open, "queued", None, None).await;
    let accepted = h.insert(open, "offered", Some(Uuid::new_v4()), None).await;
    h.update(accepted, "accepted", None, None).await;
    let other = h.insert_session(Uuid::new_v4()).await;
    h.insert(other, "queued", None, None).await;

    // The banner's snapshot: open assignments only, Ana's only.
    let mut ws = h.client(&ana).await;
    let sub = ws.subscribe(&topic, json!({"snapshot": true})).await;
    let snap = ws.recv().await;
    assert_eq!(snap["type"], "snapshot", "{snap}");
    assert_eq!(snap["position"], sub["position"]);
    let mut ids: Vec<String> = snap["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let mut want = vec![queued.to_string(), accepted.to_string()];
    want.sort();
    assert_eq!(ids, want);
    // Live after the snapshot: ending the session removes the banner's row.
    h.update(queued, "cancelled", None, None).await;
    let live = ws.events(1).await;
    assert_eq!(live[0]["old_status"], "queued");
    assert!(live[0]["position"].as_i64().unwrap() > sub["position"].as_i64().unwrap());

    // Resume from the start: all six of Ana's events, in order, none of the stranger's.
    let mut again = h.client(&ana).await;
    again.subscribe(&topic, json!({"since": start})).await;
    let replayed = again.events(6).await;
    let positions: Vec<i64> = replayed
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    assert!(replayed
        .iter()
        .all(|e| e["assignment"]["session_id"] == done.to_string()
            || e["assignment"]["session_id"] == open.to_string()));
    h.nothing_more(&mut again, &ana).await;
    h.stop().await;
}
