//! `LocalPg` against the machine's real PostgreSQL binaries.

use std::fs;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use pgcast_localpg::{ensure_template, free_port, LocalPg, LocalPgError, Settings, StopMode};
use tempfile::TempDir;

/// Stops the server even when an assertion fails, so no test leaves one behind.
struct Running(LocalPg);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.stop(StopMode::Immediate);
    }
}

/// A temporary directory the `postgres` user can enter (when the tests run as root).
fn scratch() -> TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

fn from_template(dir: &Path) -> LocalPg {
    let cache = std::env::temp_dir().join(format!(
        "pgcast-localpg-tests-{}",
        pgcast_localpg::effective_uid().unwrap_or(u32::MAX)
    ));
    let template = ensure_template(&cache).expect("template");
    LocalPg::init_from_template(&template, &dir.join("data"), free_port().expect("port"))
        .expect("copy template")
}

fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(1)).is_ok()
}

#[test]
fn a_persistent_cluster_is_initialised_once_and_reused() {
    let dir = scratch();
    let data = dir.path().join("demo");
    let port = free_port().expect("port");

    let pg = LocalPg::open_or_init(&data, port)
        .expect("initdb")
        .with_settings(Settings::durable());
    assert!(data.join("PG_VERSION").is_file());
    assert_eq!(
        pg.url("app"),
        format!("postgres://postgres@127.0.0.1:{port}/app")
    );
    let running = Running(pg);
    running.0.start().expect("start");
    assert!(running.0.is_running());
    assert!(accepts(port));
    running.0.stop(StopMode::Fast).expect("stop");
    assert!(!running.0.is_running());
    running
        .0
        .stop(StopMode::Fast)
        .expect("stopping a stopped server is a no-op");

    // A second run finds the cluster (initdb would refuse the non-empty directory).
    let again = Running(LocalPg::open_or_init(&data, port).expect("reopen"));
    again.0.start().expect("start again");
    assert!(accepts(port));
    assert!(again.0.log_file().is_file());
}

#[test]
fn a_taken_port_is_reported_as_such() {
    let dir = scratch();
    let squatter = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let port = squatter.local_addr().expect("addr").port();
    let pg = Running(from_template(dir.path()).with_port(port));

    let err = pg.0.start().expect_err("started on a taken port");
    assert!(err.is_address_in_use(), "{err}");
}

#[test]
fn a_failed_start_carries_the_server_log() {
    let dir = scratch();
    let pg = Running(
        from_template(dir.path())
            .with_settings(Settings::throwaway().with("shared_buffers", "lots")),
    );

    let err = pg.0.start().expect_err("started with an invalid setting");
    assert!(matches!(err, LocalPgError::StartFailed { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("shared_buffers"), "{message}");
    assert!(!err.is_address_in_use());
}

#[test]
fn a_template_copy_needs_an_empty_directory() {
    let dir = scratch();
    let pg = from_template(dir.path());
    // Any initialised cluster is a valid template; the target is the problem here.
    let existing = pg.data_dir();
    let err =
        LocalPg::init_from_template(existing, existing, 1).expect_err("copied onto a cluster");
    assert!(matches!(err, LocalPgError::NotEmpty { .. }), "{err:?}");
}

/// A mistyped data directory (`.`, `/var/tmp`) that holds files but no cluster is refused
/// before anything in it changes: not its mode, not its owner.
#[test]
fn a_directory_with_files_but_no_cluster_is_refused_untouched() {
    use std::os::unix::fs::MetadataExt;
    let dir = scratch();
    let data = dir.path().join("notes");
    fs::create_dir(&data).expect("mkdir");
    fs::write(data.join("todo.txt"), "keep me").expect("a file");
    fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).expect("chmod");
    let before = fs::metadata(&data).expect("stat");

    let err = LocalPg::open_or_init(&data, 1).expect_err("initialised a directory of files");
    assert!(matches!(err, LocalPgError::NotACluster { .. }), "{err:?}");
    assert!(err.to_string().contains("no PostgreSQL cluster"), "{err}");
    let after = fs::metadata(&data).expect("stat");
    assert_eq!(after.mode() & 0o7777, 0o755, "mode changed");
    assert_eq!(
        (after.uid(), after.gid()),
        (before.uid(), before.gid()),
        "owner changed"
    );
    assert_eq!(
        fs::read_to_string(data.join("todo.txt")).unwrap(),
        "keep me"
    );
}

/// A cluster made by another major version than the binaries found (an upgrade installed a
/// newer PostgreSQL) runs on its own version's binaries, or is refused with what to do.
#[test]
fn a_cluster_of_another_major_version_says_what_to_do() {
    let dir = scratch();
    let data = dir.path().join("old");
    fs::create_dir(&data).expect("mkdir");
    // No machine has these binaries.
    fs::write(data.join("PG_VERSION"), "9.1\n").expect("PG_VERSION");

    let err = LocalPg::open_or_init(&data, 1).expect_err("opened a 9.1 cluster");
    let LocalPgError::VersionMismatch {
        cluster_version, ..
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(cluster_version, "9.1");
    let message = err.to_string();
    assert!(
        message.contains("PostgreSQL 9.1") && message.contains("remove"),
        "{message}"
    );
}
