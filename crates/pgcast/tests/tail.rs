//! `pgcast tail` prints exactly the event frames a `since` subscriber would get: the log after
//! the position, then live events, filtered by topic; it stops cleanly on SIGTERM and quietly
//! when its reader goes away.

mod common;

use std::time::{Duration, Instant};

use common::{migrated_db, pgcast, LIMIT};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};
use tokio_postgres::Client;
use uuid::Uuid;

/// A running `pgcast tail`.
struct Tail {
    child: Child,
    /// `None` once the test closed the pipe.
    lines: Option<Lines<BufReader<ChildStdout>>>,
}

impl Tail {
    fn start(url: &str, args: &[&str]) -> Tail {
        let mut cmd = pgcast(["tail"]);
        cmd.args(args).env("DATABASE_URL", url);
        let mut child = cmd.spawn().expect("start pgcast tail");
        let stdout = child.stdout.take().expect("piped stdout");
        Tail {
            child,
            lines: Some(BufReader::new(stdout).lines()),
        }
    }

    /// The next line as JSON, failing after [`LIMIT`].
    async fn next(&mut self) -> Value {
        self.next_within(LIMIT)
            .await
            .expect("a line within the limit")
    }

    /// The next line as JSON, or `None` when there is none within `limit`.
    async fn next_within(&mut self, limit: Duration) -> Option<Value> {
        let lines = self.lines.as_mut().expect("stdout still open");
        let line = tokio::time::timeout(limit, lines.next_line())
            .await
            .ok()?
            .expect("read stdout")
            .expect("tail still running");
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
    }

    /// Closes the read end of stdout, as `| head -n 1` does once it has its line.
    fn close_stdout(&mut self) {
        self.lines = None;
    }

    async fn take(&mut self, n: usize) -> Vec<Value> {
        let mut got = Vec::with_capacity(n);
        for _ in 0..n {
            got.push(self.next().await);
        }
        got
    }

    /// SIGTERM, then the exit code and stderr.
    async fn stop(self) -> (Option<i32>, String) {
        let pid = self.child.id().expect("still running").to_string();
        let status = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("run kill");
        assert!(status.success());
        self.wait().await
    }

    async fn wait(mut self) -> (Option<i32>, String) {
        let status = tokio::time::timeout(LIMIT, self.child.wait())
            .await
            .expect("tail exits in time")
            .expect("wait for tail");
        let mut stderr = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            err.read_to_string(&mut stderr).await.expect("read stderr");
        }
        (status.code(), stderr)
    }
}

/// One committed change, as the log recorded it.
#[derive(Debug, Clone, PartialEq)]
struct Logged {
    position: i64,
    id: Uuid,
    event: &'static str,
}

async fn insert(client: &Client, session: Uuid) -> Uuid {
    client
        .query_one(
            "INSERT INTO session_assignments (session_id, status, customer_name) \
             VALUES ($1, 'queued', 'Ana') RETURNING id",
            &[&session],
        )
        .await
        .expect("insert")
        .get(0)
}

/// The log from `after` on.
async fn log_after(client: &Client, after: i64) -> Vec<Logged> {
    client
        .query(
            "SELECT position, assignment_id, op FROM pgcast.assignment_events \
             WHERE position > $1 ORDER BY position",
            &[&after],
        )
        .await
        .expect("read log")
        .iter()
        .map(|row| Logged {
            position: row.get(0),
            id: row.get(1),
            event: match row.get::<_, &str>(2) {
                "insert" => "assignment.created",
                "update" => "assignment.updated",
                _ => "assignment.deleted",
            },
        })
        .collect()
}

/// Two sessions: A (session s1) created then accepted, B (session s2) created then deleted.
async fn history(client: &Client) -> (Uuid, Uuid) {
    let (s1, s2) = (Uuid::new_v4(), Uuid::new_v4());
    let a = insert(client, s1).await;
    let b = insert(client, s2).await;
    client
        .execute(
            "UPDATE session_assignments SET status = 'accepted', mechanic_id = gen_random_uuid() \
             WHERE id = $1",
            &[&a],
        )
        .await
        .expect("accept");
    client
        .execute("DELETE FROM session_assignments WHERE id = $1", &[&b])
        .await
        .expect("delete");
    (s1, s2)
}

fn assert_line(line: &Value, topic: &str, expected: &Logged) {
    assert_eq!(line["type"], "event", "{line}");
    assert_eq!(line["topic"], topic, "{line}");
    assert_eq!(line["position"], expected.position, "{line}");
    assert_eq!(line["event"], expected.event, "{line}");
    assert_eq!(line["assignment"]["id"], expected.id.to_string(), "{line}");
    let old_status = match expected.event {
        "assignment.created" => Value::Null,
        "assignment.updated" | "assignment.deleted" => Value::from("queued"),
        _ => unreachable!(),
    };
    assert_eq!(line["old_status"], old_status, "{line}");
}

#[tokio::test]
async fn since_prints_the_log_after_the_position_then_live_events() {
    let (db, client) = migrated_db().await;
    history(&client).await;
    let log = log_after(&client, 0).await;
    assert_eq!(log.len(), 4);
    let since = log[0].position;

    let mut tail = Tail::start(db.url(), &["--since", &since.to_string()]);
    let lines = tail.take(3).await;
    for (line, expected) in lines.iter().zip(&log[1..]) {
        assert_line(line, "assignments", expected);
    }
    assert_eq!(lines[0]["assignment"]["customer_name"], "Ana");

    // Caught up: a new commit arrives live.
    insert(&client, Uuid::new_v4()).await;
    let live = log_after(&client, log[3].position).await;
    assert_eq!(live.len(), 1);
    assert_line(&tail.next().await, "assignments", &live[0]);

    let (code, stderr) = tail.stop().await;
    assert_eq!(code, Some(0), "clean exit on SIGTERM: {stderr}");
    assert!(stderr.contains("pgcast tail"), "config printed: {stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
}

#[tokio::test]
async fn topic_session_prints_only_that_sessions_events() {
    let (db, client) = migrated_db().await;
    let (s1, s2) = history(&client).await;
    let log = log_after(&client, 0).await;
    let topic = format!("session:{s1}");

    let mut tail = Tail::start(db.url(), &["--since", "0", "--topic", &topic]);
    // A created (1st) and A accepted (3rd); B's events are not for this topic.
    assert_line(&tail.next().await, &topic, &log[0]);
    assert_line(&tail.next().await, &topic, &log[2]);

    // Live: another session's event commits first; the next line must still be session s1's.
    insert(&client, s2).await;
    insert(&client, s1).await;
    let live = log_after(&client, log[3].position).await;
    assert_eq!(live.len(), 2);
    assert_line(&tail.next().await, &topic, &live[1]);

    let (code, stderr) = tail.stop().await;
    assert_eq!(code, Some(0), "{stderr}");
}

#[tokio::test]
async fn pruned_since_warns_and_starts_at_the_oldest_retained_event() {
    let (db, client) = migrated_db().await;
    history(&client).await;
    let log = log_after(&client, 0).await;
    // pgcast.prune_events() deletes the first two events (two statements, the oldest).
    let pruned: i32 = client
        .query_one("SELECT pgcast.prune_events('0 s', 2)", &[])
        .await
        .expect("prune")
        .get(0);
    assert_eq!(pruned, 2);
    let through: i64 = client
        .query_one("SELECT pruned_through FROM pgcast.log_state", &[])
        .await
        .expect("pruned_through")
        .get(0);
    assert_eq!(through, log[1].position);

    let mut tail = Tail::start(db.url(), &["--since", "0"]);
    assert_line(&tail.next().await, "assignments", &log[2]);
    assert_line(&tail.next().await, "assignments", &log[3]);
    let (code, stderr) = tail.stop().await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "up to {} were removed by retention",
            log[1].position
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_closed_stdout_ends_tail_quietly() {
    let (db, client) = migrated_db().await;
    insert(&client, Uuid::new_v4()).await;
    let mut tail = Tail::start(db.url(), &["--since", "0"]);
    tail.next().await;
    // The reader goes away; the next event cannot be written.
    tail.close_stdout();
    insert(&client, Uuid::new_v4()).await;
    let (code, stderr) = tail.wait().await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
}

#[tokio::test]
async fn without_since_only_events_committed_after_the_start_are_printed() {
    let (db, client) = migrated_db().await;
    insert(&client, Uuid::new_v4()).await;
    let before = log_after(&client, 0).await;
    let mut tail = Tail::start(db.url(), &[]);

    // Tail is live from some moment after it started, which the test cannot see: commit until
    // one event comes through. Each wait is short, the whole loop has a deadline.
    let deadline = Instant::now() + LIMIT;
    let first = loop {
        assert!(Instant::now() < deadline, "no live event printed");
        insert(&client, Uuid::new_v4()).await;
        if let Some(line) = tail.next_within(Duration::from_millis(200)).await {
            break line;
        }
    };
    let first_position = first["position"].as_i64().expect("position");
    assert!(first_position > before[0].position, "{first}");
    // From there on, every commit is printed once, in order.
    let mut expected = log_after(&client, first_position).await;
    insert(&client, Uuid::new_v4()).await;
    expected.extend(
        log_after(
            &client,
            expected.last().map_or(first_position, |l| l.position),
        )
        .await,
    );
    for logged in &expected {
        assert_line(&tail.next().await, "assignments", logged);
    }
    let (code, stderr) = tail.stop().await;
    assert_eq!(code, Some(0), "{stderr}");
}

#[tokio::test]
async fn unreachable_database_fails_before_printing() {
    let mut cmd = pgcast(["tail", "--since", "0"]);
    cmd.env("DATABASE_URL", "postgres://app:hunter2@127.0.0.1:1/none");
    let out = common::run(cmd).await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stdout.is_empty());
    assert!(!out.stderr.contains("hunter2"), "{}", out.stderr);
}

#[tokio::test]
async fn unmigrated_database_fails_before_printing() {
    let (db, _client) = common::fresh_db().await;
    let mut cmd = pgcast(["tail"]);
    cmd.env("DATABASE_URL", db.url());
    let out = common::run(cmd).await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stdout.is_empty());
    assert!(
        out.stderr.contains("could not read the event log"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("does not exist"), "{}", out.stderr);
}

/// The pages of PostgreSQL's notification queue in use (`pg_notification_queue_usage()` is a
/// fraction of its 8 GB: 2^20 pages of 8 KiB).
async fn queue_pages(client: &Client) -> f64 {
    let usage: f64 = client
        .query_one("SELECT pg_notification_queue_usage()", &[])
        .await
        .expect("queue usage")
        .get(0);
    usage * f64::from(1u32 << 20)
}

/// A `tail` whose reader pauses (a pager waiting for a key) keeps reading its doorbells: the
/// notification queue does not fill behind it, every write commits, and when the reader comes
/// back it gets every event once, in order.
#[tokio::test]
async fn a_stalled_reader_never_holds_the_notification_queue() {
    let (db, client) = migrated_db().await;
    let mut tail = Tail::start(db.url(), &["--since", "0"]);
    let session = Uuid::new_v4();
    insert(&client, session).await;
    tail.next().await; // live: now the reader stops reading.
                       // Enough rows to fill the pipe and every buffer between it and the log (2 KB lines) ...
    client
        .batch_execute(
            "INSERT INTO session_assignments (session_id, status, customer_name, concern)
             SELECT gen_random_uuid(), 'queued', 'row ' || g, repeat('x', 2000)
             FROM generate_series(1, 2500) g",
        )
        .await
        .expect("rows");
    // ... while single-row commits and a flood of doorbells (~250 pages of the queue) keep
    // coming.
    for _ in 0..50 {
        insert(&client, session).await;
    }
    client
        .batch_execute(
            "SELECT pg_notify('pgcast_assignments', g::text) FROM generate_series(1, 50000) g",
        )
        .await
        .expect("doorbells");
    let deadline = Instant::now() + LIMIT;
    loop {
        let pages = queue_pages(&client).await;
        if pages < 8.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{pages:.0} pages of the notification queue held behind a stalled tail"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The reader comes back: everything, once, in order.
    let expected = log_after(&client, 1).await;
    assert_eq!(expected.len(), 2550);
    for logged in &expected {
        let line = tail.next().await;
        assert_eq!(line["position"], logged.position, "{line}");
        assert_eq!(line["assignment"]["id"], logged.id.to_string());
    }
    assert!(tail.next_within(Duration::from_millis(300)).await.is_none());
    let (code, stderr) = tail.stop().await;
    assert_eq!(code, Some(0), "{stderr}");
}

/// A reader that stops reading (a paused pager, a stuck pipe) does not keep SIGTERM from
/// stopping `tail`: with its stdout pipe full and a write blocked on it, it still exits 0 in
/// time.
#[tokio::test]
async fn sigterm_stops_tail_while_its_reader_has_stalled() {
    let (db, client) = migrated_db().await;
    // About 2,000 lines of ~400 bytes: far more than a pipe holds (64 KiB).
    client
        .execute(
            "INSERT INTO session_assignments (session_id, status, customer_name, concern)
             SELECT gen_random_uuid(), 'queued', 'Ana', repeat('x', 200)
             FROM generate_series(1, 2000)",
            &[],
        )
        .await
        .expect("insert");
    let tail = Tail::start(db.url(), &["--since", "0"]);
    let pid = tail.child.id().expect("running");
    // Nothing reads its stdout: wait until one of its threads is blocked writing the pipe.
    let deadline = Instant::now() + LIMIT;
    loop {
        let blocked = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("its threads")
            .filter_map(Result::ok)
            .any(|task| {
                std::fs::read_to_string(task.path().join("wchan"))
                    .is_ok_and(|wchan| wchan.contains("pipe_write"))
            });
        if blocked {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tail never blocked on its stdout"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sent = Instant::now();
    let (code, stderr) = tail.stop().await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "exit took {:?}: {stderr}",
        sent.elapsed()
    );
}
