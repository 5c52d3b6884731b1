//! A deadpool connection pool on a test database, as the product's pools are built (fast
//! recycling, no TLS): for tests that hand a `Pool` to the listener or the gateway.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use crate::TestDb;

impl TestDb {
    /// A pool of at most `max_size` connections to this database.
    pub fn pool(&self, max_size: usize) -> Pool {
        let manager = Manager::from_config(
            self.pg_config(),
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(max_size)
            .build()
            .expect("a pool without a runtime setting cannot fail to build")
    }
}
