-- pgcast snapshot of topic `workshop:<id>`: one workshop's assignments that are still open (queued, offered,
-- accepted) — what a page shows. The topic's events carry every status; finished rows are
-- history, available from the log with `since`, and would make this snapshot grow forever.
-- $1 = workshop id, $2 = row limit.
SELECT to_json(a)::text
FROM session_assignments a
WHERE a.workshop_id = $1
  AND a.status IN ('queued', 'offered', 'accepted')
ORDER BY a.created_at, a.id
LIMIT $2
