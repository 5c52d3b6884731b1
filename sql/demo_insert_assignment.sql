-- pgcast demo: an assignment of a session, written the way any other service would.
-- $1 = session id, $2 = mechanic (a direct offer) or NULL, $3 = workshop or NULL (general
-- queue), $4 = status ('queued' or 'offered'), $5 = urgent, $6 = customer name,
-- $7 = vehicle, $8 = concern.
INSERT INTO session_assignments (session_id, mechanic_id, workshop_id, status, urgent,
                                 customer_name, vehicle_summary, concern)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
