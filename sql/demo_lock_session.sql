-- pgcast demo: a session's owner and status, locked until the transaction ends.
-- $1 = session id.
SELECT customer_id, status
FROM sessions
WHERE id = $1
FOR UPDATE
