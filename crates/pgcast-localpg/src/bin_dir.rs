//! Where the machine's PostgreSQL server binaries are ([`find_bin_dir`]) and which version they
//! are ([`server_version`]).

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::LocalPgError;

/// The environment variable that names the directory holding the PostgreSQL server binaries.
pub const BIN_DIR_ENV: &str = "PGCAST_PG_BIN";

/// Where Debian and Ubuntu install one directory per major version (`15/bin`, `16/bin`, …),
/// keeping them off `PATH`.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// Finds the directory holding `initdb`, `pg_ctl` and `postgres`.
///
/// In order: `$PGCAST_PG_BIN` (an error if it lacks the binaries, so a typo is not silently
/// ignored); `pg_config --bindir` when that directory has the server binaries (it may not, when
/// only the client package is installed); the newest `/usr/lib/postgresql/<version>/bin`; the
/// directory of `initdb` on `PATH`.
pub fn find_bin_dir() -> Result<PathBuf, LocalPgError> {
    if let Some(dir) = env::var_os(BIN_DIR_ENV).filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        return if has_server_binaries(&dir) {
            Ok(dir)
        } else {
            Err(LocalPgError::BinariesNotFound {
                detail: format!(
                    "{BIN_DIR_ENV}={} has no initdb, pg_ctl and postgres",
                    dir.display()
                ),
            })
        };
    }
    pg_config_bin_dir()
        .filter(|dir| has_server_binaries(dir))
        .or_else(newest_debian_bin_dir)
        .or_else(initdb_on_path)
        .ok_or_else(|| LocalPgError::BinariesNotFound {
            detail: format!("no pg_config, no {DEBIAN_ROOT}/*/bin and no initdb on PATH"),
        })
}

/// The first line of `postgres --version`, e.g. `postgres (PostgreSQL) 15.14 (Debian …)`.
pub fn server_version(bin_dir: &Path) -> Result<String, LocalPgError> {
    // `--version` is answered before PostgreSQL's root check, so no `runuser` is needed.
    let mut cmd = Command::new(bin_dir.join("postgres"));
    cmd.arg("--version");
    let out = crate::command::run(cmd)?;
    Ok(out.lines().next().unwrap_or_default().trim().to_owned())
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|bin| dir.join(bin).is_file())
}

fn pg_config_bin_dir() -> Option<PathBuf> {
    let out = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    let dir = dir.trim();
    (out.status.success() && !dir.is_empty()).then(|| PathBuf::from(dir))
}

fn newest_debian_bin_dir() -> Option<PathBuf> {
    let root = Path::new(DEBIAN_ROOT);
    let versions = std::fs::read_dir(root)
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|version| has_server_binaries(&root.join(version).join("bin")));
    newest_version(versions).map(|version| root.join(version).join("bin"))
}

/// Debian's directory of the server binaries of major version `version`, if installed.
pub(crate) fn debian_bin_dir(version: &str) -> Option<PathBuf> {
    version_key(version)?;
    let dir = Path::new(DEBIAN_ROOT).join(version).join("bin");
    has_server_binaries(&dir).then_some(dir)
}

fn initdb_on_path() -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    let initdb = env::split_paths(&path)
        .map(|dir| dir.join("initdb"))
        .find(|initdb| initdb.is_file())?;
    // `/usr/local/bin/initdb` is often a symlink into the real directory, which is the one
    // that also holds `pg_ctl` and `postgres`.
    let dir = initdb.canonicalize().ok()?.parent()?.to_path_buf();
    has_server_binaries(&dir).then_some(dir)
}

/// The highest of the given version directory names, compared numerically part by part so
/// that `9.6` < `15` < `16`; names that are not versions are ignored.
fn newest_version<I: IntoIterator<Item = String>>(names: I) -> Option<String> {
    names
        .into_iter()
        .filter_map(|name| Some((version_key(&name)?, name)))
        .max()
        .map(|(_, name)| name)
}

fn version_key(name: &str) -> Option<Vec<u64>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn newest(names: &[&str]) -> Option<String> {
        newest_version(names.iter().map(|n| n.to_string()))
    }

    #[test]
    fn versions_sort_numerically_not_lexically() {
        assert_eq!(newest(&["9.6", "15"]).as_deref(), Some("15"));
        assert_eq!(newest(&["16", "9.6", "15", "10"]).as_deref(), Some("16"));
        assert_eq!(newest(&["9.5", "9.6"]).as_deref(), Some("9.6"));
    }

    #[test]
    fn non_version_names_are_ignored() {
        assert_eq!(
            newest(&["devel", "15", "15-beta", ""]).as_deref(),
            Some("15")
        );
        assert_eq!(newest(&["common", "lib"]), None);
        assert_eq!(newest(&[]), None);
    }
}
