use std::path::Path;
use std::process::{Child, Command, Stdio};

use std::os::unix::process::CommandExt;

use crate::TestkitError;

/// Runs in `sh`: wait until the parent closes our stdin (explicitly, or by exiting or dying,
/// since the kernel closes its descriptors then), stop the server, remove its directory.
/// `$1` is the directory; the rest is the stop command.
const SCRIPT: &str = r#"trap '' HUP INT
read -r _ || :
root=$1
shift
"$@" >/dev/null 2>&1
rm -rf -- "$root"
"#;

/// A child process that stops a cluster and removes its directory once this process no longer
/// holds the write end of its stdin pipe.
///
/// This is what guarantees cleanup for the shared cluster, which lives in a `static` and is
/// never dropped, and for any cluster when the test process is killed or interrupted: the
/// kernel closes the pipe however the process ends. A pipe rather than polling the parent's
/// pid means no delay and no risk of pid reuse. The pipe is close-on-exec, so the servers and
/// other children we start do not inherit it and keep the watchdog waiting.
#[derive(Debug)]
pub(crate) struct Watchdog {
    child: Child,
}

impl Watchdog {
    pub(crate) fn spawn(root: &Path, stop: &Command) -> Result<Self, TestkitError> {
        let child = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("pgcast-testkit-watchdog")
            .arg(root)
            .arg(stop.get_program())
            .args(stop.get_args())
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
        Ok(Self { child })
    }

    /// Lets the watchdog clean up now and waits until it has.
    pub(crate) fn fire(&mut self) {
        drop(self.child.stdin.take());
        // Failure leaves nothing we can act on: the caller has already stopped the server.
        let _ = self.child.wait();
    }
}
