//! The session defaults of pgcast's query pool: a statement timeout, and no JIT compilation
//! (the log read's generic plan would otherwise compile on every read of a large log); an
//! operator's own setting of either in the connection string wins.

use pgcast_listener::pool;
use pgcast_testkit::PgCluster;
use tokio_postgres::NoTls;

async fn settings(config: tokio_postgres::Config) -> (String, String) {
    let pool = pool(config, NoTls, 1).expect("pool");
    let client = pool.get().await.expect("a pooled connection");
    let row = client
        .query_one(
            "SELECT current_setting('statement_timeout'), current_setting('jit')",
            &[],
        )
        .await
        .expect("settings");
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn pooled_connections_bound_statements_and_never_jit_unless_told_otherwise() {
    let db = PgCluster::shared()
        .unwrap()
        .create_database()
        .await
        .unwrap();
    let admin = db.connect().await.unwrap();
    // The cluster's own default, so that "off" below is the pool's doing.
    admin
        .batch_execute(&format!("ALTER DATABASE {} SET jit = on", db.name()))
        .await
        .unwrap();

    assert_eq!(
        settings(db.pg_config()).await,
        ("10s".to_owned(), "off".to_owned())
    );

    let mut operator = db.pg_config();
    operator.options("-c jit=on -c statement_timeout=3s");
    assert_eq!(settings(operator).await, ("3s".to_owned(), "on".to_owned()));

    let mut partly = db.pg_config();
    partly.options("-c statement_timeout=2s");
    assert_eq!(settings(partly).await, ("2s".to_owned(), "off".to_owned()));
}
