-- pgcast: where a reader starts to receive the newest $1 retained events (a gateway warming its
-- replay window at startup): just below the oldest of them, never below the retention
-- boundary; the boundary itself (the head) when the log is empty.
-- Reads $1 entries of the primary key index of pgcast.assignment_events, newest first.
SELECT greatest(coalesce((SELECT min(newest.position) - 1
                          FROM (SELECT position
                                FROM pgcast.assignment_events
                                ORDER BY position DESC
                                LIMIT $1) AS newest), 0),
                s.pruned_through)
FROM pgcast.log_state s
