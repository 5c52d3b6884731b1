-- pgcast: the highest position a reader can know about, and the retention boundary.
-- head: max position in the log, or the pruning boundary when the log has been emptied.
-- pruned_through: resuming from a position below it may have missed pruned events.
SELECT greatest(coalesce(max(e.position), 0), s.pruned_through) AS head, s.pruned_through
FROM pgcast.log_state s
LEFT JOIN pgcast.assignment_events e ON true
GROUP BY s.pruned_through
