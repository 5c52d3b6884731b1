-- pgcast doctor: sessions holding pgcast's commit-order lock (pgcast.commit_order), longest
-- first. A committing transaction holds it for microseconds; a session that ran
-- SET CONSTRAINTS ALL IMMEDIATE holds it from that statement to its commit and delays every
-- write to session_assignments meanwhile. held_s counts from the session's last state change
-- (e.g. since it went idle in transaction). Seeing other sessions' state needs pg_monitor.
SELECT l.pid,
       coalesce(a.application_name, '')                                          AS application,
       coalesce(a.state, 'unknown')                                              AS state,
       extract(epoch FROM clock_timestamp()
                          - coalesce(a.state_change, a.xact_start))::float8      AS held_s,
       (SELECT count(*) FROM pg_locks w
        WHERE w.locktype = 'relation' AND w.relation = l.relation AND NOT w.granted) AS waiting
FROM pg_locks l
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'relation'
  AND l.relation = to_regclass('pgcast.commit_order')
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.granted
ORDER BY held_s DESC NULLS LAST
