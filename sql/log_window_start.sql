-- pgcast: where a reader starts to receive the newest $1 retained events (a gateway warming its
-- replay window at startup): just below the oldest of them, never below the retention
-- boundary; the boundary itself (the head) when the log is empty.
-- Reads the newest statements of pgcast.committed_statements (primary key, newest first) until
-- they hold $1 events: at most $1 entries. In the statement that holds the oldest of them, the
-- window starts inside its block of positions.
SELECT greatest(coalesce((SELECT min(w.last_position - least(w.rows, $1 - w.newer))
                          FROM (SELECT c.last_position,
                                       c.last_position - c.first_position + 1 AS rows,
                                       coalesce(sum(c.last_position - c.first_position + 1)
                                                    OVER (ORDER BY c.last_position DESC
                                                          ROWS BETWEEN UNBOUNDED PRECEDING
                                                                   AND 1 PRECEDING),
                                                0)::bigint AS newer
                                FROM (SELECT last_position, first_position
                                      FROM pgcast.committed_statements
                                      ORDER BY last_position DESC
                                      LIMIT $1) AS c) AS w
                          WHERE w.newer < $1), 0),
                s.pruned_through)
FROM pgcast.log_state s
