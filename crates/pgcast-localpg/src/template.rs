//! A cluster template per PostgreSQL version ([`ensure_template`]): `initdb` once per machine,
//! then every test cluster is a fast copy of it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{find_bin_dir, server_version, LocalPg, LocalPgError};

/// Returns an initialised, never-started cluster under `cache_dir` for this machine's
/// PostgreSQL version, running `initdb` only if no process has made one yet.
///
/// `initdb` takes about a second; copying its result with
/// [`LocalPg::init_from_template`] takes a few milliseconds. Several processes may call this at
/// once (one per test binary): each builds in a private staging directory and renames it into
/// place, which is atomic, so nobody ever sees a half-made template. The loser of the race
/// discards its copy.
pub fn ensure_template(cache_dir: &Path) -> Result<PathBuf, LocalPgError> {
    let version = server_version(&find_bin_dir()?)?;
    let template = cache_dir.join(format!("template-{}", file_name_part(&version)));
    if is_cluster(&template) {
        return Ok(template);
    }

    fs::create_dir_all(cache_dir).map_err(|source| io(cache_dir, "create directory", source))?;
    // The `postgres` user (when we are root) must be able to enter the cache to run `initdb`.
    fs::set_permissions(cache_dir, fs::Permissions::from_mode(0o755))
        .map_err(|source| io(cache_dir, "set permissions of", source))?;

    let staging = cache_dir.join(format!(".staging-{}-{}", std::process::id(), nanos()));
    let result = LocalPg::open_or_init(&staging, 0).and_then(|_| {
        match fs::rename(&staging, &template) {
            Ok(()) => Ok(()),
            // Another process finished first: its template is as good as ours.
            Err(_) if is_cluster(&template) => Ok(()),
            Err(source) => Err(io(&template, "rename a new template to", source)),
        }
    });
    // Already gone after a successful rename; a leftover staging directory is harmless.
    let _ = fs::remove_dir_all(&staging);
    result.map(|()| template)
}

fn is_cluster(dir: &Path) -> bool {
    dir.join("PG_VERSION").is_file()
}

/// `postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)` becomes
/// `PostgreSQL-15.14-Debian-15.14-0-deb12u1`, so that each installed build gets its own
/// template.
fn file_name_part(version: &str) -> String {
    let version = version.strip_prefix("postgres ").unwrap_or(version);
    version
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn io(path: &Path, action: &'static str, source: std::io::Error) -> LocalPgError {
    LocalPgError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_becomes_a_safe_file_name() {
        assert_eq!(
            file_name_part("postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)"),
            "PostgreSQL-15.14-Debian-15.14-0-deb12u1"
        );
        assert_eq!(
            file_name_part("postgres (PostgreSQL) 16.2"),
            "PostgreSQL-16.2"
        );
    }
}
