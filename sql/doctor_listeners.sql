-- pgcast doctor: the servers' LISTEN connections on this database (one per `pgcast serve` or
-- `pgcast demo` process; `pgcast tail` names its own `pgcast-tail`), each with how far behind
-- the log it is. $1 = the application_name they set: exactly that while connecting, then
-- '<name>:<position>', the last position read, which the listener sets at every probe (every
-- 0.5 s, on the LISTEN connection itself).
-- position: NULL while connecting. behind_events: positions committed after it (an upper
-- bound: a failed commit leaves a hole). behind_seconds: age of the oldest event it has not
-- read, NULL when it has read everything (both from pgcast.committed_statements, by its key).
WITH listeners AS (
    SELECT a.pid,
           CASE WHEN substr(a.application_name, length($1) + 2) ~ '^[0-9]{1,18}$'
                THEN substr(a.application_name, length($1) + 2)::bigint END AS position
    FROM pg_stat_activity a
    WHERE a.datname = current_database()
      AND a.backend_type = 'client backend'
      AND (a.application_name = $1 OR starts_with(a.application_name, $1 || ':'))
      -- Any role may name its session so; a listener's role reads the log, and the others
      -- would only make this check fail, or look healthy, falsely.
      AND has_table_privilege(a.usesysid, 'pgcast.committed_statements', 'SELECT')
)
SELECT l.pid,
       l.position,
       (SELECT max(c.last_position) FROM pgcast.committed_statements c) - l.position
           AS behind_events,
       (SELECT extract(epoch FROM now() - c.committed_at)::float8
        FROM pgcast.committed_statements c
        WHERE c.last_position > l.position
        ORDER BY c.last_position
        LIMIT 1) AS behind_seconds
FROM listeners l
ORDER BY l.pid
