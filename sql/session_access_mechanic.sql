-- pgcast: may this mechanic subscribe to session:<id>? Only a mechanic assigned to it.
-- $1 = session id, $2 = mechanic (the token's sub).
SELECT EXISTS (SELECT 1 FROM session_assignments WHERE session_id = $1 AND mechanic_id = $2)
