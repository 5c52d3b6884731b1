-- pgcast demo: a customer's new help session, open.
-- $1 = customer id, $2 = kind ('free' or 'paid'). Returns the session id.
INSERT INTO sessions (customer_id, kind, status)
VALUES ($1, $2, 'open')
RETURNING id
