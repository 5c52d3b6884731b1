-- pgcast: read a page of the event log, in position order, with the retention boundary read in
-- the same statement (so from the same snapshot): a reader whose range starts below
-- pruned_through may have lost rows to a prune that ran since it looked, and must say so
-- (a client gets `resync`) instead of skipping them silently.
-- Always at least one row; position and payload are NULL when the range holds no event.
-- $1 = after (exclusive), $2 = through (inclusive), $3 = page size.
-- Served by the primary key index of pgcast.assignment_events.
SELECT s.pruned_through, e.position, e.payload::text
FROM pgcast.log_state s
LEFT JOIN LATERAL (
    SELECT position, payload
    FROM pgcast.assignment_events
    WHERE position > $1 AND position <= $2
    ORDER BY position
    LIMIT $3
) AS e ON true
ORDER BY e.position
