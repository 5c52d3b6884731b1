-- pgcast demo simulator: one assignment reaches an end, and its session ends with it.
-- $1 = from status ('accepted' or 'queued'), $2 = to status ('completed', 'cancelled' or
-- 'expired'), $3 = minimum age in seconds, $4 = customer ids the simulator must not touch.
WITH finished AS (
    UPDATE session_assignments
    SET status = $2, updated_at = now()
    WHERE id = (
        SELECT a.id
        FROM session_assignments a
        WHERE a.status = $1
          AND a.updated_at < now() - make_interval(secs => $3)
          AND NOT EXISTS (SELECT 1 FROM sessions s
                          WHERE s.id = a.session_id AND s.customer_id = ANY ($4))
        ORDER BY a.updated_at
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    )
    RETURNING session_id
),
ended AS (
    UPDATE sessions SET status = 'ended'
    WHERE id IN (SELECT session_id FROM finished)
)
SELECT count(*) FROM finished
