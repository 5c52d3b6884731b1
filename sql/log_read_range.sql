-- pgcast: read a page of the event log, in position order.
-- $1 = after (exclusive), $2 = through (inclusive), $3 = page size.
-- Served by the primary key index of pgcast.assignment_events.
SELECT position, payload::text
FROM pgcast.assignment_events
WHERE position > $1 AND position <= $2
ORDER BY position
LIMIT $3
