-- pgcast snapshot of topic `assignments` (services): every open assignment (queued, offered,
-- accepted); finished ones are history, available from the log with `since`.
-- $1 = row limit.
SELECT to_json(a)::text
FROM session_assignments a
WHERE a.status IN ('queued', 'offered', 'accepted')
ORDER BY a.created_at, a.id
LIMIT $1
