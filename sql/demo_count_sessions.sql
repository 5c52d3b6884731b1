-- pgcast demo: how many sessions exist (demo data is loaded only into an empty database).
SELECT count(*) FROM sessions
