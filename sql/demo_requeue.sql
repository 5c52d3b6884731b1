-- pgcast demo: after a mechanic declines an offer, the session's request goes back to the
-- queue it came from (that workshop's, or the general queue) as a new assignment.
-- $1 = the declined assignment's id.
INSERT INTO session_assignments (session_id, workshop_id, status, urgent,
                                 customer_name, vehicle_summary, concern)
SELECT session_id, workshop_id, 'queued', urgent, customer_name, vehicle_summary, concern
FROM session_assignments
WHERE id = $1
