-- pgcast demo simulator: a mechanic accepts the oldest queued assignment. Sessions of the
-- customers people play with ($2) are left to them.
-- $1 = mechanic id, $2 = customer ids the simulator must not touch.
UPDATE session_assignments
SET status = 'accepted', mechanic_id = $1, updated_at = now()
WHERE id = (
    SELECT a.id
    FROM session_assignments a
    WHERE a.status = 'queued'
      AND NOT EXISTS (SELECT 1 FROM sessions s
                      WHERE s.id = a.session_id AND s.customer_id = ANY ($2))
    ORDER BY a.created_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
