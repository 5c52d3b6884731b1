//! [`LocalPg`]: one cluster in a data directory — create it (`initdb` or a template copy),
//! start and stop it with `pg_ctl`, with its [`Settings`]; and [`free_port`].

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::command::{run, Runner};
use crate::{find_bin_dir, LocalPgError};

/// The server log, kept inside the data directory so that one directory holds everything.
const LOG_FILE: &str = "pgcast-postgres.log";

/// How long `pg_ctl` may wait for the server to start or stop, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// A Unix socket path must fit in `sun_path`: 108 bytes on Linux, including the NUL.
const MAX_SOCKET_PATH: usize = 107;

/// How many lines of the server log a start error carries.
const LOG_TAIL_LINES: usize = 20;

/// Server settings applied on every start.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settings {
    /// Keep PostgreSQL's crash-safety settings. When false (the default) `fsync` and
    /// `full_page_writes` are off: much faster, and fine for a cluster whose data may be lost
    /// when the *machine* crashes. `synchronous_commit` stays on either way: with fsync off it
    /// costs only a `write()`, and turning it off would make an immediate stop (how tests
    /// simulate a server crash) lose acknowledged commits, which fault tests would mistake for
    /// lost events.
    pub durable: bool,
    /// `max_connections`; default 300, because tests and gateway replicas open many.
    pub max_connections: u32,
    /// Further `name = value` settings, applied last.
    pub extra: Vec<(String, String)>,
}

impl Settings {
    /// Fast and not crash-safe: for tests and other throwaway clusters. The default.
    pub fn throwaway() -> Self {
        Self {
            durable: false,
            max_connections: 300,
            extra: Vec::new(),
        }
    }

    /// Crash-safe: for a cluster whose data should survive a power cut.
    pub fn durable() -> Self {
        Self {
            durable: true,
            ..Self::throwaway()
        }
    }

    /// Adds a setting, e.g. `.with("log_min_messages", "debug1")`.
    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.push((name.into(), value.into()));
        self
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self::throwaway()
    }
}

/// How to stop a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect clients, checkpoint, shut down cleanly.
    Fast,
    /// Kill everything at once, as a crash would; the next start runs crash recovery.
    Immediate,
}

impl StopMode {
    fn as_pg_ctl_arg(self) -> &'static str {
        match self {
            Self::Fast => "fast",
            Self::Immediate => "immediate",
        }
    }
}

/// A PostgreSQL cluster in a local data directory, run from the machine's own binaries.
///
/// The value only describes the cluster: dropping it does not stop the server.
#[derive(Debug, Clone)]
pub struct LocalPg {
    /// Absolute, because the binaries run from `/` (see `Runner::command`).
    data_dir: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    /// PostgreSQL refuses to run as root, so as root every binary runs as the `postgres` user.
    runner: Runner,
    settings: Settings,
}

impl LocalPg {
    /// Opens the cluster in `data_dir`, running `initdb` first if the directory has none
    /// (it is created if missing, and given to the `postgres` user when we are root).
    ///
    /// The cluster has one superuser, `postgres`, trusted on local connections only (the
    /// server listens on 127.0.0.1), UTF-8 encoding and the C locale.
    ///
    /// A directory that holds files but no cluster is refused untouched. An existing cluster
    /// runs on the binaries of its own major version (`PG_VERSION`): Debian's directory of that
    /// version when the binaries found are another one and `PGCAST_PG_BIN` does not name them;
    /// without it, an error says what to do.
    pub fn open_or_init(data_dir: &Path, port: u16) -> Result<Self, LocalPgError> {
        let mut pg = Self::describe(data_dir, port)?;
        if pg.is_initialized() {
            pg.bin_dir = pg.bin_dir_for_cluster()?;
            pg.runner.check_access(&pg.data_dir)?;
        } else {
            pg.initdb()?;
        }
        Ok(pg)
    }

    /// The binaries for the cluster's major version: the ones found when they match it.
    fn bin_dir_for_cluster(&self) -> Result<PathBuf, LocalPgError> {
        let path = self.data_dir.join("PG_VERSION");
        let cluster_version = fs::read_to_string(&path)
            .map_err(|source| LocalPgError::Io {
                action: "read",
                path,
                source,
            })?
            .trim()
            .to_owned();
        let binaries = crate::server_version(&self.bin_dir)?;
        if major_version(&binaries).as_deref() == Some(cluster_version.as_str()) {
            return Ok(self.bin_dir.clone());
        }
        if let Some(own) = crate::bin_dir::debian_bin_dir(&cluster_version) {
            if std::env::var_os(crate::BIN_DIR_ENV).is_none_or(|v| v.is_empty()) {
                return Ok(own);
            }
        }
        Err(LocalPgError::VersionMismatch {
            path: self.data_dir.clone(),
            cluster_version,
            bin_dir: self.bin_dir.clone(),
            binaries,
        })
    }

    /// Creates a cluster in `data_dir` by copying `template_dir`, an initialised cluster that
    /// is not running (see [`ensure_template`](crate::ensure_template)). Much faster than
    /// `initdb`. `data_dir` must not exist or be empty.
    pub fn init_from_template(
        template_dir: &Path,
        data_dir: &Path,
        port: u16,
    ) -> Result<Self, LocalPgError> {
        let pg = Self::describe(data_dir, port)?;
        if let Ok(mut entries) = fs::read_dir(&pg.data_dir) {
            if entries.next().is_some() {
                return Err(LocalPgError::NotEmpty { path: pg.data_dir });
            }
            // `cp -a` copies *into* an existing directory, so the empty one goes first.
            fs::remove_dir(&pg.data_dir).map_err(|source| LocalPgError::Io {
                action: "remove empty directory",
                path: pg.data_dir.clone(),
                source,
            })?;
        }
        if let Some(parent) = pg.data_dir.parent() {
            create_dir_all(parent)?;
        }
        // `-a` keeps the owner (the `postgres` user when root) and the 0700 mode PostgreSQL
        // insists on.
        let mut cp = Command::new("cp");
        cp.arg("-a").arg(template_dir).arg(&pg.data_dir);
        run(cp)?;
        pg.runner.check_access(&pg.data_dir)?;
        Ok(pg)
    }

    /// Replaces the settings applied on the next [`start`](Self::start).
    pub fn with_settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// Changes the port used by the next [`start`](Self::start), e.g. to retry after
    /// [`LocalPgError::is_address_in_use`].
    pub fn with_port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    fn describe(data_dir: &Path, port: u16) -> Result<Self, LocalPgError> {
        let data_dir = std::path::absolute(data_dir).map_err(|source| LocalPgError::Io {
            action: "resolve",
            path: data_dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            data_dir,
            bin_dir: find_bin_dir()?,
            port,
            runner: Runner::detect(),
            settings: Settings::default(),
        })
    }

    fn is_initialized(&self) -> bool {
        self.data_dir.join("PG_VERSION").is_file()
    }

    fn initdb(&self) -> Result<(), LocalPgError> {
        // Before anything changes it: a mistyped `--data-dir` (`.`, `/var/tmp`) must not have
        // its mode and owner changed, and initdb would refuse it anyway.
        if fs::read_dir(&self.data_dir).is_ok_and(|mut entries| entries.next().is_some()) {
            return Err(LocalPgError::NotACluster {
                path: self.data_dir.clone(),
            });
        }
        create_dir_all(&self.data_dir)?;
        fs::set_permissions(&self.data_dir, fs::Permissions::from_mode(0o700)).map_err(
            |source| LocalPgError::Io {
                action: "set permissions of",
                path: self.data_dir.clone(),
                source,
            },
        )?;
        self.runner.chown(&self.data_dir)?;
        self.runner.check_access(&self.data_dir)?;
        let mut initdb = self.runner.command(&self.bin_dir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
            // The C locale exists everywhere, whatever LANG says, and keeps log messages in
            // English (see `LocalPgError::is_address_in_use`).
            .args(["--locale=C", "--no-sync"]);
        run(initdb).map(drop)
    }

    /// Starts the server and waits until it accepts connections. On failure the error
    /// carries the end of the server log.
    pub fn start(&self) -> Result<(), LocalPgError> {
        let log = self.log_file();
        let mut pg_ctl = self.pg_ctl("start");
        pg_ctl
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(self.server_options());
        match run(pg_ctl) {
            Ok(_) => Ok(()),
            Err(LocalPgError::CommandFailed { output, .. }) => Err(LocalPgError::StartFailed {
                data_dir: self.data_dir.clone(),
                port: self.port,
                pg_ctl_output: output,
                log_tail: log_tail(&log),
                log,
            }),
            Err(other) => Err(other),
        }
    }

    /// Stops the server and waits until it has exited; does nothing if it is not running.
    pub fn stop(&self, mode: StopMode) -> Result<(), LocalPgError> {
        if !self.is_running() {
            return Ok(());
        }
        run(self.stop_command(mode)).map(drop)
    }

    /// The command that [`stop`](Self::stop) runs, for a caller that must stop the server
    /// from another process (a watchdog that outlives this one).
    pub fn stop_command(&self, mode: StopMode) -> Command {
        let mut pg_ctl = self.pg_ctl("stop");
        pg_ctl.args(["-m", mode.as_pg_ctl_arg()]);
        pg_ctl
    }

    /// Whether a server is running on this data directory (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        let mut pg_ctl = self.runner.command(&self.bin_dir.join("pg_ctl"));
        pg_ctl.arg("status").arg("-D").arg(&self.data_dir);
        run(pg_ctl).is_ok()
    }

    /// The TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for database `dbname` as the `postgres` superuser.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// The data directory (absolute).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory of the PostgreSQL binaries in use.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The server log.
    pub fn log_file(&self) -> PathBuf {
        self.data_dir.join(LOG_FILE)
    }

    /// Writes `contents` to the file `name` in the data directory, owned by the user the server
    /// runs as and readable by it only (mode 0600): what PostgreSQL demands of a server key,
    /// and fine for certificates or a replacement `pg_hba.conf`. Settings name such files
    /// relative to the data directory, e.g. `ssl_key_file = 'server.key'`. Takes effect on the
    /// next [`start`](Self::start) (or reload).
    pub fn write_file(&self, name: &str, contents: &[u8]) -> Result<PathBuf, LocalPgError> {
        let path = self.data_dir.join(name);
        if name.is_empty() || name.contains('/') {
            return Err(LocalPgError::Io {
                action: "write (a plain file name is required)",
                path,
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        let io = |action| {
            let path = path.clone();
            move |source| LocalPgError::Io {
                action,
                path,
                source,
            }
        };
        fs::write(&path, contents).map_err(io("write"))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
            .map_err(io("set permissions of"))?;
        self.runner.chown(&path)?;
        Ok(path)
    }

    /// Whether the binaries run as the `postgres` OS user (because we are root).
    pub fn runs_as_postgres(&self) -> bool {
        self.runner.as_postgres
    }

    fn pg_ctl(&self, action: &str) -> Command {
        let mut pg_ctl = self.runner.command(&self.bin_dir.join("pg_ctl"));
        pg_ctl
            .arg(action)
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS]);
        pg_ctl
    }

    /// The `postgres` command-line options. `pg_ctl` passes them through `/bin/sh`, hence the
    /// quoting.
    fn server_options(&self) -> String {
        let socket = self.data_dir.join(format!(".s.PGSQL.{}", self.port));
        let socket_dir = if socket.as_os_str().len() <= MAX_SOCKET_PATH {
            self.data_dir.to_string_lossy().into_owned()
        } else {
            // No Unix socket rather than a failed start: clients connect over TCP anyway.
            String::new()
        };
        let mut settings: Vec<(String, String)> = vec![
            ("port".into(), self.port.to_string()),
            ("listen_addresses".into(), "127.0.0.1".into()),
            // Our own directory, not /var/run/postgresql, which may not exist or be writable.
            ("unix_socket_directories".into(), socket_dir),
            (
                "max_connections".into(),
                self.settings.max_connections.to_string(),
            ),
        ];
        if !self.settings.durable {
            for name in ["fsync", "full_page_writes"] {
                settings.push((name.into(), "off".into()));
            }
        }
        settings.extend(self.settings.extra.iter().cloned());
        settings
            .iter()
            .map(|(name, value)| format!("-c {}", shell_quote(&format!("{name}={value}"))))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The major version in `postgres --version`'s line (`postgres (PostgreSQL) 15.14 (Debian …)`
/// → `15`; `9.6.24` → `9.6`; a pre-release, `18beta1` or `18devel` → `18`), as `PG_VERSION`
/// spells it.
fn major_version(line: &str) -> Option<String> {
    let version = line.split_whitespace().nth(2)?;
    let digits = |part: &str| -> Option<String> {
        let d: String = part.chars().take_while(char::is_ascii_digit).collect();
        (!d.is_empty()).then_some(d)
    };
    let mut parts = version.split('.');
    let first = digits(parts.next()?)?;
    match first.parse::<u32>().ok()? {
        // Before 10 the major version had two parts.
        ..10 => Some(format!("{first}.{}", digits(parts.next()?)?)),
        _ => Some(first),
    }
}

/// Reserves a free TCP port on 127.0.0.1 by binding port 0, then releases it. Another process
/// may take it before it is used; callers that start a server on it should retry on
/// [`LocalPgError::is_address_in_use`].
pub fn free_port() -> Result<u16, LocalPgError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(LocalPgError::NoFreePort)?;
    Ok(listener
        .local_addr()
        .map_err(LocalPgError::NoFreePort)?
        .port())
}

fn create_dir_all(path: &Path) -> Result<(), LocalPgError> {
    fs::create_dir_all(path).map_err(|source| LocalPgError::Io {
        action: "create directory",
        path: path.to_path_buf(),
        source,
    })
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The last lines of the log, read from its end because a long-lived cluster's log can be big.
fn log_tail(log: &Path) -> String {
    const TAIL_BYTES: u64 = 16 * 1024;
    let mut bytes = Vec::new();
    let read = fs::File::open(log).and_then(|mut file| {
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
        file.read_to_end(&mut bytes)
    });
    if let Err(err) = read {
        return format!("(log unreadable: {err})");
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_survives_single_quotes() {
        assert_eq!(shell_quote("a=b c"), "'a=b c'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn the_major_version_is_read_as_pg_version_spells_it() {
        let major = |line| major_version(line);
        let some = |v: &str| Some(v.to_owned());
        assert_eq!(
            major("postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)"),
            some("15")
        );
        assert_eq!(major("postgres (PostgreSQL) 17.2"), some("17"));
        assert_eq!(major("postgres (PostgreSQL) 10.23"), some("10"));
        assert_eq!(major("postgres (PostgreSQL) 9.6.24"), some("9.6"));
        assert_eq!(major("postgres (PostgreSQL) 18beta1"), some("18"));
        assert_eq!(major("postgres (PostgreSQL) 18devel"), some("18"));
        assert_eq!(major("postgres (PostgreSQL) 17rc1"), some("17"));
        assert_eq!(major("postgres (PostgreSQL) 9.6beta1"), some("9.6"));
        assert_eq!(major("postgres (PostgreSQL) devel"), None);
        assert_eq!(major(""), None);
    }

    #[test]
    fn free_port_is_non_zero() {
        assert!(matches!(free_port(), Ok(port) if port != 0));
    }
}
