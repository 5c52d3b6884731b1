-- pgcast: the assignments that let a mechanic follow session:<id>. A mechanic may see a session
-- only while one of their assignments in it is accepted or completed (an offer, or a declined
-- offer, is not enough). Read in the same REPEATABLE READ transaction as the log head, so the
-- gateway knows the membership exactly at that position and moves it along with every later
-- event (the change that removes the last of these rows is the last event the mechanic gets).
-- $1 = session id, $2 = mechanic (the token's sub).
SELECT id
FROM session_assignments
WHERE session_id = $1 AND mechanic_id = $2 AND status IN ('accepted', 'completed')
