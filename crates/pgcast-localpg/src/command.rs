//! Running the PostgreSQL binaries: as the `postgres` OS user when this process is root
//! ([`effective_uid`] tells), with their output captured into errors.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::LocalPgError;

/// The OS user PostgreSQL runs as when we are root.
pub(crate) const POSTGRES_USER: &str = "postgres";

/// The effective user id of this process, or `None` if it cannot be told.
///
/// Read from `/proc/self/status` (the `Uid:` line is real, effective, saved, fs), falling back to
/// `id -u` where there is no `/proc`; `unsafe` is forbidden, so `geteuid()` is not an option.
pub fn effective_uid() -> Option<u32> {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let uid = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|euid| euid.parse().ok());
        if uid.is_some() {
            return uid;
        }
    }
    let out = Command::new("id")
        .arg("-u")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

/// Builds commands for the PostgreSQL binaries, wrapped in `runuser -u postgres --` when we
/// are root (PostgreSQL refuses to run as root).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Runner {
    pub(crate) as_postgres: bool,
}

impl Runner {
    pub(crate) fn detect() -> Self {
        Self {
            as_postgres: effective_uid() == Some(0),
        }
    }

    pub(crate) fn command(self, program: &Path) -> Command {
        let mut cmd = if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", POSTGRES_USER, "--"]).arg(program);
            cmd
        } else {
            Command::new(program)
        };
        // The `postgres` user may not be allowed into our working directory, and every path we
        // pass is absolute.
        cmd.current_dir("/").stdin(Stdio::null());
        cmd
    }

    /// When root, checks that the `postgres` user exists and can write to `dir`.
    pub(crate) fn check_access(self, dir: &Path) -> Result<(), LocalPgError> {
        if !self.as_postgres {
            return Ok(());
        }
        let mut id = Command::new("id");
        id.arg("-u").arg(POSTGRES_USER);
        if run(id).is_err() {
            return Err(LocalPgError::NoPostgresUser);
        }
        let mut test = self.command(Path::new("test"));
        test.arg("-w").arg(dir);
        match run(test) {
            Ok(_) => Ok(()),
            Err(LocalPgError::CommandFailed { .. }) => Err(LocalPgError::NotAccessible {
                path: dir.to_path_buf(),
            }),
            Err(other) => Err(other),
        }
    }

    /// Gives `path` (recursively) to the `postgres` user when we run PostgreSQL as that user.
    pub(crate) fn chown(self, path: &Path) -> Result<(), LocalPgError> {
        if !self.as_postgres {
            return Ok(());
        }
        let mut chown = Command::new("chown");
        // `user:` means the user's login group.
        chown.arg("-R").arg(format!("{POSTGRES_USER}:")).arg(path);
        run(chown).map(drop)
    }
}

/// Runs `cmd` to completion and returns its stdout and stderr, trimmed; a non-zero exit is an
/// error that carries that output.
pub(crate) fn run(mut cmd: Command) -> Result<String, LocalPgError> {
    let command = describe(&cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LocalPgError::Spawn {
            command: command.clone(),
            source,
        })?;
    let mut text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.trim().is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(stderr.trim());
    }
    if out.status.success() {
        Ok(text)
    } else {
        Err(LocalPgError::CommandFailed {
            command,
            status: out.status,
            output: text,
        })
    }
}

/// The command line, for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}
