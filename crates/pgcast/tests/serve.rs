//! `pgcast serve` as a process: replicas against one database, graceful shutdown, `/readyz`
//! across a lost LISTEN connection, `/metrics`, retention, and refusals at start.

mod common;
mod running;

use std::time::Duration;

use common::{fresh_db, migrated_db, pgcast, run, LIMIT};
use pgcast_events::Role;
use pgcast_testkit::PgCluster;
use running::{sample, token, Next, Server, Ws, POLL, SECRET, WAIT};
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};

/// Graceful shutdown must finish within this (the README's "Operating it").
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(10);

/// Inserts `n` assignments the way applications do: some in transactions of their own, the
/// rest together in one transaction.
async fn insert_batch(client: &Client, n: i32) {
    let alone = n / 2;
    for _ in 0..alone {
        client
            .execute(
                "INSERT INTO session_assignments (session_id, status, customer_name) \
                 VALUES (gen_random_uuid(), 'queued', 'Ana')",
                &[],
            )
            .await
            .expect("insert");
    }
    client
        .execute(
            "INSERT INTO session_assignments (session_id, status, customer_name) \
             SELECT gen_random_uuid(), 'queued', 'Ben' FROM generate_series(1, $1)",
            &[&(n - alone)],
        )
        .await
        .expect("insert in one transaction");
}

/// The log after `after`: (position, assignment id).
async fn log_after(client: &Client, after: i64) -> Vec<(i64, String)> {
    client
        .query(
            "SELECT position, assignment_id::text FROM pgcast.assignment_events \
             WHERE position > $1 ORDER BY position",
            &[&after],
        )
        .await
        .expect("read the log")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// `events` are exactly `expected`, in order, as `assignments` frames.
fn assert_events(events: &[Value], expected: &[(i64, String)]) {
    let got: Vec<(i64, String)> = events
        .iter()
        .map(|e| {
            assert_eq!(e["topic"], "assignments", "{e}");
            (
                e["position"].as_i64().expect("position"),
                e["assignment"]["id"].as_str().expect("id").to_owned(),
            )
        })
        .collect();
    assert_eq!(got, expected);
}

/// The highest position in the log (0 when empty).
async fn log_head(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT coalesce(max(position), 0) FROM pgcast.assignment_events",
            &[],
        )
        .await
        .expect("log head")
        .get(0)
}

/// Receives exactly the log's events after `from` (reading the log once `n` were written).
async fn receive_log(ws: &mut Ws, admin: &Client, from: i64, n: usize) -> i64 {
    let expected = log_after(admin, from).await;
    assert_eq!(expected.len(), n, "the batch is in the log");
    assert_events(&ws.events(n).await, &expected);
    expected.last().map_or(from, |(p, _)| *p)
}

#[tokio::test]
async fn two_replicas_deliver_every_event_and_a_killed_one_disturbs_nobody() {
    let (db, admin) = fresh_db().await;
    // The first applies the migrations, the second finds nothing left to apply.
    let mut a = Server::serve(db.url(), &[]).await;
    let b = Server::serve(db.url(), &[]).await;
    assert_ne!(a.addr, b.addr);
    let mut client_a = a.service_subscriber().await;
    let mut client_b = b.service_subscriber().await;

    let from = log_head(&admin).await;
    insert_batch(&admin, 20).await;
    let through_a = receive_log(&mut client_a, &admin, from, 20).await;
    let through_b = receive_log(&mut client_b, &admin, from, 20).await;
    assert_eq!(through_a, through_b);

    // A further batch, with replica A killed in the middle of it.
    insert_batch(&admin, 10).await;
    a.process.signal("KILL");
    let status = a.process.wait_exit(LIMIT).await;
    assert!(!status.success(), "{status:?}");
    insert_batch(&admin, 10).await;

    let expected = log_after(&admin, through_b).await;
    assert_eq!(expected.len(), 20);
    assert_events(&client_b.events(20).await, &expected);
    client_b.ping().await;
    assert_eq!(b.get("/readyz").await.0, 200);

    // A's client lost its connection (after whatever A had delivered before dying).
    loop {
        match client_a.next(WAIT).await {
            Next::Json(v) if v["type"] == "event" => continue,
            Next::Ended | Next::Close(None) => break,
            other => panic!("A's client: {other:?}"),
        }
    }
    // It reconnects to B and resumes from the last position it saw: nothing is missing.
    let mut resumed = b.client(&token(SECRET.as_bytes(), Role::Service)).await;
    resumed
        .subscribe("assignments", json!({"since": through_a}))
        .await;
    assert_events(&resumed.events(20).await, &expected);
}

#[tokio::test]
async fn sigterm_and_sigint_close_clients_with_1001_and_exit_in_time() {
    let (db, admin) = fresh_db().await;
    for (signal, logged) in [("TERM", "SIGTERM received"), ("INT", "SIGINT received")] {
        let mut server = Server::serve(db.url(), &[]).await;
        let mut subscribed = server.service_subscriber().await;
        let from = log_head(&admin).await;
        let mut idle = server
            .client(&token(SECRET.as_bytes(), Role::Customer))
            .await;
        insert_batch(&admin, 1).await;
        receive_log(&mut subscribed, &admin, from, 1).await;

        let sent = Instant::now();
        server.process.signal(signal);
        subscribed.expect_close(1001).await;
        idle.expect_close(1001).await;
        let status = server.process.wait_exit(SHUTDOWN_LIMIT).await;
        let took = sent.elapsed();
        let stderr = server.process.stderr();
        assert_eq!(status.code(), Some(0), "SIG{signal}: {status:?}\n{stderr}");
        assert!(took < SHUTDOWN_LIMIT, "SIG{signal}: exit took {took:?}");
        assert!(stderr.contains(logged), "{stderr}");
        assert!(!stderr.contains(SECRET), "secret printed: {stderr}");
        assert!(!stderr.contains("did not"), "clean shutdown: {stderr}");
        // Nothing accepts connections there any more.
        assert!(
            tokio::net::TcpStream::connect(server.addr).await.is_err(),
            "SIG{signal}: still accepting on {}",
            server.addr
        );
    }
}

/// Counter `name` (exposed as `name_total`) or gauge in a `/metrics` body.
fn value(metrics: &str, name: &str) -> f64 {
    sample(metrics, &format!("{name}_total"))
        .or_else(|| sample(metrics, name))
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{metrics}"))
}

#[tokio::test]
async fn readyz_follows_the_listener_connection_and_healthz_stays_up() {
    let (db, admin) = fresh_db().await;
    let server = Server::serve(db.url(), &[]).await;
    let mut ws = server.service_subscriber().await;
    let from = log_head(&admin).await;
    assert_eq!(server.get("/healthz").await.0, 200);

    // Keep the listener out after its connection is terminated, so that the unready window
    // lasts until the test ends it (instead of the ~100 ms of one reconnect attempt). A
    // database cannot refuse connections from a session of its own: done from `postgres`.
    let database = db.name();
    let (cluster, connection) = tokio_postgres::connect(
        &PgCluster::shared().expect("cluster").url("postgres"),
        NoTls,
    )
    .await
    .expect("connect to the postgres database");
    tokio::spawn(connection);
    cluster
        .batch_execute(&format!(
            "ALTER DATABASE {database} ALLOW_CONNECTIONS false"
        ))
        .await
        .expect("refuse new connections");
    let terminated = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name ~ '^pgcast-listener(:[0-9]+)?$' AND datname = current_database()",
            &[],
        )
        .await
        .expect("terminate the listener");
    assert_eq!(terminated.len(), 1, "one listener connection");
    assert!(terminated[0].get::<_, bool>(0));
    server.wait_readyz(503).await;
    assert_eq!(server.get("/healthz").await.0, 200);

    // Events committed while the listener is away.
    insert_batch(&admin, 4).await;
    assert_eq!(server.get("/readyz").await.0, 503, "cannot be caught up");
    assert_eq!(server.get("/healthz").await.0, 200);

    cluster
        .batch_execute(&format!("ALTER DATABASE {database} ALLOW_CONNECTIONS true"))
        .await
        .expect("accept connections again");
    server.wait_readyz(200).await;
    assert_eq!(server.get("/healthz").await.0, 200);
    // Caught up: the subscribed client got what was committed during the outage, in order.
    let through = receive_log(&mut ws, &admin, from, 4).await;
    // And live events flow again.
    insert_batch(&admin, 1).await;
    receive_log(&mut ws, &admin, through, 1).await;

    let metrics = server.metrics().await;
    assert!(
        value(&metrics, "pgcast_listener_reconnects") >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        value(&metrics, "pgcast_listener_connected"),
        1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn metrics_expose_every_named_series() {
    let (db, admin) = fresh_db().await;
    let server = Server::serve(db.url(), &[]).await;
    let mut ws = server.service_subscriber().await;
    let from = log_head(&admin).await;
    insert_batch(&admin, 1).await;
    let position = receive_log(&mut ws, &admin, from, 1).await;

    // The counters are bumped right after the event is handed on or the frame is written:
    // wait for them, with a bound.
    let deadline = Instant::now() + WAIT;
    let metrics = loop {
        let metrics = server.metrics().await;
        let at_least_one = |series| sample(&metrics, series).unwrap_or(0.0) >= 1.0;
        if at_least_one("pgcast_frames_delivered_total")
            && at_least_one("pgcast_delivery_latency_seconds_count")
            && at_least_one("pgcast_events_received_total")
            && sample(&metrics, "pgcast_listener_position") == Some(position as f64)
            // Read from the database in the background, every 5 s.
            && sample(&metrics, "pgcast_log_head_position") == Some(position as f64)
        {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "delivery not counted:\n{metrics}"
        );
        tokio::time::sleep(POLL).await;
    };

    // Every series of the README's "Operating it", by the name operators alert on.
    let series = [
        // events received (by the listener) / dispatched / delivered (frames written)
        "pgcast_events_received_total",
        "pgcast_events_dispatched_total",
        "pgcast_frames_delivered_total",
        // end-to-end latency, commit → frame write
        "pgcast_delivery_latency_seconds_bucket{le=\"+Inf\"}",
        "pgcast_delivery_latency_seconds_count",
        "pgcast_delivery_latency_seconds_sum",
        "pgcast_connections",
        "pgcast_subscriptions",
        "pgcast_slow_consumer_closes_total",
        "pgcast_outbound_queued_bytes",
        "pgcast_listener_reconnects_total",
        "pgcast_notification_queue_usage",
        // log lag and positions
        "pgcast_log_head_position",
        "pgcast_listener_position",
        "pgcast_listener_last_event_age_seconds",
        "pgcast_listener_connected",
        "pgcast_database_gauges_age_seconds",
        // where resumes come from, and reads waiting their turn
        "pgcast_replays_from_window_total",
        "pgcast_replays_from_log_total",
        "pgcast_database_reads_waiting",
    ];
    // And every series the README's Metrics paragraph names, read from the README itself so
    // that a series added there cannot be forgotten here.
    let named = readme_metric_names();
    assert!(
        named.len() >= 22,
        "the README's Metrics paragraph was not found or lost names: {named:?}"
    );
    for name in &named {
        assert!(
            exposes(&metrics, name),
            "{name} (named in the README) missing from /metrics:\n{metrics}"
        );
    }
    for name in series {
        assert!(
            sample(&metrics, name).is_some(),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    let buckets = metrics
        .lines()
        .filter(|l| l.starts_with("pgcast_delivery_latency_seconds_bucket{"))
        .count();
    assert!(buckets > 3, "a histogram with buckets:\n{metrics}");

    assert!(value(&metrics, "pgcast_events_received") >= 1.0);
    assert!(value(&metrics, "pgcast_frames_delivered") >= 1.0);
    assert_eq!(value(&metrics, "pgcast_connections"), 1.0);
    assert_eq!(value(&metrics, "pgcast_subscriptions"), 1.0);
    assert_eq!(value(&metrics, "pgcast_slow_consumer_closes"), 0.0);
    assert_eq!(value(&metrics, "pgcast_listener_position"), position as f64);
    assert_eq!(value(&metrics, "pgcast_log_head_position"), position as f64);
    let usage = value(&metrics, "pgcast_notification_queue_usage");
    assert!((0.0..=1.0).contains(&usage), "{usage}");
    let age = value(&metrics, "pgcast_listener_last_event_age_seconds");
    assert!((0.0..60.0).contains(&age), "{age}");
}

/// A scrape never waits on the database: with the log locked against every read (the gauges'
/// background reading hangs on it), scrapes still answer at once, one after another, and the
/// gauges' age shows that their reading is stale.
#[tokio::test]
async fn metrics_answer_while_the_database_hangs() {
    let (db, _admin) = fresh_db().await;
    let server = Server::serve(db.url(), &[]).await;
    let mut locker = tokio_postgres::connect(db.url(), NoTls)
        .await
        .map(|(client, conn)| {
            tokio::spawn(conn);
            client
        })
        .expect("connect");
    let tx = locker.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE pgcast.assignment_events IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock the log");
    // Until the reading has been stale for longer than its interval, scrape in a loop: each
    // scrape must answer well within the time a database read would have been given (the
    // earlier scrape-time read waited up to 2 s).
    let deadline = Instant::now() + WAIT;
    let mut scrapes = 0;
    loop {
        let asked = Instant::now();
        let metrics = server.metrics().await;
        let took = asked.elapsed();
        scrapes += 1;
        assert!(
            took < Duration::from_secs(1),
            "scrape {scrapes} took {took:?}"
        );
        if value(&metrics, "pgcast_database_gauges_age_seconds") > 6.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gauges' age never grew:
{metrics}"
        );
        tokio::time::sleep(POLL).await;
    }
    tx.rollback().await.expect("unlock");
    // Once the database answers again, the gauges are fresh within their interval.
    let deadline = Instant::now() + WAIT;
    while value(
        &server.metrics().await,
        "pgcast_database_gauges_age_seconds",
    ) > 5.5
    {
        assert!(Instant::now() < deadline, "the gauges never recovered");
        tokio::time::sleep(POLL).await;
    }
    eprintln!("{scrapes} scrapes answered while the log was locked");
}

#[tokio::test]
async fn retention_prunes_old_rows_and_older_since_gets_resync() {
    let (db, admin) = migrated_db().await;
    // More statements than one prune batch (1000), all committed "an hour ago".
    admin
        .batch_execute(
            "DO $$ BEGIN FOR i IN 1..1200 LOOP \
                 INSERT INTO session_assignments (session_id, status) \
                 VALUES (gen_random_uuid(), 'queued'); \
             END LOOP; END $$",
        )
        .await
        .expect("insert old rows");
    let backdated = admin
        .execute(
            "UPDATE pgcast.committed_statements SET committed_at = now() - interval '1 hour'",
            &[],
        )
        .await
        .expect("backdate");
    assert_eq!(backdated, 1200);
    let old_head: i64 = admin
        .query_one("SELECT max(position) FROM pgcast.assignment_events", &[])
        .await
        .expect("head")
        .get(0);

    // No replay window: it would hold the pruned events (read at start) and serve them,
    // contiguous; the resumes under test read the log.
    let mut server = Server::serve(db.url(), &["--retention", "1s", "--replay-window", "0"]).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let row = admin
            .query_one(
                // Both tables of the log: a statement's rows go with it.
                "SELECT (SELECT count(*) FROM pgcast.assignment_changes) \
                        + (SELECT count(*) FROM pgcast.committed_statements), \
                        (SELECT pruned_through FROM pgcast.log_state)",
                &[],
            )
            .await
            .expect("read the log state");
        let (left, pruned_through): (i64, i64) = (row.get(0), row.get(1));
        if left == 0 && pruned_through == old_head {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} rows left, pruned_through {pruned_through} (head {old_head}); stderr:\n{}",
            server.process.stderr()
        );
        tokio::time::sleep(POLL).await;
    }
    server
        .process
        .wait_stderr(|log| log.contains("pruned old events from the log rows=1200"))
        .await;

    // Resuming from before the pruned position: told to resync.
    let mut ws = server
        .client(&token(SECRET.as_bytes(), Role::Service))
        .await;
    ws.subscribe("assignments", json!({"since": old_head - 1}))
        .await;
    let resync = ws.recv().await;
    assert_eq!(resync["type"], "resync", "{resync}");
    assert_eq!(resync["topic"], "assignments", "{resync}");

    // Resuming from exactly the pruned position misses nothing: replayed, no resync.
    insert_batch(&admin, 1).await;
    let mut ws = server
        .client(&token(SECRET.as_bytes(), Role::Service))
        .await;
    ws.subscribe("assignments", json!({"since": old_head}))
        .await;
    let expected = log_after(&admin, old_head).await;
    assert_eq!(expected.len(), 1);
    assert_events(&ws.events(1).await, &expected);
}

#[tokio::test]
async fn refuses_to_start_without_the_schema_or_on_a_busy_port() {
    let (db, _admin) = fresh_db().await;
    let out = run(pgcast([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        db.url(),
        "--jwt-secret",
        SECRET,
    ]))
    .await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {}", out.stderr);
    assert!(errors[0].contains("pgcast migrate"), "{}", out.stderr);
    assert!(!out.stderr.contains("pgcast ready"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);

    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("address").to_string();
    let out = run(pgcast([
        "serve",
        "--listen",
        &addr,
        "--database-url",
        db.url(),
        "--jwt-secret",
        SECRET,
        "--migrate",
    ]))
    .await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {}", out.stderr);
    assert!(
        errors[0].contains(&format!("could not listen on {addr}"))
            && errors[0].to_lowercase().contains("in use"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("pgcast ready"), "{}", out.stderr);
    drop(busy);
}

/// `--log-format json` (or `PGCAST_LOG_FORMAT=json`): every stderr line is one JSON object with
/// the usual fields, the configuration summary included. Text logs into a pipe carry no colour
/// codes.
#[tokio::test]
async fn json_logs_are_one_object_per_line_and_text_logs_have_no_colour_in_a_pipe() {
    let (db, _client) = migrated_db().await;
    let mut json_server = Server::serve(db.url(), &["--log-format", "json"]).await;
    json_server.process.signal("TERM");
    assert!(json_server.process.wait_exit(LIMIT).await.success());
    let stderr = json_server.process.stderr();
    let mut messages = Vec::new();
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for key in ["timestamp", "level", "target", "fields"] {
            assert!(v.get(key).is_some(), "{key} missing: {line}");
        }
        messages.push(
            v["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    assert!(messages.iter().any(|m| m == "configuration"), "{stderr}");
    assert!(
        messages.iter().any(|m| m.starts_with("pgcast ready on")),
        "{stderr}"
    );

    let mut text_server = Server::serve(db.url(), &[]).await;
    text_server.process.signal("TERM");
    assert!(text_server.process.wait_exit(LIMIT).await.success());
    let stderr = text_server.process.stderr();
    assert!(stderr.contains("pgcast ready on"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a pipe: {stderr:?}"
    );

    let out = run({
        let mut cmd = pgcast(["doctor", "--log-format", "yaml"]);
        cmd.env("DATABASE_URL", db.url());
        cmd
    })
    .await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
}

/// The `pgcast_…` names in backquotes in the README's "**Metrics**" item of "Operating it".
fn readme_metric_names() -> Vec<String> {
    let readme = include_str!("../../../README.md");
    let start = readme
        .find("- **Metrics**")
        .expect("a Metrics item in the README");
    let item = &readme[start + 2..];
    let item = &item[..item.find("\n- **").unwrap_or(item.len())];
    let mut names: Vec<String> = item
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| w.starts_with("pgcast_"))
        .map(|w| w.split('{').next().unwrap_or(w).to_owned())
        .collect();
    names.dedup();
    names
}

/// Whether the Prometheus text has a sample of metric `name`: the name itself, or with the
/// suffix a counter (`_total`) or histogram (`_bucket`, `_count`, `_sum`) adds.
fn exposes(metrics: &str, name: &str) -> bool {
    metrics.lines().filter(|l| !l.starts_with('#')).any(|line| {
        let series = line.split([' ', '{']).next().unwrap_or_default();
        ["", "_total", "_bucket", "_count", "_sum"]
            .iter()
            .any(|suffix| series.strip_suffix(suffix) == Some(name))
    })
}

/// `serve --migrate` waiting for the migration lock (another replica migrating, or any session
/// holding the key) stops on SIGTERM at once, as the server does: start-up is not a time in
/// which the process ignores the signal.
#[tokio::test]
async fn sigterm_while_waiting_for_the_migration_lock_stops_at_once() {
    let (db, admin) = fresh_db().await;
    admin
        .batch_execute("SELECT pg_advisory_lock(7277017000)")
        .await
        .expect("hold the migration lock");
    let mut process =
        running::Process::spawn(running::serve_command(db.url(), "127.0.0.1:0", SECRET));
    // Waiting: its session is blocked on the lock.
    let deadline = Instant::now() + LIMIT;
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'pgcast-serve'
                   AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "serve never waited for the lock");
        tokio::time::sleep(POLL).await;
    }
    let sent = Instant::now();
    process.signal("TERM");
    let status = process.wait_exit(SHUTDOWN_LIMIT).await;
    let took = sent.elapsed();
    let stderr = process.stderr();
    assert_eq!(status.code(), Some(0), "{status:?}\n{stderr}");
    assert!(
        took < Duration::from_secs(2),
        "exit took {took:?}\n{stderr}"
    );
    assert!(stderr.contains("stopped while starting"), "{stderr}");
    assert!(!stderr.contains("pgcast ready"), "{stderr}");
    // Nothing was applied: the migration never got the lock.
    let installed: Option<String> = admin
        .query_one("SELECT to_regproc('pgcast.version')::text", &[])
        .await
        .expect("version function")
        .get(0);
    assert_eq!(installed, None);
}
