//! The test kit against real PostgreSQL: isolation, restarts, and cleanup.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgcast_testkit::PgCluster;

/// Set in the child process of `shared_cluster_is_cleaned_up_when_the_process_is_killed`.
const HELPER_ENV: &str = "PGCAST_TESTKIT_HELPER";

/// Polls `condition` until it holds, failing the test after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids of the processes whose command line mentions `dir` (servers, pg_ctl, watchdogs).
fn processes_mentioning(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let pid = entry.file_name().into_string().ok()?;
            pid.parse::<u32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&needle).then_some(pid)
        })
        .collect()
}

fn port_accepts(port: u16) -> bool {
    TcpStream::connect_timeout(
        &(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_millis(500),
    )
    .is_ok()
}

/// Asserts that nothing of the cluster is left: no directory, no process, no listener.
fn assert_gone(data_dir: &Path, port: u16) {
    assert!(!data_dir.exists(), "{} still exists", data_dir.display());
    wait_until(
        "no process mentions the data directory",
        Duration::from_secs(10),
        || processes_mentioning(data_dir).is_empty(),
    );
    wait_until(
        "the port refuses connections",
        Duration::from_secs(10),
        || !port_accepts(port),
    );
}

#[tokio::test]
async fn shared_cluster_gives_distinct_usable_databases() {
    let cluster = PgCluster::shared().expect("shared cluster");
    assert!(std::ptr::eq(
        cluster,
        PgCluster::shared().expect("shared cluster")
    ));

    let (a, b) = tokio::join!(cluster.create_database(), cluster.create_database());
    let (a, b) = (a.expect("database a"), b.expect("database b"));
    assert_ne!(a.name(), b.name());
    assert_ne!(a.url(), b.url());

    let (ca, cb) = (
        a.connect().await.expect("connect a"),
        b.connect().await.expect("connect b"),
    );
    for client in [&ca, &cb] {
        let one: i32 = client
            .query_one("SELECT 1", &[])
            .await
            .expect("select")
            .get(0);
        assert_eq!(one, 1);
    }

    ca.batch_execute("CREATE TABLE only_in_a (id int)")
        .await
        .expect("create");
    let exists = "SELECT to_regclass('public.only_in_a') IS NOT NULL";
    let in_a: bool = ca.query_one(exists, &[]).await.expect("query a").get(0);
    let in_b: bool = cb.query_one(exists, &[]).await.expect("query b").get(0);
    assert!(in_a);
    assert!(
        !in_b,
        "a table created in one test database is visible in another"
    );

    // The config and the URL point at the same database.
    let via_config = a.pg_config().get_dbname().map(str::to_owned);
    assert_eq!(via_config.as_deref(), Some(a.name()));
}

#[tokio::test]
async fn private_cluster_keeps_data_and_port_across_stop_and_crash() {
    let cluster = PgCluster::start().expect("private cluster");
    let port = cluster.port();
    let db = cluster.create_database().await.expect("database");
    let client = db.connect().await.expect("connect");
    client
        .batch_execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (1)")
        .await
        .expect("write");

    cluster.stop().expect("stop");
    assert!(!cluster.is_running());
    assert!(db.connect().await.is_err(), "connected to a stopped server");
    assert!(client.query_one("SELECT 1", &[]).await.is_err());

    cluster.start_again().expect("start again");
    assert_eq!(cluster.port(), port);
    let client = db.connect().await.expect("reconnect");
    client
        .batch_execute("INSERT INTO kept VALUES (2)")
        .await
        .expect("write");

    // An immediate stop is a simulated crash: committed rows must survive recovery.
    cluster.stop_immediately().expect("stop immediately");
    cluster.start_again().expect("recover");
    cluster.restart().expect("restart");
    assert_eq!(cluster.port(), port);

    let client = db.connect().await.expect("reconnect");
    let rows: i64 = client
        .query_one("SELECT count(*) FROM kept", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 2);
}

#[test]
fn dropping_a_cluster_leaves_nothing_behind() {
    let cluster = PgCluster::start().expect("private cluster");
    let (data_dir, port) = (cluster.data_dir().to_path_buf(), cluster.port());
    assert!(cluster.is_running());
    assert!(port_accepts(port));
    assert!(!processes_mentioning(&data_dir).is_empty());

    drop(cluster);
    assert_gone(&data_dir, port);
}

#[test]
fn shared_cluster_is_cleaned_up_when_the_process_is_killed() {
    // A `static` is never dropped, so the shared cluster relies on its watchdog: run a test
    // process that starts one, kill it with SIGKILL (nothing of ours runs), and check.
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "hold_the_shared_cluster",
            "--ignored",
            "--nocapture",
        ])
        .env(HELPER_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn helper");
    let stdout = child.stdout.take().expect("helper stdout");
    let mut seen = String::new();
    let started = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            seen.push_str(&line);
            seen.push('\n');
            let rest = line.strip_prefix("CLUSTER ")?;
            let (port, dir) = rest.split_once(' ')?;
            Some((port.parse::<u16>().ok()?, PathBuf::from(dir)))
        });
    let Some((port, data_dir)) = started else {
        let _ = child.kill();
        panic!("helper did not start a cluster; it printed:\n{seen}");
    };
    assert!(port_accepts(port));

    child.kill().expect("kill helper");
    child.wait().expect("reap helper");
    wait_until(
        "the data directory is removed",
        Duration::from_secs(30),
        || !data_dir.exists(),
    );
    assert_gone(&data_dir, port);
}

/// Run only as the child of the test above: starts the shared cluster, reports it, and waits
/// to be killed (or for its stdin to close, so it can never outlive the parent).
#[test]
#[ignore = "helper process for shared_cluster_is_cleaned_up_when_the_process_is_killed"]
fn hold_the_shared_cluster() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let cluster = PgCluster::shared().expect("shared cluster");
    println!(
        "CLUSTER {} {}",
        cluster.port(),
        cluster.data_dir().display()
    );
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}
