-- pgcast doctor: sessions holding pgcast's commit-order lock (SHARE UPDATE EXCLUSIVE on
-- pgcast.commit_order, or any mode that conflicts with it), longest first. Weaker locks on the
-- table (ACCESS SHARE, ROW SHARE, ROW EXCLUSIVE — e.g. a monitor's SELECT, or a PREPAREd
-- statement of a role with USAGE on schema pgcast) delay nobody and are not listed.
--
-- A committing transaction holds the lock for microseconds; a session that ran
-- SET CONSTRAINTS ALL IMMEDIATE holds it from that statement to its commit and delays every
-- write to session_assignments meanwhile. pg_locks does not say when a lock was granted, so
-- held_s is a lower bound: the longest of the time since the holder's last state change (e.g.
-- since it went idle in transaction) and the time its oldest waiter has waited. Seeing other
-- sessions' state needs pg_read_all_stats (pg_monitor); without it state is 'unknown' and only
-- the waiters count.
-- A prepared transaction (PREPARE TRANSACTION) holds its locks with no session: pid is NULL,
-- and prepared_gid and prepared_s (since it was prepared) name it instead, found through the
-- lock it holds on its own transaction id (same virtualtransaction).
WITH lock_table AS (
    SELECT to_regclass('pgcast.commit_order') AS relid,
           (SELECT oid FROM pg_database WHERE datname = current_database()) AS dbid
), conflicting AS (
    SELECT l.pid, l.granted, l.waitstart, l.virtualtransaction
    FROM pg_locks l, lock_table t
    WHERE l.locktype = 'relation'
      AND l.database = t.dbid
      AND l.relation = t.relid
      AND l.mode IN ('ShareUpdateExclusiveLock', 'ShareLock', 'ShareRowExclusiveLock',
                     'ExclusiveLock', 'AccessExclusiveLock')
), waiters AS (
    SELECT count(*) AS n,
           extract(epoch FROM clock_timestamp() - min(waitstart))::float8 AS longest_s
    FROM conflicting
    WHERE NOT granted
)
SELECT h.pid,
       coalesce(a.application_name, '')                                           AS application,
       coalesce(a.state, 'unknown')                                               AS state,
       greatest(CASE WHEN a.state LIKE 'idle%'
                     THEN extract(epoch FROM clock_timestamp() - a.state_change)::float8 END,
                w.longest_s)                                                      AS held_s,
       w.n                                                                        AS waiting,
       p.gid                                                                      AS prepared_gid,
       extract(epoch FROM clock_timestamp() - p.prepared)::float8                 AS prepared_s
FROM conflicting h
CROSS JOIN waiters w
LEFT JOIN pg_stat_activity a ON a.pid = h.pid
LEFT JOIN pg_locks x
       ON h.pid IS NULL
      AND x.locktype = 'transactionid'
      AND x.virtualtransaction = h.virtualtransaction
LEFT JOIN pg_prepared_xacts p ON p.transaction = x.transactionid
WHERE h.granted
ORDER BY held_s DESC NULLS LAST, h.pid
