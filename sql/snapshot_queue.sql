-- pgcast snapshot of a mechanic's open queue (topic `queue`).
-- $1 = the mechanic's id, $2 = the mechanic's workshop (NULL for freelancers), $3 = row limit.
-- General assignments (no workshop, no mechanic) are in every mechanic's queue; workshop
-- assignments only in that workshop's; direct offers only in the offered mechanic's.
SELECT to_json(a)::text
FROM session_assignments a
WHERE (a.status = 'queued' AND a.mechanic_id IS NULL
       AND (a.workshop_id IS NULL OR a.workshop_id = $2))
   OR (a.status IN ('queued', 'offered') AND a.mechanic_id = $1)
ORDER BY a.created_at, a.id
LIMIT $3
