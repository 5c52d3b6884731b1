-- pgcast doctor: pgcast LISTEN connections on this database (each gateway replica and each
-- `pgcast tail` holds one). $1 = the application_name they set.
SELECT count(*)
FROM pg_stat_activity
WHERE application_name = $1
  AND datname = current_database()
