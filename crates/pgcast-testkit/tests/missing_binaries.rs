//! Without PostgreSQL binaries the kit returns a clear error instead of panicking. A test binary
//! of its own, because it changes the environment of the whole process.

use pgcast_testkit::PgCluster;

#[test]
fn start_without_binaries_is_a_clear_error() {
    std::env::set_var("PGCAST_PG_BIN", "/nonexistent/pgcast-no-postgres");

    let err = PgCluster::start().expect_err("no binaries, yet a cluster started");
    assert!(err.is_binaries_not_found(), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("apt-get install -y postgresql"),
        "{message}"
    );
    assert!(message.contains("PGCAST_PG_BIN"), "{message}");

    // Every caller of the shared cluster gets the error, not a panic or a hang.
    for _ in 0..2 {
        let err = PgCluster::shared().expect_err("no binaries, yet a shared cluster");
        assert!(err.is_binaries_not_found(), "{err:?}");
    }
}
