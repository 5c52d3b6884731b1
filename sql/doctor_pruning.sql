-- pgcast doctor: when pruning last ran (NULL: never since schema version 2) and how old the
-- oldest retained event is, in seconds (NULL when the log is empty).
SELECT extract(epoch FROM clock_timestamp() - s.last_pruned_at)::float8           AS since_run_s,
       extract(epoch FROM clock_timestamp()
                          - (SELECT min(committed_at) FROM pgcast.assignment_events))::float8
                                                                                   AS oldest_s
FROM pgcast.log_state s
