-- pgcast doctor: size and extent of the event log. Always one row; the oldest_/newest_ columns
-- are NULL when the log is empty. Ages are in seconds (clock of the database).
-- rows counts events (the sum of the committed statements' blocks, holes not counted); size is
-- the disk space of both tables of the log and their indexes.
SELECT
    (SELECT coalesce(sum(last_position - first_position + 1), 0)::bigint
     FROM pgcast.committed_statements)                                       AS rows,
    pg_size_pretty(pg_total_relation_size('pgcast.assignment_changes')
                   + pg_total_relation_size('pgcast.committed_statements'))  AS size,
    oldest.first_position                                                    AS oldest_position,
    extract(epoch FROM clock_timestamp() - oldest.committed_at)::float8      AS oldest_age,
    newest.last_position                                                     AS newest_position,
    extract(epoch FROM clock_timestamp() - newest.committed_at)::float8      AS newest_age,
    s.pruned_through                                                         AS pruned_through
FROM pgcast.log_state s
LEFT JOIN LATERAL (
    SELECT first_position, committed_at FROM pgcast.committed_statements
    ORDER BY last_position LIMIT 1
) AS oldest ON true
LEFT JOIN LATERAL (
    SELECT last_position, committed_at FROM pgcast.committed_statements
    ORDER BY last_position DESC LIMIT 1
) AS newest ON true
