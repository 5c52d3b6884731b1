-- pgcast snapshot of topic `customer:<id>`: the open assignments (queued, offered, accepted) of
-- every session of one customer — what an "active session" banner shows. Finished ones are
-- history, available from the log with `since`.
-- $1 = customer id, $2 = row limit.
SELECT to_json(a)::text
FROM session_assignments a
JOIN sessions s ON s.id = a.session_id
WHERE s.customer_id = $1
  AND a.status IN ('queued', 'offered', 'accepted')
ORDER BY a.created_at, a.id
LIMIT $2
