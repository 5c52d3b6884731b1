//! A private PostgreSQL cluster per test process or per fault test: start from a template,
//! stop, restart, and cleanup that survives a killed test process.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use pgcast_localpg::{effective_uid, ensure_template, free_port, LocalPg, Settings, StopMode};
use tempfile::TempDir;

use crate::watchdog::Watchdog;
use crate::TestkitError;

/// How many ports to try when another process takes the free port we picked before the server
/// binds it.
const START_ATTEMPTS: usize = 5;

/// A private PostgreSQL cluster in a fresh temporary directory, listening on a free port of
/// 127.0.0.1, running from the moment it is created.
///
/// Dropping it stops the server (immediate mode) and removes the directory. Should the test
/// process end without dropping it (a `static`, a kill, Ctrl-C), a watchdog process does the
/// same; no server is ever left behind.
#[derive(Debug)]
pub struct PgCluster {
    pg: LocalPg,
    watchdog: Watchdog,
    /// Holds the data directory; removed when the cluster drops (after the watchdog has
    /// already removed it, normally: this is the fallback).
    root: TempDir,
}

/// How a private cluster is set up before its first start, beyond the defaults: more server
/// settings, and files in its data directory (a server certificate and key, a `pg_hba.conf`).
///
/// ```no_run
/// # fn example(cert: &[u8], key: &[u8]) -> Result<(), pgcast_testkit::TestkitError> {
/// use pgcast_testkit::{ClusterOptions, PgCluster};
/// let cluster = PgCluster::start_with(
///     ClusterOptions::new()
///         .file("server.crt", cert)
///         .file("server.key", key)
///         .setting("ssl", "on")
///         .setting("ssl_cert_file", "server.crt")
///         .setting("ssl_key_file", "server.key"),
/// )?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    settings: Vec<(String, String)>,
    files: Vec<(String, Vec<u8>)>,
}

impl ClusterOptions {
    /// The defaults: what [`PgCluster::start`] uses.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a server setting (`-c name=value`), applied after the test kit's own. A relative
    /// file name is relative to the data directory.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Writes a file into the data directory before the first start, readable by the server
    /// only (as PostgreSQL demands of a key). `pg_hba.conf` replaces the template's, which
    /// trusts every connection from the machine; the test kit's own connections
    /// ([`create_database`](PgCluster::create_database), [`TestDb::connect`](crate::TestDb))
    /// are plain TCP to 127.0.0.1 and need a `host` (not `hostssl`) rule.
    pub fn file(mut self, name: impl Into<String>, contents: impl Into<Vec<u8>>) -> Self {
        self.files.push((name.into(), contents.into()));
        self
    }
}

impl PgCluster {
    /// Creates and starts a private cluster.
    ///
    /// The cluster is a copy of a per-version template made once with `initdb` (see
    /// [`pgcast_localpg::ensure_template`]), so this takes well under a second. Fails with
    /// [`TestkitError::is_binaries_not_found`] when PostgreSQL is not installed.
    pub fn start() -> Result<PgCluster, TestkitError> {
        Self::start_with(ClusterOptions::default())
    }

    /// [`start`](Self::start) with more settings and files (e.g. TLS).
    pub fn start_with(options: ClusterOptions) -> Result<PgCluster, TestkitError> {
        let template = ensure_template(&cache_dir())?;
        let root = tempfile::Builder::new()
            .prefix("pgcast-test-")
            .tempdir()
            .map_err(|source| TestkitError::Io {
                action: "create a temporary directory",
                source,
            })?;
        // TempDir is private (0700); the `postgres` user, when we are root, must enter it.
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755)).map_err(|source| {
            TestkitError::Io {
                action: "make the temporary directory reachable",
                source,
            }
        })?;
        let mut settings = Settings::throwaway();
        for (name, value) in options.settings {
            settings = settings.with(name, value);
        }
        let mut pg = LocalPg::init_from_template(&template, &root.path().join("data"), 0)?
            .with_settings(settings);
        for (name, contents) in &options.files {
            pg.write_file(name, contents)?;
        }
        // Armed before the first start, so that a server is never running unwatched.
        let watchdog = Watchdog::plan()
            .run(&pg.stop_command(StopMode::Immediate))
            .remove(root.path())
            .arm("pgcast-testkit-watchdog")?;
        let mut attempt = 1;
        loop {
            pg = pg.with_port(free_port()?);
            match pg.start() {
                Ok(()) => break,
                Err(err) if err.is_address_in_use() && attempt < START_ATTEMPTS => attempt += 1,
                Err(err) => return Err(err.into()),
            }
        }
        Ok(PgCluster { pg, watchdog, root })
    }

    /// The cluster shared by every test of this test process, started on first use.
    ///
    /// Tests in one test binary run as threads of one process, so sharing a cluster saves a
    /// start per test; isolate tests with [`create_database`](Self::create_database). If the
    /// start fails, every caller gets the error. Being a `static`, it is never dropped: its
    /// watchdog stops it and removes its directory when the process exits. Do not stop it;
    /// fault tests use a private cluster.
    pub fn shared() -> Result<&'static PgCluster, TestkitError> {
        static SHARED: OnceLock<Result<PgCluster, Arc<TestkitError>>> = OnceLock::new();
        match SHARED.get_or_init(|| PgCluster::start().map_err(Arc::new)) {
            Ok(cluster) => Ok(cluster),
            Err(err) => Err(TestkitError::SharedCluster(Arc::clone(err))),
        }
    }

    /// The TCP port on 127.0.0.1; it stays the same across [`restart`](Self::restart).
    pub fn port(&self) -> u16 {
        self.pg.port()
    }

    /// A connection URL for database `dbname` as the `postgres` superuser.
    pub fn url(&self, dbname: &str) -> String {
        self.pg.url(dbname)
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        self.pg.data_dir()
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        self.pg.is_running()
    }

    /// Stops the server cleanly (fast mode), keeping its data, e.g. to test a lost database.
    pub fn stop(&self) -> Result<(), TestkitError> {
        Ok(self.pg.stop(StopMode::Fast)?)
    }

    /// Stops the server the way a crash would (immediate mode); the next start recovers.
    pub fn stop_immediately(&self) -> Result<(), TestkitError> {
        Ok(self.pg.stop(StopMode::Immediate)?)
    }

    /// Starts the server again after a stop, on the same port with the same data.
    pub fn start_again(&self) -> Result<(), TestkitError> {
        Ok(self.pg.start()?)
    }

    /// Stops the server cleanly and starts it again, on the same port with the same data.
    pub fn restart(&self) -> Result<(), TestkitError> {
        self.stop()?;
        self.start_again()
    }

    pub(crate) fn root(&self) -> &Path {
        self.root.path()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Stopped here rather than only by the watchdog so that a failure is reported.
        if let Err(err) = self.pg.stop(StopMode::Immediate) {
            eprintln!(
                "pgcast-testkit: could not stop the cluster in {}: {err}",
                self.root().display()
            );
        }
        // Runs the same cleanup as at process exit (the server is already stopped) and
        // removes the directory.
        self.watchdog.fire();
    }
}

/// Where the templates live: one directory per OS user, because a template made by root
/// belongs to the `postgres` user and one made by anyone else belongs to them.
fn cache_dir() -> PathBuf {
    let user = effective_uid().map_or_else(|| "unknown".to_owned(), |uid| uid.to_string());
    std::env::temp_dir().join(format!("pgcast-testkit-{user}"))
}
