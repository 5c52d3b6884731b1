//! Only the database decides what a client sees (docs/architecture.md §8, §4, §5): forged notifications
//! never reach a client, a mechanic's access to a session follows the rows at every event's
//! position, and nothing committed after a token's `exp` is sent unless it was refreshed.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use pgcast_gateway::mint_token;
use serde_json::{json, Value};
use uuid::Uuid;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Waits until the wall clock has passed `exp` (whole seconds): the passing of time is what is
/// under test, so the wait is computed once, not polled.
async fn until_past(exp: u64) {
    let past = UNIX_EPOCH + Duration::from_secs(exp + 1) + Duration::from_millis(10);
    if let Ok(left) = past.duration_since(SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
    assert!(unix_now() > exp, "the wall clock has not passed {exp}");
}

/// A client authenticated with a token that expires in `ttl`; returns its `expires_at`.
async fn client_with_ttl(h: &Harness, who: &pgcast_events::Principal, ttl: Duration) -> (Ws, u64) {
    let mut ws = h.raw().await;
    let token = mint_token(SECRET, who, ttl).unwrap();
    ws.send(json!({"type": "auth", "token": token})).await;
    let ready = ws.recv().await;
    assert_eq!(ready["type"], "ready", "{ready}");
    let expires_at = ready["expires_at"]
        .as_u64()
        .expect("ready carries expires_at");
    assert!(expires_at >= unix_now() && expires_at <= unix_now() + ttl.as_secs() + 1);
    (ws, expires_at)
}

/// Edits assignment `id`'s `concern`: a change that moves nobody's access.
async fn set_concern(h: &Harness, id: Uuid, concern: &str) {
    h.admin
        .execute(
            "UPDATE session_assignments SET concern = $2 WHERE id = $1",
            &[&id, &concern],
        )
        .await
        .unwrap();
}

fn position(v: &Value) -> i64 {
    v["position"].as_i64().expect("position")
}

#[tokio::test]
async fn forged_notifications_never_reach_clients_and_hide_no_real_event() {
    let h = Harness::start().await;
    let role = format!("forger_{}", h.db.name());
    h.admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN"))
        .await
        .unwrap();
    let mut config = h.db.pg_config();
    config.user(&role);
    let (forger, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);

    let mut svc = h.client(&service()).await;
    svc.subscribe("assignments", json!({})).await;
    let mut m = h.client(&mechanic(None)).await;
    m.subscribe("queue", json!({})).await;

    let next = h.log_head().await + 1;
    let forged = json!({
        "position": next, "op": "insert", "committed_at": "2026-11-28T00:00:00Z", "old": null,
        "row": {"id": Uuid::new_v4(), "session_id": Uuid::new_v4(), "mechanic_id": null,
                "workshop_id": null, "status": "queued", "urgent": true,
                "customer_name": "forged", "vehicle_summary": "x", "concern": "x",
                "created_at": null, "updated_at": null}
    })
    .to_string();
    forger
        .execute("SELECT pg_notify('pgcast_assignments', $1)", &[&forged])
        .await
        .expect("any role may NOTIFY");
    forger
        .execute(
            "SELECT pg_notify('pgcast_assignments',
                     jsonb_set($1::text::jsonb, '{position}', to_jsonb($2::bigint + g))::text)
             FROM generate_series(1, 100) g",
            &[&forged, &next],
        )
        .await
        .unwrap();
    forger
        .execute(
            "SELECT pg_notify('pgcast_assignments', '{\"position\":999999999,\"ref\":true}')",
            &[],
        )
        .await
        .unwrap();

    let real = h.insert(Uuid::new_v4(), "queued", None, None).await;
    for ws in [&mut svc, &mut m] {
        let got = ws.events(1).await;
        assert_eq!(got[0]["assignment"]["id"], real.to_string());
        assert_eq!(position(&got[0]), next, "the real event keeps its position");
    }
    // Nothing forged follows: a general queued marker reaches both next.
    let marker = h.marker().await;
    for ws in [&mut svc, &mut m] {
        ws.nothing_before(marker).await;
    }
    h.stop().await;
}

/// A customer's session with one assignment accepted by `m1`; returns (session, assignment).
async fn accepted_session(h: &Harness, m1: Uuid) -> (Uuid, Uuid) {
    let session = h.insert_session(Uuid::new_v4()).await;
    let a = h.insert(session, "queued", None, None).await;
    h.update(a, "accepted", Some(m1), None).await;
    (session, a)
}

#[tokio::test]
async fn a_reassigned_mechanic_gets_the_change_then_revoked_and_nothing_more() {
    let h = Harness::start().await;
    let m1 = mechanic(None);
    let m2 = mechanic(None);
    let (session, a) = accepted_session(&h, m1.user_id).await;
    let topic = format!("session:{session}");

    let mut ws = h.client(&m1).await;
    ws.subscribe(&topic, json!({})).await;
    set_concern(&h, a, "brakes").await;
    let edit = ws.events(1).await;
    assert_eq!(edit[0]["assignment"]["concern"], "brakes");

    // Reassigned: the change that removes m1 is the last thing m1 gets, then `revoked`.
    h.update(a, "accepted", Some(m2.user_id), None).await;
    let change = ws.events(1).await;
    assert_eq!(
        change[0]["assignment"]["mechanic_id"],
        m2.user_id.to_string()
    );
    let revoked = ws.recv().await;
    assert_eq!(
        revoked,
        json!({"type": "revoked", "topic": topic, "reason": revoked["reason"]})
    );
    assert!(revoked["reason"].as_str().is_some_and(|r| !r.is_empty()));

    // Nothing of the session any more, not its other rows either.
    set_concern(&h, a, "secret").await;
    h.insert(session, "queued", None, None).await;
    h.nothing_more(&mut ws, &m1).await;
    ws.ping().await;

    // And no way back in: neither live nor with since.
    ws.subscribe_err(&topic, "forbidden").await;
    ws.send(json!({"type": "subscribe", "id": "bad", "topic": topic, "since": 0}))
        .await;
    ws.expect_error("forbidden").await;
    ws.send(json!({"type": "subscribe", "id": "bad", "topic": topic, "snapshot": true}))
        .await;
    ws.expect_error("forbidden").await;

    // The new mechanic may follow it.
    let mut ws2 = h.client(&m2).await;
    ws2.subscribe(&topic, json!({})).await;
    h.update(a, "completed", Some(m2.user_id), None).await;
    assert_eq!(ws2.events(1).await[0]["assignment"]["status"], "completed");
    h.nothing_more(&mut ws, &m1).await;
    h.stop().await;
}

#[tokio::test]
async fn a_cancelled_or_deleted_assignment_revokes_its_mechanic() {
    let h = Harness::start().await;
    let m = mechanic(None);
    for end in ["cancel", "delete"] {
        let (session, a) = accepted_session(&h, m.user_id).await;
        let topic = format!("session:{session}");
        let mut ws = h.client(&m).await;
        ws.subscribe(&topic, json!({})).await;
        if end == "cancel" {
            h.update(a, "cancelled", Some(m.user_id), None).await;
        } else {
            h.admin
                .execute("DELETE FROM session_assignments WHERE id = $1", &[&a])
                .await
                .unwrap();
        }
        let last = ws.events(1).await;
        assert_eq!(last[0]["assignment"]["id"], a.to_string(), "{end}");
        let revoked = ws.recv().await;
        assert_eq!(revoked["type"], "revoked", "{end}: {revoked}");
        h.insert(session, "queued", None, None).await;
        h.nothing_more(&mut ws, &m).await;
    }
    h.stop().await;
}

#[tokio::test]
async fn a_replay_shows_a_mechanic_only_what_they_could_see_at_each_position() {
    let h = Harness::start().await;
    let m1 = mechanic(None);
    let m2 = mechanic(None);
    let owner = customer();
    let session = h.insert_session(owner.user_id).await;
    let start = h.log_head().await;
    let a = h.insert(session, "queued", None, None).await; // 1: before m1: hidden
    set_concern(&h, a, "private").await; // 2: hidden
    h.update(a, "offered", Some(m1.user_id), None).await; // 3: an offer is not enough: hidden
    h.update(a, "accepted", Some(m1.user_id), None).await; // 4: m1 is in: shown
    let b = h.insert(session, "queued", None, None).await; // 5: shown
    h.update(a, "accepted", Some(m2.user_id), None).await; // 6: removes m1: shown
    h.update(a, "completed", Some(m2.user_id), None).await; // 7: hidden
    h.update(b, "accepted", Some(m1.user_id), None).await; // 8: m1 back in: shown
    h.update(b, "completed", Some(m1.user_id), None).await; // 9: shown
    let positions: Vec<i64> = h
        .admin
        .query(
            "SELECT position FROM pgcast.assignment_events WHERE position > $1 ORDER BY position",
            &[&start],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(positions.len(), 9);
    let shown: Vec<i64> = [4, 5, 6, 8, 9].iter().map(|i| positions[i - 1]).collect();

    let topic = format!("session:{session}");
    let mut ws = h.client(&m1).await;
    ws.subscribe(&topic, json!({"since": start})).await;
    let got: Vec<i64> = ws.events(shown.len()).await.iter().map(position).collect();
    assert_eq!(got, shown);
    h.nothing_more(&mut ws, &m1).await;

    // Live after the replay: the membership is where the replay left it.
    h.update(b, "cancelled", Some(m1.user_id), None).await;
    assert_eq!(ws.events(1).await[0]["assignment"]["status"], "cancelled");
    assert_eq!(ws.recv().await["type"], "revoked");

    // The session's customer sees the whole history.
    let mut c = h.client(&owner).await;
    c.subscribe(&topic, json!({"since": start})).await;
    let all: Vec<i64> = c.events(10).await.iter().map(position).collect();
    assert_eq!(all[..9], positions[..]);
    h.nothing_more(&mut c, &owner).await;
    h.stop().await;
}

#[tokio::test]
async fn an_event_committed_after_exp_is_never_sent_the_connection_closes_4001() {
    // A long leeway keeps the expiry timer away: the commit time alone must stop the event.
    let h = Harness::start_with(|c| c.token_leeway = Duration::from_secs(60)).await;
    let who = service();
    let (mut ws, exp) = client_with_ttl(&h, &who, Duration::from_secs(2)).await;
    ws.subscribe("assignments", json!({})).await;
    let before = h.insert(Uuid::new_v4(), "queued", None, None).await;
    assert_eq!(
        ws.events(1).await[0]["assignment"]["id"],
        before.to_string()
    );
    until_past(exp).await;
    h.insert(Uuid::new_v4(), "queued", None, None).await;
    ws.expect_error("token_expired").await;
    ws.expect_close(4001).await;

    // Within the leeway after exp nothing new starts either: no snapshot of rows as they
    // stand after the token ended.
    let (mut late, exp) = client_with_ttl(&h, &who, Duration::from_secs(1)).await;
    until_past(exp).await;
    late.send(json!({"type": "subscribe", "id": "s", "topic": "assignments", "snapshot": true}))
        .await;
    late.expect_error("token_expired").await;
    late.expect_close(4001).await;
    h.stop().await;
}

#[tokio::test]
async fn an_idle_expired_connection_is_closed_with_4001() {
    let h = Harness::start_with(|c| c.token_leeway = Duration::ZERO).await;
    let (mut ws, exp) = client_with_ttl(&h, &mechanic(None), Duration::from_secs(1)).await;
    ws.subscribe("queue", json!({})).await;
    match ws.next(Duration::from_secs(10)).await {
        Next::Json(v) => {
            assert_eq!(v["code"], "token_expired", "{v}");
            assert!(unix_now() >= exp, "closed before exp");
        }
        other => panic!("expected token_expired, got {other:?}"),
    }
    ws.expect_close(4001).await;
    h.stop().await;
}

#[tokio::test]
async fn a_refreshed_connection_keeps_receiving_past_the_old_exp() {
    let h = Harness::start_with(|c| c.token_leeway = Duration::ZERO).await;
    let who = service();
    let (mut ws, exp) = client_with_ttl(&h, &who, Duration::from_secs(2)).await;
    ws.subscribe("assignments", json!({})).await;
    let fresh = mint_token(SECRET, &who, Duration::from_secs(600)).unwrap();
    ws.send(json!({"type": "auth", "token": fresh})).await;
    let ready = ws.recv().await;
    assert_eq!(ready["type"], "ready", "{ready}");
    assert!(ready["expires_at"].as_u64().unwrap() > exp + 500);
    until_past(exp + 1).await;
    let after = h.insert(Uuid::new_v4(), "queued", None, None).await;
    assert_eq!(ws.events(1).await[0]["assignment"]["id"], after.to_string());
    ws.ping().await;
    h.stop().await;
}

/// A refresh sent while a subscribe waits (here for the database: a snapshot behind a lock on
/// the table) moves the expiry at once: the subscribe completes past the old `exp`, the
/// refresh is answered after it, and the connection is not closed with 4001.
#[tokio::test]
async fn a_refresh_sent_during_a_long_subscribe_keeps_the_connection() {
    let h = Harness::start_with(|c| c.token_leeway = Duration::ZERO).await;
    let who = customer();
    let (mut ws, exp) = client_with_ttl(&h, &who, Duration::from_secs(2)).await;
    let mut locker = h.db.connect().await.unwrap();
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE session_assignments IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    ws.send(
        json!({"type": "subscribe", "id": "s", "topic": format!("customer:{}", who.user_id),
                   "snapshot": true}),
    )
    .await;
    let fresh = mint_token(SECRET, &who, Duration::from_secs(600)).unwrap();
    ws.send(json!({"type": "auth", "token": fresh})).await;
    // The old token's time runs out while the snapshot waits for the lock.
    until_past(exp).await;
    lock.rollback().await.unwrap();
    assert_eq!(ws.recv().await["type"], "subscribed");
    assert_eq!(ws.recv().await["type"], "snapshot");
    let ready = ws.recv().await;
    assert_eq!(ready["type"], "ready", "{ready}");
    assert!(ready["expires_at"].as_u64().unwrap() > exp + 500);
    ws.ping().await;
    h.stop().await;
}

#[tokio::test]
async fn a_refresh_must_name_the_same_user_and_role() {
    let h = Harness::start().await;
    let who = mechanic(None);
    for other in [
        mechanic(None),
        pgcast_events::Principal {
            role: pgcast_events::Role::Service,
            ..who
        },
    ] {
        let mut ws = h.client(&who).await;
        ws.send(json!({"type": "auth", "token": h.token(&other)}))
            .await;
        ws.expect_error("unauthorized").await;
        ws.expect_close(1008).await;
    }
    // A garbage refresh is refused the same way.
    let mut ws = h.client(&who).await;
    ws.send(json!({"type": "auth", "token": "garbage"})).await;
    ws.expect_error("unauthorized").await;
    ws.expect_close(1008).await;
    h.stop().await;
}

#[tokio::test]
async fn a_refresh_with_another_workshop_revokes_what_it_no_longer_allows() {
    let h = Harness::start().await;
    let w1 = Uuid::new_v4();
    let w2 = Uuid::new_v4();
    let who = mechanic(Some(w1));
    let mut ws = h.client(&who).await;
    let own = format!("mechanic:{}", who.user_id);
    let shop = format!("workshop:{w1}");
    ws.subscribe("queue", json!({})).await;
    ws.subscribe(&shop, json!({})).await;
    ws.subscribe(&own, json!({})).await;

    let moved = pgcast_events::Principal {
        workshop_id: Some(w2),
        ..who
    };
    ws.send(json!({"type": "auth", "token": h.token(&moved)}))
        .await;
    assert_eq!(ws.recv().await["type"], "ready");
    let mut revoked = [ws.recv().await, ws.recv().await];
    revoked.sort_by_key(|v| v["topic"].as_str().unwrap_or_default().to_owned());
    assert_eq!(revoked[0]["type"], "revoked");
    assert_eq!(revoked[0]["topic"], "queue");
    assert_eq!(revoked[1]["type"], "revoked");
    assert_eq!(revoked[1]["topic"], shop);

    // The old workshop's rows no longer arrive; the mechanic's own topic still does.
    h.insert(Uuid::new_v4(), "queued", None, Some(w1)).await;
    let mine = h
        .insert(Uuid::new_v4(), "offered", Some(who.user_id), Some(w2))
        .await;
    let got = ws.events(1).await;
    assert_eq!(got[0]["topic"], own);
    assert_eq!(got[0]["assignment"]["id"], mine.to_string());
    // `own` is followed already: a marker on it, in nobody's queue or workshop.
    let marker = h
        .insert(Uuid::new_v4(), "declined", Some(who.user_id), None)
        .await;
    ws.nothing_before(marker).await;
    // The queue under the new claims is one subscribe away.
    ws.subscribe("queue", json!({})).await;
    ws.subscribe_err(&shop, "forbidden").await;
    h.stop().await;
}

#[tokio::test]
async fn issuer_and_audience_bind_tokens_over_the_socket() {
    let h = Harness::start_with(|c| {
        c.jwt_issuer = Some("https://id.example".into());
        c.jwt_audience = Some("pgcast".into());
    })
    .await;
    let who = service();
    let bound = pgcast_gateway::TokenMinter::new(SECRET)
        .and_then(|m| m.with_issuer("https://id.example"))
        .and_then(|m| m.with_audience("pgcast"))
        .and_then(|m| m.mint(&who, Duration::from_secs(60)))
        .unwrap();
    let other_audience = pgcast_gateway::TokenMinter::new(SECRET)
        .and_then(|m| m.with_issuer("https://id.example"))
        .and_then(|m| m.with_audience("billing"))
        .and_then(|m| m.mint(&who, Duration::from_secs(60)))
        .unwrap();
    let unbound = mint_token(SECRET, &who, Duration::from_secs(60)).unwrap();
    for token in [other_audience, unbound] {
        let mut ws = h.raw().await;
        ws.send(json!({"type": "auth", "token": token})).await;
        ws.expect_error("unauthorized").await;
        ws.expect_close(1008).await;
    }
    let mut ws = h.raw().await;
    ws.send(json!({"type": "auth", "token": bound})).await;
    assert_eq!(ws.recv().await["type"], "ready");
    ws.ping().await;
    h.stop().await;
}

/// A mechanic's session replay holds at most `snapshot_limit` events in memory; a longer
/// history gets `resync` (take a snapshot) instead of an unbounded read.
#[tokio::test]
async fn a_session_replay_longer_than_the_limit_gets_resync() {
    let h = Harness::start_with(|c| c.snapshot_limit = 3).await;
    let m = mechanic(None);
    let start = h.log_head().await;
    let (session, a) = accepted_session(&h, m.user_id).await;
    for concern in ["one", "two", "three"] {
        set_concern(&h, a, concern).await;
    }
    let topic = format!("session:{session}");
    let mut ws = h.client(&m).await;
    ws.subscribe(&topic, json!({"since": start})).await;
    let reply = ws.recv().await;
    assert_eq!(reply["type"], "resync", "{reply}");
    // A snapshot still works, and so does a short replay.
    ws.subscribe(&topic, json!({"snapshot": true})).await;
    assert_eq!(ws.recv().await["type"], "snapshot");
    let mut again = h.client(&m).await;
    again
        .subscribe(&topic, json!({"since": h.log_head().await - 1}))
        .await;
    assert_eq!(again.events(1).await[0]["assignment"]["concern"], "three");
    h.stop().await;
}

/// A session's history is found by reading the log and filtering it: a resume that would read
/// more than `replay_scan_limit` log rows gets `resync` instead, for a member and for a
/// mechanic who never had a part in the session alike, so that neither keeps the gateway's
/// reads busy for the whole retained log.
#[tokio::test]
async fn a_session_replay_reads_a_bounded_part_of_the_log() {
    // At most 30 rows: one page of the log (1,000 rows) is already more.
    let h = Harness::start_with(|c| c.replay_scan_limit = 30).await;
    let m = mechanic(None);
    let (session, a) = accepted_session(&h, m.user_id).await;
    let since = h.log_head().await;
    // Other sessions' rows, two pages of them, then one change of this session.
    h.insert_unrelated(1500).await;
    set_concern(&h, a, "late").await;
    let topic = format!("session:{session}");
    let mut ws = h.client(&m).await;
    ws.subscribe(&topic, json!({"since": since})).await;
    let reply = ws.recv().await;
    assert_eq!(reply["type"], "resync", "{reply}");
    // A snapshot still works for the member.
    ws.subscribe(&topic, json!({"snapshot": true})).await;
    assert_eq!(ws.recv().await["type"], "snapshot");

    // A stranger learns nothing more than that: `resync`, and then a snapshot is refused.
    let stranger = mechanic(None);
    let mut other = h.client(&stranger).await;
    other
        .send(json!({"type": "subscribe", "id": "s", "topic": topic, "since": since}))
        .await;
    assert_eq!(other.recv().await["type"], "subscribed");
    assert_eq!(other.recv().await["type"], "resync");
    other
        .send(json!({"type": "subscribe", "id": "t", "topic": topic, "snapshot": true}))
        .await;
    other.expect_error("forbidden").await;
    h.stop().await;
}

/// A mechanic away while they were removed from a session resumes with `since` as they would
/// have followed it live: the events they missed up to the change that removed them, then
/// `revoked`, and nothing of the session after. A mechanic who was no member at `since` either
/// is refused.
#[tokio::test]
async fn a_mechanic_removed_while_away_resumes_up_to_the_removal_then_revoked() {
    let h = Harness::start().await;
    let (m1, m2, m3) = (mechanic(None), mechanic(None), mechanic(None));
    let (session, a) = accepted_session(&h, m1.user_id).await;
    let topic = format!("session:{session}");
    let since = h.log_head().await;
    set_concern(&h, a, "brakes").await;
    h.update(a, "accepted", Some(m2.user_id), None).await; // removes m1
    set_concern(&h, a, "secret").await;

    let mut ws = h.client(&m1).await;
    let subscribed = ws.subscribe(&topic, json!({"since": since})).await;
    assert_eq!(position(&subscribed), since);
    let missed = ws.events(2).await;
    assert_eq!(missed[0]["assignment"]["concern"], "brakes");
    assert_eq!(
        missed[1]["assignment"]["mechanic_id"],
        m2.user_id.to_string(),
        "the change that removed them is the last event"
    );
    let revoked = ws.recv().await;
    assert_eq!(revoked["type"], "revoked", "{revoked}");
    assert_eq!(revoked["topic"], topic);
    h.nothing_more(&mut ws, &m1).await;

    let mut stranger = h.client(&m3).await;
    stranger
        .send(json!({"type": "subscribe", "id": "s", "topic": topic, "since": since}))
        .await;
    stranger.expect_error("forbidden").await;
}

/// An application may give its rows a status pgcast does not know. Such a change cannot become
/// an event (it is counted and skipped, never sent in part), and it may have ended a mechanic's
/// membership of the session: the mechanic following the session live is revoked in its
/// place, and a resume across it gets `resync` instead of a replay judged by a membership it
/// cannot know. The session's customer goes on as before.
#[tokio::test]
async fn a_change_that_cannot_be_read_revokes_the_sessions_mechanic() {
    let h = Harness::start().await;
    h.admin
        .batch_execute(
            "ALTER TABLE session_assignments DROP CONSTRAINT session_assignments_status_check",
        )
        .await
        .unwrap();
    let m1 = mechanic(None);
    let owner = customer();
    let session = h.insert_session(owner.user_id).await;
    let a = h.insert(session, "queued", None, None).await;
    h.update(a, "accepted", Some(m1.user_id), None).await;
    let topic = format!("session:{session}");
    let since = h.log_head().await;
    let mut ws = h.client(&m1).await;
    ws.subscribe(&topic, json!({})).await;
    let mut c = h.client(&owner).await;
    c.subscribe(&topic, json!({})).await;

    // The application's own status: m1 is no longer a member, and the change is no event.
    h.update(a, "paused", Some(m1.user_id), None).await;
    let revoked = ws.recv().await;
    assert_eq!(revoked["type"], "revoked", "{revoked}");
    assert_eq!(revoked["topic"], topic);
    assert!(revoked["reason"].as_str().is_some_and(|r| !r.is_empty()));
    // The session's next row reaches its customer, not the mechanic.
    let b = h.insert(session, "queued", None, None).await;
    assert_eq!(c.events(1).await[0]["assignment"]["id"], b.to_string());
    h.nothing_more(&mut ws, &m1).await;
    ws.subscribe_err(&topic, "forbidden").await;

    // Back in (a change that cannot be read either: its old status is the application's).
    // A resume from before the pause cannot tell what m1 could see in between: `resync`,
    // never the row added while they were out.
    h.update(a, "accepted", Some(m1.user_id), None).await;
    let subscribed = ws.subscribe(&topic, json!({"since": since})).await;
    assert_eq!(position(&subscribed), since);
    let resync = ws.recv().await;
    assert_eq!(resync["type"], "resync", "{resync}");
    assert_eq!(resync["topic"], topic);

    // Followed from now, judged by the rows as they stand: m1 is a member again.
    ws.subscribe(&topic, json!({})).await;
    set_concern(&h, a, "back").await;
    assert_eq!(ws.events(1).await[0]["assignment"]["concern"], "back");
    assert_eq!(c.events(1).await[0]["assignment"]["concern"], "back");
    h.stop().await;
}
