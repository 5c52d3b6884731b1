//! Helpers shared by the end-to-end tests in the top-level `tests/` directory.

use std::future::Future;
use std::time::Duration;

/// Awaits `fut`, failing with `what` in the message when it takes longer than `limit`.
/// Tests wait on conditions with a deadline instead of sleeping.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}
