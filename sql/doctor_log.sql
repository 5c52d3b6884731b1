-- pgcast doctor: size and extent of the event log. Always one row; the oldest_/newest_ columns
-- are NULL when the log is empty. Ages are in seconds (clock of the database).
SELECT
    (SELECT count(*) FROM pgcast.assignment_events)                          AS rows,
    pg_size_pretty(pg_total_relation_size('pgcast.assignment_events'))       AS size,
    oldest.position                                                          AS oldest_position,
    extract(epoch FROM clock_timestamp() - oldest.committed_at)::float8      AS oldest_age,
    newest.position                                                          AS newest_position,
    extract(epoch FROM clock_timestamp() - newest.committed_at)::float8      AS newest_age,
    s.pruned_through                                                         AS pruned_through
FROM pgcast.log_state s
LEFT JOIN LATERAL (
    SELECT position, committed_at FROM pgcast.assignment_events ORDER BY position LIMIT 1
) AS oldest ON true
LEFT JOIN LATERAL (
    SELECT position, committed_at FROM pgcast.assignment_events ORDER BY position DESC LIMIT 1
) AS newest ON true
