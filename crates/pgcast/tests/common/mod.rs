//! Shared set-up of the `pgcast` binary tests: a database of its own per test, and the built
//! binary with a clean environment.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::process::Stdio;
use std::time::Duration;

use pgcast_listener::{migrate, MigrationScope};
use pgcast_testkit::{PgCluster, TestDb};
use tokio::process::Command;
use tokio_postgres::Client;

/// Every variable the binary reads, removed so that the machine's environment cannot change
/// what a test sees; tests set the ones they mean.
const ENV: [&str; 24] = [
    "DATABASE_URL",
    "PGCAST_LISTEN",
    "PGCAST_JWT_SECRET",
    "PGCAST_JWT_ISSUER",
    "PGCAST_JWT_AUDIENCE",
    "PGCAST_RETENTION",
    "PGCAST_MIGRATE",
    "PGCAST_SIMULATE",
    "PGCAST_DATA_DIR",
    "RUST_LOG",
    "PGCAST_LISTEN_DATABASE_URL",
    "PGSSLMODE",
    "PGSSLROOTCERT",
    "PGCAST_JWT_PUBLIC_KEY",
    "PGCAST_JWT_JWKS_URL",
    "PGCAST_JWT_ALGORITHM",
    "PGCAST_JWT_JWKS_MAX_AGE",
    "PGCAST_JWT_JWKS_MIN_REFRESH",
    "PGCAST_CLAIM_SUB",
    "PGCAST_CLAIM_ROLE",
    "PGCAST_CLAIM_WORKSHOP",
    "PGCAST_ROLE_MAP",
    "PGCAST_TLS_CERT",
    "PGCAST_TLS_KEY",
];

/// Generous bound for one run of the binary or one awaited line; never reached when things work.
pub const LIMIT: Duration = Duration::from_secs(30);

/// The built `pgcast` binary with `args`, a clean environment and piped output.
pub fn pgcast<const N: usize>(args: [&str; N]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgcast"));
    for var in ENV {
        cmd.env_remove(var);
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Output of a finished run.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion (within [`LIMIT`]).
pub async fn run(mut cmd: Command) -> Run {
    let out = tokio::time::timeout(LIMIT, cmd.output())
        .await
        .expect("pgcast finishes in time")
        .expect("pgcast starts");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub async fn fresh_db() -> (TestDb, Client) {
    let db = PgCluster::shared()
        .expect("test cluster")
        .create_database()
        .await
        .expect("create database");
    let client = db.connect().await.expect("connect");
    (db, client)
}

pub async fn migrated_db() -> (TestDb, Client) {
    let (db, mut client) = fresh_db().await;
    migrate(&mut client, MigrationScope::All)
        .await
        .expect("migrate");
    (db, client)
}
