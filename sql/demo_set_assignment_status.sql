-- pgcast demo: a mechanic's action on an assignment (accept or decline); accepting records
-- the mechanic.
-- $1 = assignment id, $2 = new status, $3 = the mechanic (kept as is when NULL).
UPDATE session_assignments
SET status = $2,
    mechanic_id = COALESCE($3, mechanic_id),
    updated_at = now()
WHERE id = $1
