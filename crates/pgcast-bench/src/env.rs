//! The processes under test: a throwaway PostgreSQL (or a given one), the `pgcast serve` child
//! (or a given WebSocket URL), the bare broadcaster of the fan-out comparison, the optional
//! Node.js relay, a cleanup watchdog, and the facts about the machine that go into the results.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use pgcast_localpg::{find_bin_dir, free_port, LocalPg, Settings, StopMode};
use pgcast_testkit::Watchdog;
use serde::Serialize;
use tempfile::TempDir;
use tokio_postgres::config::Host;

use crate::ws::{parse_ws_url, WsTarget};

/// A temporary directory that is cleaned up even if the bench is killed: the toolkit's
/// kill-on-parent-exit [`Watchdog`] kills the children listed in its `pids` file, runs the
/// stop command of the database and removes it, once the bench no longer holds its stdin (on
/// exit, however it ends: the kernel closes the pipe).
pub(crate) struct Scratch {
    dir: TempDir,
    watchdog: Option<Watchdog>,
}

impl Scratch {
    pub(crate) fn new() -> Result<Scratch> {
        let dir = tempfile::Builder::new()
            .prefix("pgcast-bench-")
            .tempdir()
            .context("create a temporary directory")?;
        // The `postgres` user (when we are root) must be able to enter it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        Ok(Scratch {
            dir,
            watchdog: None,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Arms the watchdog with the command that stops the database (or `true`).
    pub(crate) fn arm(&mut self, stop: &Command) -> Result<()> {
        let watchdog = Watchdog::plan()
            .kill_pids_in(self.pids_file())
            .run(stop)
            .remove(self.dir.path())
            .arm("pgcast-bench-watchdog")
            .context("start the cleanup watchdog")?;
        self.watchdog = Some(watchdog);
        Ok(())
    }

    fn pids_file(&self) -> PathBuf {
        self.dir.path().join("pids")
    }

    /// Records the children the watchdog must kill if the bench dies.
    pub(crate) fn set_pids(&self, pids: &[u32]) {
        let text: Vec<String> = pids.iter().map(u32::to_string).collect();
        let _ = std::fs::write(self.pids_file(), text.join(" "));
    }

    /// Cleans up now (the children are already stopped) and waits for it.
    pub(crate) fn finish(mut self) {
        self.set_pids(&[]);
        if let Some(mut watchdog) = self.watchdog.take() {
            watchdog.fire();
        }
    }
}

/// The database under test.
pub(crate) struct Database {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) url: String,
    pub(crate) local: Option<LocalPg>,
}

impl Database {
    /// Checks that every host of `url` is on this machine.
    pub(crate) fn given(url: &str) -> Result<Database> {
        let config = tokio_postgres::Config::from_str(url).context("parse --database-url")?;
        for host in config.get_hosts() {
            match host {
                Host::Unix(_) => {}
                Host::Tcp(h) => {
                    let ok = h.eq_ignore_ascii_case("localhost")
                        || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
                    if !ok {
                        bail!("refusing database host {h:?}: the benchmark only runs against this machine (127.0.0.0/8, ::1, localhost, Unix socket)");
                    }
                }
            }
        }
        if config.get_hosts().is_empty() {
            bail!("--database-url names no host");
        }
        Ok(Database {
            config,
            url: url.to_owned(),
            local: None,
        })
    }

    /// Initialises and starts a throwaway cluster under `scratch`; `durable` keeps
    /// PostgreSQL's crash-safety settings (fsync) on, as production runs.
    pub(crate) fn throwaway(scratch: &mut Scratch, durable: bool) -> Result<Database> {
        find_bin_dir().context("PostgreSQL server binaries")?;
        let settings = if durable {
            Settings::durable()
        } else {
            Settings::throwaway()
        };
        let mut pg = LocalPg::open_or_init(&scratch.path().join("data"), 0)
            .context("initdb")?
            .with_settings(settings);
        scratch.arm(&pg.stop_command(StopMode::Immediate))?;
        let mut attempt = 0;
        loop {
            pg = pg.with_port(free_port()?);
            match pg.start() {
                Ok(()) => break,
                Err(e) if e.is_address_in_use() && attempt < 5 => attempt += 1,
                Err(e) => return Err(e).context("start PostgreSQL"),
            }
        }
        let url = pg.url("postgres");
        Ok(Database {
            config: tokio_postgres::Config::from_str(&url)?,
            url,
            local: Some(pg),
        })
    }

    /// The postmaster's pid (for CPU accounting), when the cluster is ours.
    pub(crate) fn postmaster(&self) -> Option<u32> {
        let pg = self.local.as_ref()?;
        let text = std::fs::read_to_string(pg.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    pub(crate) fn stop(&self) {
        if let Some(pg) = &self.local {
            if let Err(e) = pg.stop(StopMode::Fast) {
                eprintln!("warning: could not stop PostgreSQL: {e}");
            }
        }
    }
}

/// A server child process whose readiness is announced on one of its output streams.
pub(crate) struct Server {
    child: Child,
    pub(crate) pid: u32,
    pub(crate) target: WsTarget,
}

/// Reads `stream` line by line into `log`; sends the first line that `ready` accepts.
fn watch_output(
    stream: impl std::io::Read + Send + 'static,
    log: PathBuf,
    ready: impl Fn(&str) -> Option<String> + Send + 'static,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .ok();
        let mut tx = Some(tx);
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if let Some(f) = file.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            if let Some(found) = ready(&line) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(found);
                }
            }
        }
    });
    rx
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl Server {
    /// Starts `pgcast serve` on a free loopback port.
    pub(crate) fn pgcast(bin: &Path, db: &Database, secret: &str, log: PathBuf) -> Result<Server> {
        Server::pgcast_at(bin, db, secret, log, "127.0.0.1:0")
    }

    /// Starts `pgcast serve` listening on `listen` (a loopback address; the reconnect storm
    /// restarts it on the port its clients know).
    pub(crate) fn pgcast_at(
        bin: &Path,
        db: &Database,
        secret: &str,
        log: PathBuf,
        listen: &str,
    ) -> Result<Server> {
        let mut child = Command::new(bin)
            .args(["serve", "--listen", listen])
            .env("DATABASE_URL", &db.url)
            .env("PGCAST_JWT_SECRET", secret)
            // The bench's clients come from 127.0.0.1 (the storm's from 100 loopback addresses,
            // 100 each): the per-address edge limits, made for browsers behind one NAT, would
            // refuse the load itself.
            .env("PGCAST_MAX_CONNECTIONS_PER_IP", "0")
            .env("PGCAST_CONNECTION_RATE_PER_IP", "0")
            .env("PGCAST_MAX_UNAUTHENTICATED", "20000")
            .env("PGCAST_MAX_UNAUTHENTICATED_PER_IP", "19999")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("pgcast stderr"))?;
        let ready = watch_output(stderr, log.clone(), |line| {
            let rest =
                &line[line.find("pgcast ready on http://")? + "pgcast ready on http://".len()..];
            Some(rest.split_whitespace().next()?.to_owned())
        });
        let pid = child.id();
        let addr = wait_ready(&mut child, &ready, &log, "pgcast")?;
        Ok(Server {
            child,
            pid,
            target: parse_ws_url(&format!("ws://{addr}/ws"))?,
        })
    }

    /// Starts the Node.js `pg` + `ws` relay in `dir`, installing its packages first if needed.
    pub(crate) fn node_relay(dir: &Path, db: &Database, log: PathBuf) -> Result<Server> {
        if !dir.join("node_modules").is_dir() {
            let ci = dir.join("package-lock.json").is_file();
            eprintln!(
                "installing the Node relay's packages (npm {}) …",
                if ci { "ci" } else { "install" }
            );
            let status = Command::new("npm")
                .arg(if ci { "ci" } else { "install" })
                .args(["--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(dir)
                .stdin(Stdio::null())
                .status()
                .context("run npm (is Node.js installed?)")?;
            if !status.success() {
                bail!("npm failed in {}", dir.display());
            }
        }
        let mut cmd = Command::new("node");
        cmd.arg("relay.js")
            .current_dir(dir)
            .env("DATABASE_URL", &db.url)
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .stdin(Stdio::null());
        Server::announced(cmd, log, "node relay")
    }

    /// Starts the bare broadcaster of the fan-out comparison: this executable with
    /// `--serve-floor` ([`crate::floor`]), on a free loopback port. It exits when its stdin,
    /// held by the returned value, closes.
    pub(crate) fn floor(database_url: &str, log: PathBuf) -> Result<Server> {
        let mut cmd = Command::new(std::env::current_exe().context("this executable")?);
        cmd.arg("--serve-floor")
            .env("DATABASE_URL", database_url)
            .stdin(Stdio::piped());
        Server::announced(cmd, log, "bare broadcaster")
    }

    /// Spawns `cmd` and waits for the first `ws://` URL on its stdout; both output streams go
    /// to `log`.
    fn announced(mut cmd: Command, log: PathBuf, what: &str) -> Result<Server> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start the {what}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("{what} stdout"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("{what} stderr"))?;
        let _ = watch_output(stderr, log.clone(), |_| None);
        let ready = watch_output(stdout, log.clone(), |line| {
            let i = line.find("ws://")?;
            Some(line[i..].split_whitespace().next()?.to_owned())
        });
        let pid = child.id();
        let url = wait_ready(&mut child, &ready, &log, what)?;
        Ok(Server {
            child,
            pid,
            target: parse_ws_url(&url)?,
        })
    }

    /// SIGKILL now (a crash: no close frames, no goodbye), and reaps the process.
    pub(crate) fn kill(mut self) -> Result<()> {
        self.child
            .kill()
            .with_context(|| format!("SIGKILL pid {}", self.pid))?;
        self.child.wait().context("reap the killed server")?;
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 12 s.
    pub(crate) fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(12);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "warning: {} did not stop on SIGTERM; killing it",
            self.target.url
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_ready(
    child: &mut Child,
    ready: &mpsc::Receiver<String>,
    log: &Path,
    what: &str,
) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match ready.recv_timeout(Duration::from_millis(100)) {
            Ok(addr) => return Ok(addr),
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!(
                        "{what} exited ({status}) before it was ready; its log ({}):\n{}",
                        log.display(),
                        tail(log)
                    );
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{what} was not ready within 60 s; its log ({}):\n{}",
                    log.display(),
                    tail(log)
                );
            }
        }
    }
}

/// The machine and build the figures were taken on.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) cores: usize,
    pub(crate) cpu_model: String,
    pub(crate) memory_gib: f64,
    pub(crate) kernel: String,
    pub(crate) postgres: String,
    pub(crate) date: String,
    pub(crate) git_commit: String,
    pub(crate) git_dirty: bool,
    pub(crate) load_average_at_start: String,
    pub(crate) fd_limit_soft: u64,
    pub(crate) fd_limit_hard: u64,
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl Machine {
    pub(crate) fn probe(postgres: String) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|v| v.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap_or((0, 0));
        Machine {
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model,
            memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            postgres,
            date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            git_commit: command_output("git", &["rev-parse", "--short=12", "HEAD"])
                .unwrap_or_else(|| "unknown".into()),
            git_dirty: command_output("git", &["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty()),
            load_average_at_start: std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            fd_limit_soft: soft,
            fd_limit_hard: hard,
        }
    }
}
