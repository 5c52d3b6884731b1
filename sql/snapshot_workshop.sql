-- pgcast snapshot of topic `workshop:<id>`: one workshop's assignments, any status.
-- $1 = workshop id, $2 = row limit.
SELECT to_jsonb(a)::text
FROM session_assignments a
WHERE a.workshop_id = $1
ORDER BY a.created_at, a.id
LIMIT $2
