-- pgcast demo simulator: how many assignments are open (it stops queueing at a ceiling).
SELECT count(*) FROM session_assignments WHERE status IN ('queued', 'offered')
