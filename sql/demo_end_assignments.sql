-- pgcast demo: ends every open assignment of a session: the one a mechanic accepted is
-- completed, those still waiting (queued or offered) are cancelled. One event per row.
-- $1 = session id.
UPDATE session_assignments
SET status = CASE WHEN status = 'accepted' THEN 'completed' ELSE 'cancelled' END,
    updated_at = now()
WHERE session_id = $1
  AND status IN ('queued', 'offered', 'accepted')
