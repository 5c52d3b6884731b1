-- pgcast demo: serializes one customer's "open a request" actions until the transaction ends,
-- so that two clicks at once cannot both open a session. The two-key form is a lock space of
-- its own: it never meets pgcast's single-key commit lock.
-- $1 = customer id.
SELECT pg_advisory_xact_lock(72770170, hashtext($1::uuid::text))
