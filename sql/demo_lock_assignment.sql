-- pgcast demo: an assignment as a mechanic's action must judge it, locked until the
-- transaction ends: a second mechanic accepting at the same moment waits here, then sees it
-- taken.
-- $1 = assignment id.
SELECT session_id, status, mechanic_id, workshop_id
FROM session_assignments
WHERE id = $1
FOR UPDATE
