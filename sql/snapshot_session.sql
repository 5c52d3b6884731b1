-- pgcast snapshot of topic `session:<id>`: one help session's assignments.
-- $1 = session id, $2 = row limit.
SELECT to_json(a)::text
FROM session_assignments a
WHERE a.session_id = $1
ORDER BY a.created_at, a.id
LIMIT $2
