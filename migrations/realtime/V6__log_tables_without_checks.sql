-- pgcast realtime objects, version 6: the log's two tables lose their CHECK constraints.
--
-- PostgreSQL prepares a table's CHECK constraints again for every statement that writes to it:
-- each constraint's expression is read back from its stored text, planned and compiled. Each
-- captured statement writes pgcast.assignment_changes once, and each published statement
-- writes pgcast.committed_statements once, so on single-row transactions the three checks
-- cost as much as a good part of the trigger's own work: pgbench, 1-row inserts, 8 clients,
-- fsync off, four interleaved 4 s rounds (2026-11-29): 3,373-3,645 commits/s with them,
-- 3,879-4,238 without (a seventh more).
--
-- What they checked is what the only code that writes these tables writes (both tables grant
-- nothing; pgcast's SECURITY DEFINER trigger functions are their only writers): op is a
-- literal in each branch of pgcast.capture_assignment_changes() ('insert', 'update' or
-- 'delete'), or lower(TG_OP) in version 2's pgcast.emit_assignment_event() where an install
-- kept it; statement_rows is count(*) over a statement's captured rows (at least 1, on its
-- first row only; 1 in the row trigger); and pgcast.publish_statement() records the block
-- nextval() .. nextval() + rows - 1 (first_position > 0, first_position <= last_position). The columns' comments keep
-- the rules. Readers do not depend on them either: an event whose op pgcast does not know is
-- counted and logged as undecodable, never delivered.

-- Dropping a constraint takes its table's ACCESS EXCLUSIVE lock. Taken first, in this order,
-- so that nobody can hold one of them while waiting for another: pgcast.log_state, which every
-- capture, every log read and every prune locks before the log's tables (new ones then wait
-- at their first step, holding nothing else); then the tables in the order a writer takes them
-- (its capture writes assignment_changes, its commit committed_statements). In another order a
-- writer between its capture and its commit, or a log read, could deadlock with this
-- migration, and the deadlock could end the application's COMMIT. Each wait is bounded by
-- `migrate`'s lock_timeout; writes wait for this transaction, which holds them briefly.
LOCK TABLE pgcast.log_state IN ACCESS EXCLUSIVE MODE;
LOCK TABLE pgcast.assignment_changes IN ACCESS EXCLUSIVE MODE;
LOCK TABLE pgcast.committed_statements IN ACCESS EXCLUSIVE MODE;

-- Every CHECK constraint of the two tables, whatever it is called (version 4 created them
-- unnamed).
DO $migration$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT con.conrelid::regclass AS tbl, con.conname
        FROM pg_catalog.pg_constraint con
        WHERE con.contype = 'c'
          AND con.conrelid IN ('pgcast.assignment_changes'::regclass,
                               'pgcast.committed_statements'::regclass)
        ORDER BY 1, 2
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', c.tbl, c.conname);
    END LOOP;
END
$migration$;

COMMENT ON COLUMN pgcast.assignment_changes.op IS
    'insert, update or delete: the event''s kind (an UPDATE that moves a row is a delete and an '
    'insert). Written only by pgcast.capture_assignment_changes() and, where an install kept '
    'it, pgcast.emit_assignment_event() (no CHECK constraint since version 6: it cost every '
    'captured statement; see the migration).';
COMMENT ON COLUMN pgcast.assignment_changes.statement_rows IS
    'On the statement''s first event only (else null): how many events the statement wrote, at '
    'least 1. That row queues the deferred pgcast_publish_at_commit trigger, which draws that '
    'many positions.';
COMMENT ON COLUMN pgcast.committed_statements.first_position IS
    'The position of the statement''s first row: 0 < first_position <= last_position, the block '
    'drawn from pgcast.event_position by pgcast.publish_statement() (no CHECK constraint since '
    'version 6: it cost every published statement; see the migration).';

CREATE OR REPLACE FUNCTION pgcast.version() RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT 6';
