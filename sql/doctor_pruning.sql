-- pgcast doctor: is retention enforced? Always one row; times in seconds (database clock).
--   since_run_s  time since pgcast.prune_events() last ran (NULL: never, since schema version 2)
--   retention_s  the retention that run was given (NULL: never ran)
--   oldest_s     age of the oldest retained event (NULL: the log is empty; the oldest committed
--                statement, by primary key)
-- Events are overdue when oldest_s > retention_s: the next run would delete them.
SELECT extract(epoch FROM clock_timestamp() - s.last_pruned_at)::float8            AS since_run_s,
       extract(epoch FROM s.prune_retention)::float8                               AS retention_s,
       extract(epoch FROM clock_timestamp()
                          - (SELECT c.committed_at FROM pgcast.committed_statements c
                             ORDER BY c.last_position LIMIT 1))::float8
                                                                                    AS oldest_s
FROM pgcast.log_state s
