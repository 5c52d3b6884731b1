-- pgcast: read a page of the event log, in position order, with the retention boundary read in
-- the same statement (so from the same snapshot): a reader whose range starts below
-- pruned_through may have lost rows to a prune that ran since it looked, and must say so
-- (a client gets `resync`) instead of skipping them silently.
-- Always at least one row; position, committed_at and event are NULL when the range holds no
-- event. $1 = after (exclusive), $2 = through (inclusive), $3 = page size.
-- The statements whose blocks of positions reach past $1 come from the primary key of
-- pgcast.committed_statements, oldest first (each holds at least one event past $1, so $3 of
-- them are enough), and each one's rows past $1 from the primary key of
-- pgcast.assignment_changes, in order. Statement by statement is position order, so the page
-- stops after $3 rows however many rows the statements hold (an incremental sort by ordinal
-- within each statement).
-- Each event comes as its position, its commit time and the stored event (op, row, old,
-- customer_id) as text (a json column since version 7: the text as stored, nothing printed);
-- pgcast decodes the three together. The payload the view
-- pgcast.assignment_events shows is the same three merged into one JSON object; building it
-- here would cost PostgreSQL about as much again as reading the event (a copy of every event
-- per read), for nothing pgcast needs.
SELECT s.pruned_through, e.position, e.committed_at, e.event::text
FROM pgcast.log_state s
LEFT JOIN LATERAL (
    SELECT c.first_position + ch.ordinal - 1 AS position, c.committed_at, ch.event
    FROM (SELECT last_position, first_position, statement, committed_at
          FROM pgcast.committed_statements
          WHERE last_position > $1 AND first_position <= $2
          ORDER BY last_position
          LIMIT $3) AS c
    CROSS JOIN LATERAL (
        SELECT a.ordinal, a.event
        FROM pgcast.assignment_changes a
        WHERE a.statement = c.statement
          AND a.ordinal > $1 - c.first_position + 1
          AND a.ordinal <= $2 - c.first_position + 1
        ORDER BY a.ordinal
        LIMIT $3
    ) AS ch
    ORDER BY c.last_position, ch.ordinal
    LIMIT $3
) AS e ON true
ORDER BY e.position
