//! The query pools of the product (the gateway's reads, the listener's log reads, pruning and
//! the database gauges): how long a connection, a wait for one and a statement may take.
//! The caller brings the configuration and the TLS connector (the binary builds both from the
//! database URL).

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::Socket;

use crate::ListenerError;

/// Used when the configuration sets no `connect_timeout`: a connection to an unreachable host
/// fails instead of hanging.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a pooled connection.
const POOL_WAIT: Duration = Duration::from_secs(5);
/// Longest statement on a pooled connection (snapshots, replay pages, log reads, pruning,
/// metrics): a stuck query fails instead of holding a connection, and the task waiting on it,
/// indefinitely. Set as a session default, so it covers every statement the pool runs.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Session defaults of every pooled connection, each added to the `options` of the connection
/// string unless the operator set that parameter there:
/// - `statement_timeout` ([`STATEMENT_TIMEOUT`]);
/// - `jit=off`: the pool runs short, prepared, index-driven statements. After five executions
///   PostgreSQL may switch a prepared statement to its generic plan, whose cost it estimates
///   without the parameters (a `LIMIT $3` counts as a tenth of the table); for the log read
///   (a join of the log's two tables) that estimate grows with the log and passes
///   `jit_above_cost` at about ten million retained statements (a day at ~100 commits/s),
///   and compiling the plan then takes tens of milliseconds of every read that itself takes a
///   few.
fn session_defaults() -> [(&'static str, String); 2] {
    [
        (
            "statement_timeout",
            STATEMENT_TIMEOUT.as_millis().to_string(),
        ),
        ("jit", "off".to_owned()),
    ]
}

/// A query pool of at most `max_size` connections made with `pg` through `tls`. Every
/// statement is bounded by a 10 s statement timeout unless the configuration's `options` set
/// their own `statement_timeout`, and runs without JIT compilation unless they set `jit` (see
/// `session_defaults` in this module); a connection attempt by [`CONNECT_TIMEOUT`] unless it sets
/// `connect_timeout`; a wait for a free connection by 5 s.
pub fn pool<T>(
    mut pg: tokio_postgres::Config,
    tls: T,
    max_size: usize,
) -> Result<Pool, ListenerError>
where
    T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
    T::Stream: Sync + Send,
    T::TlsConnect: Sync + Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(CONNECT_TIMEOUT);
    }
    let mut options = pg.get_options().unwrap_or_default().to_owned();
    for (name, value) in session_defaults() {
        if !options.contains(name) {
            if !options.is_empty() {
                options.push(' ');
            }
            options.push_str(&format!("-c {name}={value}"));
        }
    }
    pg.options(&options);
    let manager = Manager::from_config(
        pg,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    // A query never waits forever for a connection: under overload it fails (the gateway
    // answers `unavailable`, the listener reconnects) instead of parking its task.
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT))
        .build()
        .map_err(ListenerError::PoolBuild)
}
