//! Bad input over real sockets (the README's protocol section, issue 3): every refused frame, token or connection
//! gets the documented error or close, the connection stays usable after recoverable errors
//! (a ping afterwards gets its pong), and the server keeps serving everybody else.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use futures::SinkExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pgcast_gateway::{mint_token, TokenVerifier};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use uuid::Uuid;

/// A fresh mechanic subscribed to `queue` receives a freshly written row: the server is fine.
async fn serves_live(h: &Harness) {
    let mut ws = h.client(&mechanic(None)).await;
    ws.subscribe("queue", json!({})).await;
    let id = h.insert(Uuid::new_v4(), "queued", None, None).await;
    let ev = ws.events(1).await.remove(0);
    assert_eq!(ev["assignment"]["id"], id.to_string());
    ws.ping().await;
}

use pgcast_testkit::base64url::encode as b64url;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn auth_frame(token: &str) -> String {
    json!({"type": "auth", "token": token}).to_string()
}

/// A new connection whose first frame is `first` is refused: error unauthorized, close 1008.
async fn refused(h: &Harness, case: &str, first: Message) {
    let mut ws = h.raw().await;
    ws.ws.send(first).await.expect("send");
    match ws.next(WAIT).await {
        Next::Json(v) => {
            assert_eq!(v["type"], "error", "{case}: {v}");
            assert_eq!(v["code"], "unauthorized", "{case}: {v}");
        }
        other => panic!("{case}: expected error unauthorized, got {other:?}"),
    }
    match ws.next(WAIT).await {
        Next::Close(Some(f)) => assert_eq!(u16::from(f.code), 1008, "{case}: {}", f.reason),
        other => panic!("{case}: expected close 1008, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_first_frames_and_bad_tokens_get_unauthorized_and_1008() {
    let h = Harness::start_with(|c| c.max_token_bytes = 1024).await;
    // Somebody already connected keeps being served throughout.
    let mut bystander = h.client(&mechanic(None)).await;
    bystander.subscribe("queue", json!({})).await;

    let who = mechanic(None);
    let sub = who.user_id.to_string();
    let future = now() + 600;
    let wrong_secret = mint_token(
        b"not-the-secret-but-just-as-long-32b",
        &who,
        Duration::from_secs(600),
    )
    .unwrap();
    // Beyond the verifier's 5 s leeway.
    let expired = hs256(
        &json!({"sub": sub, "role": "mechanic", "exp": now() - 3600}),
        SECRET,
    );
    let no_exp = hs256(&json!({"sub": sub, "role": "service"}), SECRET);
    let none_claims = json!({"sub": sub, "role": "service", "exp": future}).to_string();
    let alg_none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(none_claims.as_bytes())
    );
    // alg none with the right signature of another token glued on.
    let real = h.token(&who);
    let alg_none_signed = format!(
        "{}.{}.{}",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(none_claims.as_bytes()),
        real.rsplit('.').next().unwrap()
    );
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &json!({"sub": sub, "role": "service", "exp": future}),
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    // Correctly signed and valid, only too long: the length limit refuses it.
    let long = hs256(
        &json!({"sub": sub, "role": "mechanic", "exp": future, "pad": "x".repeat(2000)}),
        SECRET,
    );
    assert!(long.len() > 1024);
    assert!(TokenVerifier::new(SECRET).unwrap().verify(&long).is_ok());

    let text = |s: String| Message::Text(s.into());
    let cases: Vec<(&str, Message)> = vec![
        (
            "subscribe before auth",
            text(json!({"type": "subscribe", "id": "1", "topic": "queue"}).to_string()),
        ),
        (
            "ping before auth",
            text(json!({"type": "ping", "id": "1"}).to_string()),
        ),
        ("invalid JSON first", text("{not json".into())),
        ("auth without token", text(r#"{"type":"auth"}"#.into())),
        (
            "binary first frame",
            Message::Binary(auth_frame(&real).into_bytes().into()),
        ),
        ("wrong secret", text(auth_frame(&wrong_secret))),
        ("expired", text(auth_frame(&expired))),
        ("garbage", text(auth_frame("garbage"))),
        ("three garbage parts", text(auth_frame("a.b.c"))),
        ("empty token", text(auth_frame(""))),
        ("alg none", text(auth_frame(&alg_none))),
        (
            "alg none, signature attached",
            text(auth_frame(&alg_none_signed)),
        ),
        ("HS512", text(auth_frame(&hs512))),
        ("no exp", text(auth_frame(&no_exp))),
        ("longer than max_token_bytes", text(auth_frame(&long))),
    ];
    let count = cases.len();
    for (case, first) in cases {
        refused(&h, case, first).await;
    }
    assert_eq!(h.metric("pgcast_auth_failures") as usize, count);

    // The bystander and new clients are unaffected.
    let id = h.insert(Uuid::new_v4(), "queued", None, None).await;
    assert_eq!(
        bystander.events(1).await[0]["assignment"]["id"],
        id.to_string()
    );
    bystander.ping().await;
    serves_live(&h).await;
    h.stop().await;
}

#[tokio::test]
async fn malformed_frames_after_auth_get_bad_request_and_the_connection_stays_usable() {
    let h = Harness::start().await;
    let who = mechanic(None);
    let mut ws = h.client(&who).await;
    let long_id = "i".repeat(129);
    let frames = [
        "not json".to_owned(),
        "{".to_owned(),
        "".to_owned(),
        "[]".to_owned(),
        "42".to_owned(),
        "{}".to_owned(),
        r#"{"type":"dance"}"#.to_owned(),
        r#"{"type":"SUBSCRIBE","topic":"queue"}"#.to_owned(),
        r#"{"topic":"queue"}"#.to_owned(),
        // Missing topic.
        r#"{"type":"subscribe","id":"1"}"#.to_owned(),
        r#"{"type":"unsubscribe","id":"1"}"#.to_owned(),
        // Wrong field types.
        r#"{"type":"subscribe","id":"1","topic":7}"#.to_owned(),
        r#"{"type":"subscribe","id":"1","topic":null}"#.to_owned(),
        r#"{"type":"subscribe","id":"1","topic":"queue","since":"yesterday"}"#.to_owned(),
        r#"{"type":"subscribe","id":"1","topic":"queue","since":1.5}"#.to_owned(),
        r#"{"type":"subscribe","id":"1","topic":"queue","snapshot":"yes"}"#.to_owned(),
        r#"{"type":"subscribe","id":7,"topic":"queue"}"#.to_owned(),
        r#"{"type":"ping","id":["p"]}"#.to_owned(),
        // Unknown field.
        r#"{"type":"subscribe","id":"1","topic":"queue","extra":true}"#.to_owned(),
        // A request id longer than 128 bytes.
        json!({"type": "ping", "id": long_id}).to_string(),
    ];
    for frame in &frames {
        ws.send_text(frame).await;
        let e = ws.expect_error("bad_request").await;
        assert!(e["message"].is_string(), "{e}");
        ws.ping().await;
    }
    // Authenticating again is a token refresh: `ready` with the token's expiry.
    ws.send_text(&auth_frame(&h.token(&who))).await;
    let ready = ws.recv().await;
    assert_eq!(ready["type"], "ready", "{ready}");
    assert!(ready["expires_at"].as_u64().is_some(), "{ready}");
    ws.ping().await;
    // A negative since: bad_request with the request id.
    ws.send(json!({"type": "subscribe", "id": "neg", "topic": "queue", "since": -1}))
        .await;
    assert_eq!(ws.expect_error("bad_request").await["id"], "neg");
    ws.ping().await;
    // Unsubscribing from a topic never subscribed.
    ws.send(json!({"type": "unsubscribe", "id": "u", "topic": "queue"}))
        .await;
    assert_eq!(ws.expect_error("bad_request").await["id"], "u");
    ws.ping().await;
    // A binary frame after auth.
    ws.ws
        .send(Message::Binary(
            br#"{"type":"ping","id":"b"}"#.to_vec().into(),
        ))
        .await
        .unwrap();
    ws.expect_error("bad_request").await;
    ws.ping().await;

    // Fully functional afterwards.
    ws.subscribe("queue", json!({})).await;
    let id = h.insert(Uuid::new_v4(), "queued", None, None).await;
    assert_eq!(ws.events(1).await[0]["assignment"]["id"], id.to_string());
    serves_live(&h).await;
    h.stop().await;
}

#[tokio::test]
async fn unknown_and_forbidden_topics_are_refused_and_the_connection_stays_usable() {
    let h = Harness::start().await;
    let w = Uuid::new_v4();
    let who = mechanic(Some(w));
    let other = Uuid::new_v4();
    let mut ws = h.client(&who).await;
    let unknown = [
        format!("garage:{other}"),
        "queue:x".to_owned(),
        format!("queue:{other}"),
        "Queue".to_owned(),
        "queue ".to_owned(),
        "".to_owned(),
        "queue\u{7}".to_owned(),
        "queue\n".to_owned(),
        "que\u{0}ue".to_owned(),
        format!("mechanic:{}\u{1b}", who.user_id),
        "mechanic:not-a-uuid".to_owned(),
        format!("mechanic:{}", who.user_id.simple()),
        "mechanic:../../etc/passwd".to_owned(),
        "q".repeat(10 * 1024),
        format!("workshop:{w}{}", "0".repeat(10 * 1024)),
    ];
    for topic in &unknown {
        ws.subscribe_err(topic, "unknown_topic").await;
        ws.ping().await;
    }
    ws.send(json!({"type": "unsubscribe", "id": "u", "topic": "garage:1"}))
        .await;
    assert_eq!(ws.expect_error("unknown_topic").await["id"], "u");
    ws.ping().await;

    for topic in [
        format!("mechanic:{other}"),
        format!("workshop:{other}"),
        "assignments".to_owned(),
    ] {
        ws.subscribe_err(&topic, "forbidden").await;
        ws.ping().await;
    }
    // None of that registered anything; the allowed topics still work.
    ws.subscribe("queue", json!({})).await;
    ws.subscribe(&format!("workshop:{w}"), json!({})).await;
    let s = Uuid::new_v4();
    let theirs = h.insert(s, "accepted", Some(other), Some(other)).await;
    let mine = h.insert(s, "queued", None, None).await;
    let ev = ws.events(1).await.remove(0);
    assert_eq!(ev["assignment"]["id"], mine.to_string(), "got {theirs}?");
    serves_live(&h).await;
    h.stop().await;
}

#[tokio::test]
async fn the_subscription_limit_gets_too_many_subscriptions() {
    let h = Harness::start_with(|c| c.max_subscriptions = 3).await;
    let svc = service();
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let mut ws = h.client(&svc).await;
    ws.subscribe("assignments", json!({})).await;
    ws.subscribe(&format!("mechanic:{a}"), json!({})).await;
    ws.subscribe(&format!("workshop:{b}"), json!({})).await;
    ws.subscribe_err(&format!("mechanic:{c}"), "too_many_subscriptions")
        .await;
    ws.ping().await;
    // Subscribing again to a topic replaces it: not a fourth subscription.
    ws.subscribe("assignments", json!({})).await;
    ws.subscribe_err(&format!("mechanic:{c}"), "too_many_subscriptions")
        .await;
    ws.ping().await;
    // Unsubscribing makes room.
    ws.send(json!({"type": "unsubscribe", "id": "u", "topic": format!("workshop:{b}")}))
        .await;
    ws.subscribe(&format!("mechanic:{c}"), json!({})).await;

    // Each remaining subscription gets each event once: a row of c on `assignments` and
    // `mechanic:c`, then a row of workshop b (unsubscribed) on `assignments` only.
    let s = Uuid::new_v4();
    let x = h.insert(s, "accepted", Some(c), None).await;
    let y = h.insert(s, "queued", None, Some(b)).await;
    let got = ws.events(3).await;
    let mut first: Vec<(String, String)> = got[..2]
        .iter()
        .map(|e| {
            (
                e["assignment"]["id"].as_str().unwrap().to_owned(),
                e["topic"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    first.sort();
    assert_eq!(
        first,
        vec![
            (x.to_string(), "assignments".to_owned()),
            (x.to_string(), format!("mechanic:{c}")),
        ]
    );
    assert_eq!(got[2]["assignment"]["id"], y.to_string());
    assert_eq!(got[2]["topic"], "assignments");
    ws.ping().await;
    serves_live(&h).await;
    h.stop().await;
}

/// Sends `n` pings in one burst, then (after one token's worth of time) a text ping "end",
/// and counts (pongs, rate_limited errors, bad_request errors) among the replies before the
/// pong of "end". The refill over time is what is under test, so the test waits for the clock
/// once (at 5 frames a second, 200 ms; 250 with margin); it does not poll.
async fn ping_burst(ws: &mut Ws, n: usize, binary: bool) -> (usize, usize, usize) {
    for i in 0..n {
        let frame = json!({"type": "ping", "id": format!("b{i}")}).to_string();
        let msg = if binary {
            Message::Binary(frame.into_bytes().into())
        } else {
            Message::Text(frame.into())
        };
        ws.ws.feed(msg).await.unwrap();
    }
    ws.ws.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    ws.send(json!({"type": "ping", "id": "end"})).await;
    let (mut pongs, mut limited, mut bad) = (0, 0, 0);
    loop {
        let v = ws.recv().await;
        match (v["type"].as_str(), v["code"].as_str()) {
            (Some("pong"), _) if v["id"] == "end" => return (pongs, limited, bad),
            (Some("pong"), _) => pongs += 1,
            (Some("error"), Some("rate_limited")) => limited += 1,
            (Some("error"), Some("bad_request")) => bad += 1,
            _ => panic!("unexpected reply {v}"),
        }
    }
}

#[tokio::test]
async fn a_burst_over_the_frame_rate_gets_rate_limited_then_recovers() {
    let h = Harness::start_with(|c| {
        c.client_frames_per_second = 5;
        c.max_subscriptions = 1;
    })
    .await;
    let mut ws = h.client(&mechanic(None)).await;
    ws.subscribe("queue", json!({})).await;
    let mut other = h.client(&mechanic(None)).await;
    let (pongs, limited, _) = ping_burst(&mut ws, 40, false).await;
    assert!(limited >= 1, "no rate_limited among 40 frames");
    // Roughly the burst allowance (2 × 5, one spent on the subscribe) went through.
    assert!((5..30).contains(&pongs), "{pongs} pongs, {limited} limited");
    // The flood is told, not answered frame by frame.
    assert!(
        pongs + limited < 40,
        "{pongs} pongs and {limited} rate_limited for 40 frames"
    );
    // Another connection has its own budget.
    other.ping().await;
    // The subscription made before the burst is intact.
    let id = h.insert(Uuid::new_v4(), "queued", None, None).await;
    assert_eq!(ws.events(1).await[0]["assignment"]["id"], id.to_string());
    serves_live(&h).await;
    h.stop().await;
}

/// Binary frames are client frames too: a flood of them must not make the server answer each
/// one without limit.
#[tokio::test]
async fn binary_frames_count_against_the_frame_rate() {
    let h = Harness::start_with(|c| {
        c.client_frames_per_second = 5;
        c.max_subscriptions = 1;
    })
    .await;
    let mut ws = h.client(&mechanic(None)).await;
    let (_, limited, bad) = ping_burst(&mut ws, 40, true).await;
    assert!(
        limited >= 1,
        "40 binary frames in a burst: {bad} bad_request, none rate_limited"
    );
    assert!(
        bad + limited < 40,
        "{bad} bad_request, {limited} rate_limited"
    );
    serves_live(&h).await;
    h.stop().await;
}

#[tokio::test]
async fn an_oversize_frame_closes_with_1009() {
    let h = Harness::start_with(|c| c.max_frame_bytes = 4096).await;
    let mut ws = h.client(&mechanic(None)).await;
    let mut bystander = h.client(&mechanic(None)).await;
    // Just under the limit: an ordinary bad request.
    ws.send_text(&"x".repeat(4000)).await;
    ws.expect_error("bad_request").await;
    ws.ping().await;
    // Over it: 1009.
    let big = json!({"type": "ping", "id": "x".repeat(10 * 1024)}).to_string();
    ws.send_text(&big).await;
    ws.expect_close(1009).await;
    // Before authentication too.
    let mut raw = h.raw().await;
    raw.send_text(&big).await;
    raw.expect_close(1009).await;
    bystander.ping().await;
    serves_live(&h).await;
    h.stop().await;
}

#[tokio::test]
async fn a_client_that_never_authenticates_is_closed_at_the_deadline() {
    let h = Harness::start_with(|c| c.auth_timeout = Duration::from_millis(300)).await;
    // Completely silent.
    let started = Instant::now();
    let mut ws = h.raw().await;
    ws.expect_error("unauthorized").await;
    ws.expect_close(1008).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // WebSocket pings do not extend the deadline.
    let started = Instant::now();
    let mut ws = h.raw().await;
    let reply = loop {
        assert!(started.elapsed() < WAIT, "never refused");
        ws.ws.send(Message::Ping(Vec::new().into())).await.unwrap();
        match ws.next(Duration::from_millis(100)).await {
            Next::Nothing => continue,
            Next::Json(v) => break v,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(reply["code"], "unauthorized", "{reply}");
    ws.expect_close(1008).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    serves_live(&h).await;
    h.stop().await;
}

#[tokio::test]
async fn heartbeats_close_a_dead_peer_and_keep_a_live_one() {
    let interval = Duration::from_millis(200);
    let h = Harness::start_with(|c| c.heartbeat_interval = interval).await;
    // Authenticated, then never reads again: it never answers the server's pings.
    let mut dead = h.client(&mechanic(None)).await;
    let dead_since = Instant::now();
    let mut alive = h.client(&mechanic(None)).await;
    alive.subscribe("queue", json!({})).await;
    assert_eq!(h.connections(), 2);

    // The live client keeps reading (and so answering pings) across several intervals,
    // while the gateway's connection count is watched for the dead peer's departure.
    let watch = async {
        h.until_connections(1, "the dead peer to be closed").await;
        dead_since.elapsed()
    };
    let (read, closed_after) = tokio::join!(alive.next(interval * 8), watch);
    assert!(matches!(read, Next::Nothing), "{read:?}");
    // Closed once it missed about two intervals (the server's clock started a little before
    // ours), well within the documented bound; generous for loaded CI machines.
    assert!(
        closed_after >= interval && closed_after < interval * 10,
        "{closed_after:?}"
    );
    assert_eq!(h.connections(), 1);
    // The dead peer's socket has ended (after the pings it never read).
    match dead.next(WAIT).await {
        Next::Ended | Next::Close(_) => {}
        other => panic!("dead peer still connected: {other:?}"),
    }
    // The live one is still subscribed and served.
    alive.ping().await;
    let id = h.insert(Uuid::new_v4(), "queued", None, None).await;
    assert_eq!(alive.events(1).await[0]["assignment"]["id"], id.to_string());
    serves_live(&h).await;
    h.stop().await;
}

/// A peer that keeps sending but never reads fills both directions of its socket; it is as
/// dead as a silent one and must be closed within the heartbeat bound too, instead of holding
/// a connection task (and slot) while the server waits forever to write its replies.
#[tokio::test]
async fn a_peer_that_sends_but_never_reads_is_closed_within_the_heartbeat_bound() {
    let interval = Duration::from_millis(200);
    let h = Harness::start_with(|c| {
        c.heartbeat_interval = interval;
        c.client_frames_per_second = 1_000_000;
    })
    .await;
    let mut flood = h.client(&mechanic(None)).await;
    // Tiny invalid frames, each answered with a longer error, until our own writes stall:
    // the server stopped reading because it cannot write its replies.
    let mut sent = 0usize;
    loop {
        let batch = async {
            for _ in 0..500 {
                flood.ws.feed(Message::Text("x".into())).await?;
            }
            flood.ws.flush().await
        };
        match tokio::time::timeout(Duration::from_millis(500), batch).await {
            Ok(Ok(())) => sent += 500,
            Ok(Err(e)) => panic!("connection ended while sending, after {sent} frames: {e}"),
            Err(_) => break,
        }
        assert!(sent < 5_000_000, "writes never stalled");
    }
    // From here on the peer answers nothing, like any dead peer.
    let stalled = Instant::now();
    h.until_connections(0, "the peer that stopped reading to be closed")
        .await;
    assert!(
        stalled.elapsed() < Duration::from_secs(5),
        "a peer that stopped reading stayed connected {:?} after it went quiet \
         (heartbeat interval {interval:?}, {sent} frames sent)",
        stalled.elapsed()
    );
    drop(flood);
    serves_live(&h).await;
    h.stop().await;
}

#[tokio::test]
async fn connections_over_the_limit_get_503() {
    let h = Harness::start_with(|c| c.max_connections = 2).await;
    let mut a = h.client(&mechanic(None)).await;
    let mut b = h.client(&mechanic(None)).await;
    match tokio_tungstenite::connect_async(h.url()).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 503),
        Err(e) => panic!("expected HTTP 503, got {e}"),
        Ok(_) => panic!("a third connection was accepted"),
    }
    a.ping().await;
    b.ping().await;
    // A closed connection frees its slot.
    a.ws.close(None).await.unwrap();
    loop {
        match a.next(WAIT).await {
            Next::Close(_) | Next::Ended => break,
            Next::Json(_) => continue,
            Next::Nothing => panic!("close not completed"),
        }
    }
    // The server has dropped the closed connection's slot once it is no longer counted.
    h.until_connections(1, "the closed connection to free its slot")
        .await;
    let (ws, _) = tokio_tungstenite::connect_async(h.url())
        .await
        .expect("a freed slot accepts a connection");
    let mut c = Ws { ws };
    let who = mechanic(None);
    c.send_text(&auth_frame(&h.token(&who))).await;
    assert_eq!(c.recv().await["type"], "ready");
    c.ping().await;
    b.ping().await;
    drop(c);
    drop(b);
    h.until_connections(0, "connections released").await;
    assert_eq!(h.connections(), 0, "the gauge follows the count");
    serves_live(&h).await;
    h.stop().await;
}

#[tokio::test]
async fn only_allowed_origins_may_connect() {
    let h =
        Harness::start_with(|c| c.allowed_origins = vec!["https://app.example".to_owned()]).await;
    let with_origin = |origin: &'static str| {
        let mut req = h.url().into_client_request().unwrap();
        req.headers_mut()
            .insert("Origin", HeaderValue::from_static(origin));
        req
    };
    for origin in [
        "https://evil.example",
        "https://app.example.evil.example",
        "http://app.example",
        "https://app.example:8443",
        "null",
    ] {
        match tokio_tungstenite::connect_async(with_origin(origin)).await {
            Err(WsError::Http(resp)) => assert_eq!(resp.status(), 403, "{origin}"),
            Err(e) => panic!("{origin}: expected HTTP 403, got {e}"),
            Ok(_) => panic!("{origin}: accepted"),
        }
    }
    let (ws, _) = tokio_tungstenite::connect_async(with_origin("https://app.example"))
        .await
        .expect("allowed origin refused");
    let mut ws = Ws { ws };
    let who = mechanic(None);
    ws.send_text(&auth_frame(&h.token(&who))).await;
    assert_eq!(ws.recv().await["type"], "ready");
    ws.ping().await;
    // Non-browser clients send no Origin and still need a token (serves_live uses one).
    serves_live(&h).await;
    h.stop().await;
}
