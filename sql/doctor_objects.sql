-- pgcast doctor: the realtime objects that are missing. No rows = all installed.
-- (The trigger on session_assignments is checked by doctor_trigger.sql.)
SELECT expected.object
FROM (VALUES
    (1, 'schema pgcast',                                     to_regnamespace('pgcast')::oid),
    (2, 'function pgcast.version()',                         to_regprocedure('pgcast.version()')::oid),
    (3, 'sequence pgcast.event_position',                    to_regclass('pgcast.event_position')::oid),
    (4, 'table pgcast.assignment_events',                    to_regclass('pgcast.assignment_events')::oid),
    (5, 'table pgcast.log_state',                            to_regclass('pgcast.log_state')::oid),
    (6, 'function pgcast.emit_assignment_event()',           to_regprocedure('pgcast.emit_assignment_event()')::oid),
    (7, 'function pgcast.prune_events(interval, integer)',   to_regprocedure('pgcast.prune_events(interval, integer)')::oid),
    (8, 'table pgcast.commit_order',                         to_regclass('pgcast.commit_order')::oid)
) AS expected(n, object, oid)
WHERE expected.oid IS NULL
ORDER BY expected.n
