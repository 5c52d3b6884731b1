//! The query pool of `serve` bounds every statement (design: no task waits on the database
//! forever), and respects an operator's own bound.

mod common;

use common::migrated_db;
use pgcast::pool;

#[tokio::test]
async fn pooled_statements_have_a_timeout_unless_the_url_sets_one() {
    let (db, _client) = migrated_db().await;
    let show = |config: tokio_postgres::Config| async move {
        let pool = pool(&config.into(), 1).expect("pool");
        let client = pool.get().await.expect("connection");
        let row = client
            .query_one("SHOW statement_timeout", &[])
            .await
            .expect("show");
        row.get::<_, String>(0)
    };
    assert_eq!(show(db.pg_config()).await, "10s");
    let mut own = db.pg_config();
    own.options("-c statement_timeout=2500");
    assert_eq!(show(own).await, "2500ms");
    let mut other = db.pg_config();
    other.options("-c work_mem=8MB");
    assert_eq!(show(other).await, "10s");
}
