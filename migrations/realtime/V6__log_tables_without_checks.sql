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
-- 'delete'), statement_rows is count(*) over a statement's captured rows (at least 1, on its
-- first row only), and pgcast.publish_statement() records the block nextval() .. nextval() +
-- rows - 1 (first_position > 0, first_position <= last_position). The columns' comments keep
-- the rules. Readers do not depend on them either: an event whose op pgcast does not know is
-- counted and logged as undecodable, never delivered.

-- Every CHECK constraint of the two tables, whatever it is called (version 4 created them
-- unnamed). Dropping one takes the table's ACCESS EXCLUSIVE lock for a moment (writers wait
-- for this transaction; `migrate` waits at most its lock_timeout for them).
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
    'insert). Written by pgcast.capture_assignment_changes() only (no CHECK constraint since '
    'version 6: it cost every captured statement; see the migration).';
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
