-- pgcast doctor: the triggers that feed the event log (version 9).
-- $1 = table (resolved through search_path, as the first migration did).
-- One row per trigger pgcast installs, in this order: the statement triggers on the table that
-- capture each INSERT, UPDATE and DELETE; the deferred trigger on pgcast.assignment_changes
-- that publishes each captured statement at commit; version 2's row trigger, which is
-- expected only where an upgrade could not replace it (pgcast's role did not own the table);
-- the statement trigger that notes where a statement run inside a trigger starts (version 8);
-- and the trigger that logs a TRUNCATE as a delete of every row (version 9).
-- table_exists: the table of that trigger exists. enabled is pg_trigger.tgenabled: O = enabled,
-- A = always, R = only when session_replication_role = replica, D = disabled; NULL when the
-- trigger does not exist. calls_pgcast: it runs pgcast's function for it.
SELECT e.name,
       e.on_table::text                           AS on_table,
       e.on_table IS NOT NULL                     AS table_exists,
       t.tgenabled::text                          AS enabled,
       t.tgfoid = to_regprocedure(e.function)     AS calls_pgcast
FROM (VALUES
    (1, 'pgcast_capture_insert',        to_regclass($1),                      'pgcast.capture_assignment_changes()'),
    (2, 'pgcast_capture_update',        to_regclass($1),                      'pgcast.capture_assignment_changes()'),
    (3, 'pgcast_capture_delete',        to_regclass($1),                      'pgcast.capture_assignment_changes()'),
    (6, 'pgcast_statement_start',       to_regclass($1),                      'pgcast.note_statement_start()'),
    (7, 'pgcast_capture_truncate',      to_regclass($1),                      'pgcast.capture_truncate()'),
    (4, 'pgcast_publish_at_commit',     to_regclass('pgcast.assignment_changes'), 'pgcast.publish_statement()'),
    (5, 'pgcast_emit_assignment_event', to_regclass($1),                      'pgcast.emit_assignment_event()')
) AS e(n, name, on_table, function)
LEFT JOIN pg_trigger t
       ON t.tgrelid = e.on_table AND t.tgname = e.name
ORDER BY e.n
