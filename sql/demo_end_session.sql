-- pgcast demo: marks a session ended (its assignments are ended by demo_end_assignments.sql).
-- $1 = session id.
UPDATE sessions
SET status = 'ended'
WHERE id = $1
  AND status <> 'ended'
