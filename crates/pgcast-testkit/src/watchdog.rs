//! "Kill on parent exit": a small `sh` process that cleans up after a test (or the bench) once
//! the process that armed it no longer holds its stdin — dropped, exited, killed or interrupted.
//! It owns the one cleanup script: kill a process group, kill the pids listed in a file, run a
//! stop command, remove a directory.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::TestkitError;

/// Runs in `sh`: wait until the parent closes our stdin (explicitly, or by exiting or dying,
/// since the kernel closes its descriptors then), then clean up in order. `$1` is a process
/// group to SIGKILL, `$2` a file of pids to SIGKILL, `$3` a directory to remove (each may be
/// empty); the rest is a stop command. The directory is removed with retries: a killed
/// process may still be writing into it for a moment.
const SCRIPT: &str = r#"trap '' HUP INT TERM
read -r _ || :
group=$1 pids=$2 root=$3
shift 3
if [ -n "$group" ]; then kill -s KILL -- "-$group" 2>/dev/null; fi
if [ -n "$pids" ] && [ -s "$pids" ]; then kill -9 $(cat "$pids") >/dev/null 2>&1; fi
if [ "$#" -gt 0 ]; then "$@" >/dev/null 2>&1; fi
[ -n "$root" ] || exit 0
i=0
while [ "$i" -lt 50 ]; do
    rm -rf -- "$root" 2>/dev/null
    [ -e "$root" ] || exit 0
    i=$((i + 1))
    sleep 0.1
done
"#;

/// What a [`Watchdog`] does when it fires; every part is optional, and they run in the order
/// of the methods below.
///
/// ```no_run
/// # fn example(server: &std::process::Child, dir: &std::path::Path) -> Result<(), pgcast_testkit::TestkitError> {
/// use pgcast_testkit::Watchdog;
/// let watchdog = Watchdog::plan()
///     .kill_group(server.id())
///     .remove(dir)
///     .arm("my-test-watchdog")?;
/// // … the test …
/// drop(watchdog); // or the test process ends: the group is killed, the directory removed
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Default)]
pub struct WatchdogPlan {
    group: Option<u32>,
    pids_file: Option<PathBuf>,
    stop: Vec<OsString>,
    remove: Option<PathBuf>,
}

impl WatchdogPlan {
    /// SIGKILL the process group `pgid` (a child started with `process_group(0)` leads the
    /// group whose id is its pid, so its own children go too).
    pub fn kill_group(mut self, pgid: u32) -> Self {
        self.group = Some(pgid);
        self
    }

    /// SIGKILL the pids written (space-separated) in `file` at the moment it fires, for
    /// children started after arming; a missing or empty file kills nothing.
    pub fn kill_pids_in(mut self, file: impl Into<PathBuf>) -> Self {
        self.pids_file = Some(file.into());
        self
    }

    /// Run `stop` (program and arguments; its environment is not carried over).
    pub fn run(mut self, stop: &Command) -> Self {
        self.stop = std::iter::once(stop.get_program().to_owned())
            .chain(stop.get_args().map(ToOwned::to_owned))
            .collect();
        self
    }

    /// Remove the directory `dir` and everything in it.
    pub fn remove(mut self, dir: impl Into<PathBuf>) -> Self {
        self.remove = Some(dir.into());
        self
    }

    /// Starts the watchdog process; `name` is its `argv[0]`, as `ps` shows it.
    pub fn arm(self, name: &str) -> Result<Watchdog, TestkitError> {
        let path = |p: Option<PathBuf>| p.map(PathBuf::into_os_string).unwrap_or_default();
        let child = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg(name)
            .arg(self.group.map(|g| g.to_string()).unwrap_or_default())
            .arg(path(self.pids_file))
            .arg(path(self.remove))
            .args(self.stop)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that Ctrl-C in the terminal, which interrupts the
            // tests, does not interrupt the cleanup too.
            .process_group(0)
            .spawn()
            .map_err(|source| TestkitError::Io {
                action: "start the cleanup watchdog process",
                source,
            })?;
        Ok(Watchdog { child })
    }
}

/// A child process that cleans up once this process no longer holds the write end of its
/// stdin pipe: when [`fire`](Self::fire) is called or the value dropped, and also when the
/// process is killed or interrupted, since the kernel closes the pipe however it ends.
///
/// This is what guarantees cleanup for the shared cluster, which lives in a `static` and is
/// never dropped. A pipe rather than polling the parent's pid means no delay and no risk of pid
/// reuse. The pipe is close-on-exec, so the servers and other children started later do not
/// inherit it and keep the watchdog waiting.
#[derive(Debug)]
pub struct Watchdog {
    child: Child,
}

impl Watchdog {
    /// An empty plan: add what to clean up, then [`arm`](WatchdogPlan::arm) it.
    pub fn plan() -> WatchdogPlan {
        WatchdogPlan::default()
    }

    /// Lets the watchdog clean up now and waits until it has. Firing twice does nothing more.
    pub fn fire(&mut self) {
        if self.child.stdin.take().is_some() {
            // Failure leaves nothing we can act on: the caller has usually stopped things
            // already, and the watchdog is the fallback.
            let _ = self.child.wait();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.fire();
    }
}
