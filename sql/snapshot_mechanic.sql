-- pgcast snapshot of topic `mechanic:<id>`: everything assigned to one mechanic, any status.
-- $1 = mechanic id, $2 = row limit.
SELECT to_jsonb(a)::text
FROM session_assignments a
WHERE a.mechanic_id = $1
ORDER BY a.created_at, a.id
LIMIT $2
