-- pgcast doctor: rings the LISTEN probe's private channel ($1) from the query connection; the
-- listen connection must hear it. Committed at once (autocommit), so it is delivered now.
SELECT pg_notify($1, '')
