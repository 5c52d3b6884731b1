-- pgcast: may this mechanic subscribe to session:<id>? Only a mechanic assigned to it: one who
-- accepted (or completed) one of its assignments. An offer alone, or a declined offer, is not
-- enough to follow the customer's session.
-- $1 = session id, $2 = mechanic (the token's sub).
SELECT EXISTS (SELECT 1 FROM session_assignments
               WHERE session_id = $1 AND mechanic_id = $2 AND status IN ('accepted', 'completed'))
