-- pgcast: may this customer subscribe to session:<id>? Only the session's own customer.
-- $1 = session id, $2 = customer (the token's sub).
SELECT EXISTS (SELECT 1 FROM sessions WHERE id = $1 AND customer_id = $2)
