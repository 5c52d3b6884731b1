//! Unit tests of the connection task over channels, with paused time and no database: the
//! auth deadline, heartbeats, dedup of live frames, the slow-consumer close, the frame rate and
//! the unauthenticated slot given back before the socket closes.
//! Live subscriptions without `since` or `snapshot` never read the database, so the gateway's
//! pool points at a port nothing listens on; a test that reached it would fail.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ws::Message;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use pgcast_events::{AssignmentEvent, Position, Principal, Role};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::serve_halves;
use crate::edge::{Admission, UnauthenticatedSlot};
use crate::test_events::Change;
use crate::{GatewayConfig, Shared};

const SECRET: &[u8] = b"unit-test-secret-unit-test-secret-0123456789";

fn gateway(tweak: impl FnOnce(&mut GatewayConfig)) -> Arc<Shared> {
    let mut config = GatewayConfig::new(SECRET);
    tweak(&mut config);
    let pool = deadpool_postgres::Config {
        host: Some("127.0.0.1".to_owned()),
        port: Some(9),
        dbname: Some("nothing".to_owned()),
        ..Default::default()
    }
    .create_pool(
        Some(deadpool_postgres::Runtime::Tokio1),
        tokio_postgres::NoTls,
    )
    .expect("a pool is created without connecting");
    let gateway = crate::Gateway::new(config, pgcast_listener::EventLog::new(pool))
        .expect("a valid configuration");
    gateway.shared
}

/// The client's end of one connection: what it sends, what the server wrote, and the task.
struct Client {
    to_server: mpsc::Sender<Result<Message, axum::Error>>,
    from_server: mpsc::Receiver<Message>,
    /// Flushes that followed at least one frame: the writes a socket would have made.
    writes: Arc<AtomicUsize>,
    /// Client frames the connection took off the socket (peeked ones included).
    reads: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

/// The server's sending half: a channel that counts the flushes after frames.
struct CountingSink {
    inner: mpsc::Sender<Message>,
    fed: bool,
    writes: Arc<AtomicUsize>,
}

impl futures::Sink<Message> for CountingSink {
    type Error = axum::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(axum::Error::new)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        self.fed = true;
        self.inner.start_send(item).map_err(axum::Error::new)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let flushed = std::task::ready!(Pin::new(&mut self.inner).poll_flush(cx));
        if std::mem::take(&mut self.fed) {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Ready(flushed.map_err(axum::Error::new))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.inner)
            .poll_close(cx)
            .map_err(axum::Error::new)
    }
}

/// A connection whose socket is two channels; `capacity` frames fit in the server's sending
/// half before its writes wait (a peer that stopped reading).
fn connect(shared: &Arc<Shared>, capacity: usize) -> Client {
    let (to_server, server_in) = mpsc::channel(16);
    let (server_out, from_server) = mpsc::channel(capacity);
    let writes = Arc::new(AtomicUsize::new(0));
    let sink = CountingSink {
        inner: server_out,
        fed: false,
        writes: writes.clone(),
    };
    let permit = Arc::new(Semaphore::new(1))
        .try_acquire_owned()
        .expect("a fresh semaphore has a permit");
    let admission = Admission {
        unauthenticated: Arc::new(UnauthenticatedSlot::global(permit)),
        frames: None,
    };
    let reads = Arc::new(AtomicUsize::new(0));
    let counted = reads.clone();
    let server_in = server_in.inspect(move |_| {
        counted.fetch_add(1, Ordering::Relaxed);
    });
    let task = tokio::spawn(serve_halves(sink, server_in, shared.clone(), admission));
    Client {
        to_server,
        from_server,
        writes,
        reads,
        task,
    }
}

fn mechanic() -> Principal {
    Principal {
        user_id: uuid::Uuid::from_u128(7),
        role: Role::Mechanic,
        workshop_id: None,
    }
}

impl Client {
    async fn send(&mut self, value: Value) {
        self.to_server
            .send(Ok(Message::Text(value.to_string().into())))
            .await
            .expect("the connection reads");
    }

    /// The next frame the server wrote; `None` when the connection ended.
    async fn next(&mut self) -> Option<Message> {
        self.from_server.next().await
    }

    /// The next text frame as JSON, skipping pings.
    async fn next_json(&mut self) -> Value {
        loop {
            match self.next().await {
                Some(Message::Text(t)) => return serde_json::from_str(&t).expect("JSON"),
                Some(Message::Ping(_)) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    async fn authenticate(&mut self) {
        let shared_token = crate::auth::mint_token(SECRET, &mechanic(), Duration::from_secs(3600))
            .expect("a token");
        self.send(json!({"type": "auth", "token": shared_token}))
            .await;
        let ready = self.next_json().await;
        assert_eq!(ready["type"], "ready", "{ready}");
    }

    /// Asks for a `queue` snapshot: a subscribe that waits while the test holds the gateway's
    /// read permit (`max_concurrent_reads = 1`).
    async fn subscribe_waiting(&mut self) {
        self.send(json!({"type": "subscribe", "id": "s", "topic": "queue", "snapshot": true}))
            .await;
    }

    async fn subscribe_queue(&mut self) -> Position {
        self.send(json!({"type": "subscribe", "id": "q", "topic": "queue"}))
            .await;
        let subscribed = self.next_json().await;
        assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
        subscribed["position"].as_i64().expect("a position")
    }
}

/// A general queued insert at `position` (visible to every mechanic on `queue`), committed now
/// (the tokens expire in an hour).
fn queued(position: Position) -> Arc<AssignmentEvent> {
    queued_at(position, chrono::Utc::now())
}

/// A general queued insert at `position`, committed at `at`.
fn queued_at(position: Position, at: chrono::DateTime<chrono::Utc>) -> Arc<AssignmentEvent> {
    let committed = at.to_rfc3339();
    Change {
        committed_at: Some(&committed),
        ..Change::queued(position)
    }
    .event()
}

fn close_code(msg: Option<Message>) -> Option<u16> {
    match msg {
        Some(Message::Close(Some(frame))) => Some(frame.code),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_socket_that_never_authenticates_is_refused_at_the_deadline() {
    let shared = gateway(|c| c.auth_timeout = Duration::from_secs(5));
    let mut client = connect(&shared, 16);
    let started = tokio::time::Instant::now();
    let error = client.next_json().await;
    assert_eq!(error["code"], "unauthorized", "{error}");
    assert_eq!(close_code(client.next().await), Some(super::close::POLICY));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
        "refused after {waited:?}, the deadline is 5 s"
    );
    assert!(client.next().await.is_none(), "the connection ended");
}

/// Runs its closure when dropped.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

#[tokio::test]
async fn an_unauthenticated_socket_gives_its_slot_back_before_the_socket_closes() {
    let shared = gateway(|_| {});
    let slots = Arc::new(Semaphore::new(1));
    let permit = slots.clone().try_acquire_owned().expect("a free slot");
    let admission = Admission {
        unauthenticated: Arc::new(UnauthenticatedSlot::global(permit)),
        frames: None,
    };
    // The server's receiving half records, when the connection drops it (the socket closing),
    // whether the slot is free yet: a client that saw its socket close may connect again at
    // once, and must find the slot.
    let free_at_close = Arc::new(std::sync::Mutex::new(None));
    let record = {
        let (slots, free_at_close) = (slots.clone(), free_at_close.clone());
        OnDrop(move || {
            *free_at_close.lock().unwrap() = Some(slots.available_permits());
        })
    };
    let (mut to_server, server_in) = mpsc::channel(16);
    let server_in = server_in.map(move |m| {
        let _ = &record;
        m
    });
    let (server_out, _from_server) = mpsc::channel(16);
    let task = tokio::spawn(serve_halves(
        server_out.sink_map_err(axum::Error::new),
        server_in,
        shared,
        admission,
    ));
    assert_eq!(slots.available_permits(), 0, "held while unauthenticated");
    to_server
        .send(Ok(Message::Close(None)))
        .await
        .expect("the server reads");
    task.await.expect("the connection ends");
    assert_eq!(*free_at_close.lock().unwrap(), Some(1));
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_answering_pings_is_dropped_after_two_intervals() {
    let interval = Duration::from_secs(10);
    let shared = gateway(|c| c.heartbeat_interval = interval);
    let mut client = connect(&shared, 16);
    client.authenticate().await;
    let started = tokio::time::Instant::now();
    let mut pings = 0;
    while let Some(msg) = client.next().await {
        match msg {
            Message::Ping(_) => pings += 1,
            other => panic!("only pings were expected, got {other:?}"),
        }
    }
    let lasted = started.elapsed();
    assert!(pings >= 2, "{pings} pings before the connection ended");
    assert!(
        lasted > interval * 2 && lasted <= interval * 4,
        "dropped after {lasted:?} with a {interval:?} heartbeat"
    );
    (&mut client.task)
        .await
        .expect("the connection task ended cleanly");
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_answers_pings_stays() {
    let interval = Duration::from_secs(10);
    let shared = gateway(|c| c.heartbeat_interval = interval);
    let mut client = connect(&shared, 16);
    client.authenticate().await;
    let until = tokio::time::Instant::now() + interval * 6;
    while tokio::time::Instant::now() < until {
        match client.next().await {
            Some(Message::Ping(p)) => client
                .to_server
                .send(Ok(Message::Pong(p)))
                .await
                .expect("the connection reads"),
            other => panic!("expected a ping, got {other:?}"),
        }
    }
    // Still serving: an application ping gets its pong.
    client.send(json!({"type": "ping", "id": "still"})).await;
    assert_eq!(
        client.next_json().await,
        json!({"type": "pong", "id": "still"})
    );
}

#[tokio::test(start_paused = true)]
async fn a_live_event_dispatched_twice_is_written_once() {
    let shared = gateway(|_| {});
    let mut client = connect(&shared, 16);
    client.authenticate().await;
    assert_eq!(client.subscribe_queue().await, 0);
    let first = queued(1);
    shared.hub.dispatch(&first);
    shared.hub.dispatch(&first);
    shared.hub.dispatch(&queued(2));
    let a = client.next_json().await;
    let b = client.next_json().await;
    assert_eq!(
        (a["position"].as_i64(), b["position"].as_i64()),
        (Some(1), Some(2)),
        "{a} then {b}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_reader_that_stops_is_closed_as_a_slow_consumer_and_nobody_else_waits() {
    const EVENTS: i64 = 1_000;
    // Room for a few dozen frames in each outbox; the stalled socket takes 4, then waits.
    let shared = gateway(|c| c.outbound_bytes = 32 << 10);
    let mut stalled = connect(&shared, 4);
    stalled.authenticate().await;
    stalled.subscribe_queue().await;
    let mut reader = connect(&shared, 1024);
    reader.authenticate().await;
    reader.subscribe_queue().await;
    // The reader gets every event, in order, while the stalled one holds nothing up.
    for chunk in (1..=EVENTS).collect::<Vec<_>>().chunks(20) {
        for &p in chunk {
            shared.hub.dispatch(&queued(p));
        }
        for &p in chunk {
            let frame = reader.next_json().await;
            assert_eq!(frame["position"].as_i64(), Some(p), "{frame}");
        }
    }
    // The stalled connection ends by itself: its queue overflowed, it closes with 4008
    // (the close frame waits behind the full socket and is abandoned), and unfiles itself.
    (&mut stalled.task)
        .await
        .expect("the stalled connection ended cleanly");
    assert_eq!(shared.metrics.slow_closes.get(), 1);
    let mut positions = Vec::new();
    while let Some(msg) = stalled.next().await {
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).expect("JSON");
            positions.extend(v["position"].as_i64());
        }
    }
    assert!(
        !positions.is_empty() && positions.len() < EVENTS as usize,
        "the stalled reader got {} of {EVENTS} before its close",
        positions.len()
    );
    assert_eq!(
        positions,
        (1..=positions.len() as i64).collect::<Vec<_>>(),
        "what it got is a prefix, in order"
    );
}

#[tokio::test(start_paused = true)]
async fn frames_beyond_the_rate_get_rate_limited_and_the_rate_refills() {
    // One subscription: the bucket is two seconds' worth (not room for subscriptions).
    let shared = gateway(|c| {
        c.client_frames_per_second = 5;
        c.max_subscriptions = 1;
    });
    let mut client = connect(&shared, 64);
    client.authenticate().await;
    for i in 0..12 {
        client
            .send(json!({"type": "ping", "id": i.to_string()}))
            .await;
    }
    // The bucket holds two seconds' worth (the auth frame is not counted): ten pongs, then the
    // flood is told once; the twelfth gets no answer at all.
    for i in 0..10 {
        assert_eq!(
            client.next_json().await,
            json!({"type": "pong", "id": i.to_string()})
        );
    }
    assert_eq!(client.next_json().await["code"], "rate_limited");
    tokio::time::advance(Duration::from_secs(1)).await;
    client.send(json!({"type": "ping", "id": "later"})).await;
    assert_eq!(
        client.next_json().await,
        json!({"type": "pong", "id": "later"}),
        "the frame after the first refused one was answered"
    );
}

/// A subscribe waiting for its turn on the database (every read permit taken) still ends at
/// the token's `exp` + leeway with 4001, and the snapshot it waited for is never sent.
#[tokio::test(start_paused = true)]
async fn a_subscribe_waiting_for_the_database_still_expires() {
    let shared = gateway(|c| {
        c.max_concurrent_reads = 1;
        c.token_leeway = Duration::from_secs(5);
    });
    let hold = shared.reads.acquire().await.expect("the read permit");
    let mut client = connect(&shared, 64);
    let token =
        crate::auth::mint_token(SECRET, &mechanic(), Duration::from_secs(2)).expect("a token");
    client.send(json!({"type": "auth", "token": token})).await;
    assert_eq!(client.next_json().await["type"], "ready");
    client.subscribe_waiting().await;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        let error = client.next_json().await;
        assert_eq!(error["code"], "token_expired", "{error}");
        close_code(client.next().await)
    })
    .await
    .expect("still open 30 s after a 2 s token (5 s leeway)");
    assert_eq!(ended, Some(super::close::TOKEN_EXPIRED));
    drop(hold);
    assert!(client.next().await.is_none(), "nothing after the close");
}

/// Waits (yielding to the dispatch task) until `position` is in the replay window.
async fn until_dispatched(shared: &Arc<Shared>, position: Position) {
    let keys = [pgcast_events::RouteKey::QueueGeneral];
    // Bounded by yields, not time: its callers run on a paused clock, which does not move
    // while this task keeps running (a time deadline would never pass, and a failure would
    // hang instead of failing).
    for _ in 0..100_000 {
        if shared
            .window
            .range(position - 1, position, &keys, |_| true)
            .is_some_and(|events| events.len() == 1)
        {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{position} never dispatched");
}

/// Starts the gateway's dispatch task and feeds it general queued inserts at `1..=through`,
/// until the last is in the replay window. Returns the listener's side, to feed it more.
async fn dispatched_through(
    shared: &Arc<Shared>,
    through: Position,
) -> tokio::sync::mpsc::Sender<pgcast_listener::Output> {
    let gateway = crate::Gateway {
        shared: shared.clone(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    gateway.spawn_dispatch(rx, 0);
    for p in 1..=through {
        tx.send(pgcast_listener::Output::Event(queued(p)))
            .await
            .expect("dispatch");
    }
    until_dispatched(shared, through).await;
    tx
}

/// The log went back (a restore, a failover that lost positions 6..=10) and drew 6.. again for
/// other events: a client that saw the old 8 and resumes with `since = 8` once the new
/// stream has passed it gets `resync`, not the new 9.. as if they followed its old 8.
#[tokio::test(start_paused = true)]
async fn a_since_among_positions_drawn_again_gets_resync() {
    use pgcast_listener::Output;
    let shared = gateway(|_| {});
    let tx = dispatched_through(&shared, 10).await;
    tx.send(Output::Gap {
        after: 10,
        pruned_through: 5,
    })
    .await
    .expect("dispatch");
    for p in 6..=12 {
        tx.send(Output::Event(queued(p))).await.expect("dispatch");
    }
    until_dispatched(&shared, 12).await;

    let mut client = connect(&shared, 64);
    client.authenticate().await;
    for (since, redrawn) in [(8, true), (10, true), (5, false), (11, false)] {
        client
            .send(json!({"type": "subscribe", "id": "q", "topic": "queue", "since": since}))
            .await;
        assert_eq!(client.next_json().await["type"], "subscribed");
        let next = client.next_json().await;
        if redrawn {
            assert_eq!(next["type"], "resync", "since {since}: {next}");
        } else {
            assert_eq!(next["type"], "event", "since {since}: {next}");
            assert_eq!(next["position"], since + 1, "since {since}: {next}");
            // The rest of the replay, up to 12.
            for _ in since + 2..=12 {
                assert_eq!(client.next_json().await["type"], "event");
            }
        }
    }
}

/// A resume from the replay window is one write: `subscribed` and the events after `since`
/// together (after a restart, thousands of clients resume at once).
#[tokio::test(start_paused = true)]
async fn a_resume_from_the_window_is_written_with_its_subscribed_in_one_write() {
    let shared = gateway(|_| {});
    let _tx = dispatched_through(&shared, 10).await;

    let mut client = connect(&shared, 64);
    client.authenticate().await;
    let before = client.writes.load(Ordering::Relaxed);
    client
        .send(json!({"type": "subscribe", "id": "q", "topic": "queue", "since": 4}))
        .await;
    let subscribed = client.next_json().await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    assert_eq!(subscribed["position"], 4, "{subscribed}");
    for p in 5..=10 {
        let event = client.next_json().await;
        assert_eq!(event["position"], p, "{event}");
    }
    assert_eq!(client.writes.load(Ordering::Relaxed) - before, 1);

    // With nothing to replay, `subscribed` is written all the same.
    let mut client = connect(&shared, 64);
    client.authenticate().await;
    client
        .send(json!({"type": "subscribe", "id": "q", "topic": "queue", "since": 10}))
        .await;
    let subscribed = client.next_json().await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    assert_eq!(subscribed["position"], 10, "{subscribed}");
}

/// An authenticated client whose `queue` snapshot subscribe waits for its turn on the
/// database: the gateway (with `tweak`) has one read permit, taken for good; `capacity` frames
/// fit in the client's socket before the connection's writes wait.
async fn waiting_for_the_database(
    capacity: usize,
    tweak: impl FnOnce(&mut GatewayConfig),
) -> Client {
    let shared = gateway(|c| {
        c.max_concurrent_reads = 1;
        tweak(c);
    });
    shared
        .reads
        .acquire()
        .await
        .expect("the read permit")
        .forget();
    let mut client = connect(&shared, capacity);
    client.authenticate().await;
    client.subscribe_waiting().await;
    client
}

/// A subscribe waiting for its turn on the database (every read permit taken) answers the
/// client's pings meanwhile, so a client that checks its connection with them keeps it. Its
/// other frames wait for the subscribe to end (they are handled in order then), and pings sent
/// after them are still answered.
#[tokio::test(start_paused = true)]
async fn a_subscribe_waiting_for_the_database_answers_pings() {
    let mut client = waiting_for_the_database(64, |_| {}).await;
    for id in ["a", "b", "c", "d", "e", "f"] {
        client.send(json!({"type": "ping", "id": id})).await;
        assert_eq!(
            client.next_json().await,
            json!({"type": "pong", "id": id}),
            "while the subscribe waits"
        );
    }
    client
        .send(json!({"type": "unsubscribe", "id": "u", "topic": "queue"}))
        .await;
    client.send(json!({"type": "ping", "id": "later"})).await;
    assert_eq!(
        client.next_json().await,
        json!({"type": "pong", "id": "later"}),
        "a ping behind a frame that waits"
    );
    let written = tokio::time::timeout(Duration::from_secs(60), client.next()).await;
    assert!(
        written.is_err(),
        "the unsubscribe is not handled while the subscribe waits: {written:?}"
    );
}

/// Frames kept while a subscribe waits are bounded: past the bound the connection reads no
/// further, so a ping behind them waits too.
#[tokio::test(start_paused = true)]
async fn frames_kept_while_a_subscribe_waits_are_bounded() {
    let mut client = waiting_for_the_database(64, |c| c.client_frames_per_second = 1_000).await;
    // About 1 KiB each: more than the 16 KiB kept.
    let filler = "x".repeat(1_000);
    for _ in 0..20 {
        client
            .send(json!({"type": "unsubscribe", "id": filler, "topic": "queue"}))
            .await;
    }
    client.send(json!({"type": "ping", "id": "behind"})).await;
    let written = tokio::time::timeout(Duration::from_secs(60), client.next()).await;
    assert!(
        written.is_err(),
        "a ping behind more than the bound was read: {written:?}"
    );
}

/// A burst of pings while a subscribe waits, from a client that reads nothing meanwhile: the
/// connection takes them off the socket only a few at a time (those waiting for their pong, at
/// most `PINGS_WHILE_BUSY`, besides the one being written), so a client cannot make it hold a
/// list of answers of its choosing; the rest wait in the socket. Once the client reads, every
/// ping gets its pong, in order.
#[tokio::test(start_paused = true)]
async fn a_burst_of_pings_while_a_subscribe_waits_is_taken_a_few_at_a_time_and_all_answered() {
    const PINGS: usize = 40;
    // A socket that takes little before the connection's writes wait.
    let mut client = waiting_for_the_database(1, |c| c.client_frames_per_second = 1_000).await;
    // Auth and subscribe read before counting the pings (yields, not time: the paused clock
    // does not move while this task keeps running).
    for _ in 0..10_000 {
        if client.reads.load(Ordering::Relaxed) >= 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    let taken_before = client.reads.load(Ordering::Relaxed);
    assert_eq!(taken_before, 2, "auth and subscribe");
    let mut to_server = client.to_server.clone();
    let mut sending = tokio::spawn(async move {
        for id in 0..PINGS {
            let ping = json!({"type": "ping", "id": id.to_string()}).to_string();
            to_server
                .send(Ok(Message::Text(ping.into())))
                .await
                .expect("the connection reads");
        }
    });
    // The client cannot get every ping into the socket: the connection stopped reading. (The
    // paused clock runs the second only once every task waits; the first heartbeat is 20 s.)
    let blocked = tokio::time::timeout(Duration::from_secs(1), &mut sending).await;
    assert!(
        blocked.is_err(),
        "all {PINGS} pings went into the socket: nothing held them back"
    );
    // Taken: the two answered (their pongs fill the socket: the channel holds one frame per
    // sender besides its buffer), the ones waiting for their answer, and the next, peeked.
    let taken = client.reads.load(Ordering::Relaxed) - taken_before;
    assert!(
        taken <= super::PINGS_WHILE_BUSY + 3,
        "{taken} pings taken off the socket"
    );
    for id in 0..PINGS {
        assert_eq!(
            client.next_json().await,
            json!({"type": "pong", "id": id.to_string()})
        );
    }
    sending.await.expect("every ping sent");
}

/// Pings answered while a subscribe waits count against the frame rate like any others.
#[tokio::test(start_paused = true)]
async fn pings_while_a_subscribe_waits_are_rate_limited() {
    let mut client = waiting_for_the_database(64, |c| {
        c.client_frames_per_second = 2;
        c.max_subscriptions = 1;
    })
    .await;
    // The bucket holds four; the subscribe took one: three pongs, then the flood is told once.
    let mut replies = Vec::new();
    for id in 0..4 {
        client
            .send(json!({"type": "ping", "id": id.to_string()}))
            .await;
        let reply = client.next_json().await;
        replies.push(match reply["type"].as_str() {
            Some("error") => format!("error {}", reply["code"]),
            _ => format!("{} {}", reply["type"], reply["id"]),
        });
    }
    assert_eq!(
        replies,
        [
            "\"pong\" \"0\"",
            "\"pong\" \"1\"",
            "\"pong\" \"2\"",
            "error \"rate_limited\""
        ]
    );
    // The next one over the rate gets no answer; the first after a refill does.
    client.send(json!({"type": "ping", "id": "4"})).await;
    // The connection takes it (one runtime thread: it runs while this task yields) before
    // the clock moves on.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    client.send(json!({"type": "ping", "id": "later"})).await;
    assert_eq!(
        client.next_json().await,
        json!({"type": "pong", "id": "later"})
    );
}

/// A token that expires while the client is slow to read: the connection leaves the hub before
/// it writes its last frames, so events that keep coming while `token_expired` waits for room
/// in the socket are dropped instead of overflowing its queue, and the close stays 4001 (get a
/// fresh token), not 4008.
#[tokio::test(start_paused = true)]
async fn an_expiry_behind_a_full_socket_still_closes_with_4001() {
    let shared = gateway(|c| {
        c.outbound_bytes = 32 << 10;
        c.token_leeway = Duration::from_secs(1);
    });
    // The server's sending half takes four frames and a fifth whose flush waits for the
    // client: four events, then `token_expired`.
    let mut client = connect(&shared, 4);
    let token =
        crate::auth::mint_token(SECRET, &mechanic(), Duration::from_secs(2)).expect("a token");
    client.send(json!({"type": "auth", "token": token})).await;
    assert_eq!(client.next_json().await["type"], "ready");
    client.subscribe_queue().await;
    // Committed well before the token's `exp` (whole seconds, so as little as 1 s away).
    let before = chrono::Utc::now() - chrono::Duration::seconds(60);
    for p in 1..=4 {
        shared.hub.dispatch(&queued_at(p, before));
    }
    // Written before the clock moves: an expiry and a full outbox seen in the same turn would
    // end the connection first.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while shared.metrics.frames.get() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "the four events were never written"
        );
        tokio::task::yield_now().await;
    }
    // The token ends; the connection unfiles its subscription, then waits to write its last
    // frames behind the four the client has not read.
    tokio::time::advance(Duration::from_secs(4)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while shared.metrics.subscriptions.get() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the expired connection still receives events"
        );
        tokio::task::yield_now().await;
    }
    // Far more than its queue holds.
    for p in 5..=300 {
        shared.hub.dispatch(&queued(p));
    }
    let mut frames = Vec::new();
    while let Some(msg) = client.next().await {
        frames.push(msg);
    }
    let close = close_code(frames.pop());
    let texts: Vec<Value> = frames
        .iter()
        .filter_map(|m| match m {
            Message::Text(t) => serde_json::from_str(t).ok(),
            _ => None,
        })
        .collect();
    let positions: Vec<i64> = texts
        .iter()
        .filter_map(|v| v["position"].as_i64())
        .collect();
    assert_eq!(positions, [1, 2, 3, 4]);
    assert_eq!(
        texts.last().map(|v| v["code"].clone()),
        Some(json!("token_expired"))
    );
    assert_eq!(close, Some(super::close::TOKEN_EXPIRED));
    assert_eq!(shared.metrics.slow_closes.get(), 0);
}

/// An idle connection's memory is mostly its task's state, allocated whole when the task is
/// spawned: the largest state any of its awaits can be in. A subscribe (snapshot, replay,
/// answering pings meanwhile) and a token check are boxed while they run, so an idle
/// connection does not carry their state; inline, the task was 15 KiB (the memory target is
/// 16 KiB per idle connection, everything included).
#[test]
fn an_idle_connection_task_is_small() {
    let shared = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(async { gateway(|_| {}) });
    let (_to_server, server_in) = mpsc::channel::<Result<Message, axum::Error>>(1);
    let (server_out, _from_server) = mpsc::channel::<Message>(1);
    let permit = Arc::new(Semaphore::new(1))
        .try_acquire_owned()
        .expect("a fresh semaphore has a permit");
    let admission = Admission {
        unauthenticated: Arc::new(UnauthenticatedSlot::global(permit)),
        frames: None,
    };
    let task = serve_halves(
        server_out.sink_map_err(axum::Error::new),
        server_in,
        shared,
        admission,
    );
    let bytes = std::mem::size_of_val(&task);
    assert!(
        bytes <= 4096,
        "the connection task's state is {bytes} bytes"
    );
}
