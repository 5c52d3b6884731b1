-- pgcast: the highest position a reader can know about, and the retention boundary.
-- head: the last position of the newest committed statement (an index lookup), or the pruning
-- boundary when the log has been emptied. pruned_through: resuming from a position below it may
-- have missed pruned events.
SELECT greatest(coalesce((SELECT max(last_position) FROM pgcast.committed_statements), 0),
                s.pruned_through) AS head,
       s.pruned_through
FROM pgcast.log_state s
