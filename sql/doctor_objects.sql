-- pgcast doctor: the realtime objects that are missing. No rows = all installed.
-- (The triggers on session_assignments and pgcast.assignment_changes are checked by
-- doctor_trigger.sql.)
SELECT expected.object
FROM (VALUES
    (1, 'schema pgcast',                                     to_regnamespace('pgcast')::oid),
    (2, 'function pgcast.version()',                         to_regprocedure('pgcast.version()')::oid),
    (3, 'sequence pgcast.event_position',                    to_regclass('pgcast.event_position')::oid),
    (4, 'view pgcast.assignment_events',                     to_regclass('pgcast.assignment_events')::oid),
    (5, 'table pgcast.log_state',                            to_regclass('pgcast.log_state')::oid),
    (6, 'function pgcast.emit_assignment_event()',           to_regprocedure('pgcast.emit_assignment_event()')::oid),
    (7, 'function pgcast.prune_events(interval, integer)',   to_regprocedure('pgcast.prune_events(interval, integer)')::oid),
    (8, 'table pgcast.commit_order',                         to_regclass('pgcast.commit_order')::oid),
    (9, 'table pgcast.assignment_changes',                   to_regclass('pgcast.assignment_changes')::oid),
    (10, 'sequence pgcast.capture_statement',                to_regclass('pgcast.capture_statement')::oid),
    (11, 'function pgcast.capture_assignment_changes()',     to_regprocedure('pgcast.capture_assignment_changes()')::oid),
    (12, 'function pgcast.publish_statement()',              to_regprocedure('pgcast.publish_statement()')::oid),
    (13, 'function pgcast.install_capture()',                to_regprocedure('pgcast.install_capture()')::oid),
    (14, 'table pgcast.committed_statements',                to_regclass('pgcast.committed_statements')::oid),
    (15, 'function pgcast.doorbell_queue_limit()',           to_regprocedure('pgcast.doorbell_queue_limit()')::oid),
    (16, 'function pgcast.note_statement_start()',           to_regprocedure('pgcast.note_statement_start()')::oid),
    (17, 'function pgcast.order_nested_statements(bigint)',  to_regprocedure('pgcast.order_nested_statements(bigint)')::oid),
    (18, 'function pgcast.capture_truncate()',               to_regprocedure('pgcast.capture_truncate()')::oid)
) AS expected(n, object, oid)
WHERE expected.oid IS NULL
ORDER BY expected.n
