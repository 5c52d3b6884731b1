//! Runs a PostgreSQL cluster from the binaries already installed on the machine: no download,
//! no container. `pgcast demo` keeps one under a directory and reuses it on the next run; the
//! test kit (`pgcast-testkit`) makes throwaway ones.
//!
//! ```text
//! find_bin_dir()  PGCAST_PG_BIN │ pg_config --bindir │ /usr/lib/postgresql/<newest>/bin │ PATH
//!        │
//!        ▼
//! LocalPg::open_or_init(dir, port)        initdb if dir has no cluster yet
//! LocalPg::init_from_template(t, dir, port) copy of ensure_template(cache) (fast)
//!        │
//!        ▼
//! start() ── pg_ctl start -w ──▶ postgres on 127.0.0.1:port, log in dir ──▶ url("db")
//! stop(Fast | Immediate)
//! ```
//!
//! PostgreSQL refuses to run as root. When this process is root, every PostgreSQL binary runs
//! as the `postgres` OS user (`runuser -u postgres --`) and the data directory is given to that
//! user; nothing changes for a regular user.
//!
//! The server trusts every local connection to the `postgres` superuser and listens on
//! 127.0.0.1 only: it is for development, demos and tests on one machine.

mod bin_dir;
mod cluster;
mod command;
mod error;
mod template;

pub use bin_dir::{find_bin_dir, server_version, BIN_DIR_ENV};
pub use cluster::{free_port, LocalPg, Settings, StopMode};
pub use command::effective_uid;
pub use error::LocalPgError;
pub use template::ensure_template;
