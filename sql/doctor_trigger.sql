-- pgcast doctor: the trigger that feeds the event log.
-- $1 = table (resolved through search_path, as the migration did), $2 = trigger name.
-- Always one row. enabled is pg_trigger.tgenabled: O = enabled, A = always, R = only when
-- session_replication_role = replica, D = disabled; NULL when the trigger does not exist.
SELECT to_regclass($1) IS NOT NULL                                    AS table_exists,
       t.tgenabled::text                                              AS enabled,
       t.tgfoid = to_regprocedure('pgcast.emit_assignment_event()')   AS calls_pgcast
FROM (SELECT 1) AS one
LEFT JOIN pg_trigger t
       ON t.tgrelid = to_regclass($1) AND t.tgname = $2
