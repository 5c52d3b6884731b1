-- pgcast realtime objects, version 4: the log is written when a change is captured; commit only
-- numbers it.
--
-- Version 3 staged each captured row in an unlogged table and, at commit, under the
-- commit-order lock, deleted it there and inserted it into the log: every row was written
-- twice, deleted once, and moved while every other writer's commit waited. Version 4 writes
-- each captured row once, to its final place, while the statement runs (concurrently with
-- other writers), and publishes at commit one row per statement:
--
-- * pgcast.assignment_changes: one row per changed row, written by the statement triggers
--   (pgcast_capture_insert, _update, _delete) with one INSERT ... SELECT from the statement's
--   transition tables: the statement (a number from pgcast.capture_statement, unique across
--   sessions), the row's ordinal within the statement and the event's content.
-- * pgcast.committed_statements: one row per captured statement, written at commit by the
--   deferred trigger pgcast_publish_at_commit (queued by the statement's first row) under the
--   commit-order lock: the block of positions of the statement's rows (drawn from
--   pgcast.event_position) and the commit time. The lock is held for one small insert per
--   statement, however many rows the statement changed.
-- * pgcast.assignment_events is now a view joining the two: position = first_position +
--   ordinal - 1, and the payload readers have always read. Its rows are exactly those of the
--   table it replaces; the table's rows are moved into the two tables here.
--
-- Positions still follow commit order (drawn under the same SHARE UPDATE EXCLUSIVE lock, held
-- to the end of the transaction), are contiguous within a statement, and follow the order of
-- the writes within a transaction (its statements publish in the order they ran). A statement
-- or savepoint rolled back takes its captured rows and its queued publish with it.

-- No writer may be between its first capture and its commit while the capture changes: its
-- version 3 staged rows would be published into a table that no longer exists. SHARE waits for
-- every transaction that has written to the table and holds new writes until this migration
-- commits; they then run version 4's capture. Needs UPDATE, DELETE or TRUNCATE on the table
-- (its owner has them); without them, only transactions that staged rows are waited for.
DO $migration$
DECLARE
    source regclass := (SELECT source_table FROM pgcast.log_state);
BEGIN
    IF has_table_privilege(source, 'UPDATE') OR has_table_privilege(source, 'DELETE')
       OR has_table_privilege(source, 'TRUNCATE') THEN
        EXECUTE format('LOCK TABLE %s IN SHARE MODE', source);
    END IF;
    LOCK TABLE pgcast.pending_events IN ACCESS EXCLUSIVE MODE;
END
$migration$;

CREATE TABLE pgcast.assignment_changes (
    statement      bigint NOT NULL,
    ordinal        bigint NOT NULL,
    statement_rows bigint CHECK (statement_rows > 0),
    op             text   NOT NULL CHECK (op IN ('insert', 'update', 'delete')),
    assignment_id  uuid   NOT NULL,
    event          jsonb  NOT NULL,
    PRIMARY KEY (statement, ordinal)
);
COMMENT ON TABLE pgcast.assignment_changes IS
    'The content of the event log: one row per row of session_assignments a statement changed, '
    'written by pgcast.capture_assignment_changes() when the statement ran. A row is an event '
    'once its statement is in pgcast.committed_statements (at commit); read them together '
    'through the view pgcast.assignment_events. Pruned with its statement by '
    'pgcast.prune_events(). Grant nothing on it: a role that could write here could forge events.';
COMMENT ON COLUMN pgcast.assignment_changes.statement IS
    'The capturing statement (pgcast.capture_statement, unique across sessions); joins '
    'pgcast.committed_statements.statement.';
COMMENT ON COLUMN pgcast.assignment_changes.ordinal IS
    'Order of the row within its statement, from 1: its position is the statement''s '
    'first_position + ordinal - 1.';
COMMENT ON COLUMN pgcast.assignment_changes.statement_rows IS
    'On the statement''s first row only (else null): how many rows the statement changed. That '
    'row queues the deferred pgcast_publish_at_commit trigger, which draws that many positions.';
COMMENT ON COLUMN pgcast.assignment_changes.event IS
    'The event''s payload but for position and committed_at, which only commit knows: op, row '
    '(the row after the change; for a delete, before), old (status, mechanic_id, workshop_id '
    'before an update or delete, else null) and customer_id (the customer of the row''s session '
    'when the change was written).';
REVOKE ALL ON pgcast.assignment_changes FROM PUBLIC;

CREATE TABLE pgcast.committed_statements (
    last_position  bigint      PRIMARY KEY,
    first_position bigint      NOT NULL,
    statement      bigint      NOT NULL,
    committed_at   timestamptz NOT NULL,
    CHECK (first_position > 0 AND first_position <= last_position)
);
COMMENT ON TABLE pgcast.committed_statements IS
    'One row per committed statement that changed session_assignments, in commit order: the '
    'positions of its rows (first_position .. last_position, in the order of '
    'pgcast.assignment_changes.ordinal) and when it was published. Written at commit by '
    'pgcast.publish_statement() under the pgcast.commit_order lock. Readers look up the '
    'statements whose last_position is past theirs (primary key), then their rows. Pruned in '
    'position order by pgcast.prune_events(). Grant nothing on it.';
COMMENT ON COLUMN pgcast.committed_statements.last_position IS
    'The position of the statement''s last row. Strictly increasing in commit order: once '
    'position P is visible, no lower position can commit later.';
COMMENT ON COLUMN pgcast.committed_statements.committed_at IS
    'clock_timestamp() when the statement was published, as its transaction reached commit; '
    'used for retention and end-to-end latency.';
REVOKE ALL ON pgcast.committed_statements FROM PUBLIC;

-- The rows of the version 1-3 log table, each its own statement of one row.
WITH moved AS (
    SELECT nextval('pgcast.capture_statement') AS statement, e.*
    FROM pgcast.assignment_events e
), changes AS (
    INSERT INTO pgcast.assignment_changes (statement, ordinal, op, assignment_id, event)
    SELECT m.statement, 1, m.op, m.assignment_id, m.payload - 'position' - 'committed_at'
    FROM moved m
)
INSERT INTO pgcast.committed_statements (last_position, first_position, statement, committed_at)
SELECT m.position, m.position, m.statement, m.committed_at
FROM moved m;

-- Version 3's staging and publishing (the capture function is redefined below, version 2's row
-- trigger function too: both keep their names, so the triggers on session_assignments that call
-- them stay in place, whoever owns that table).
DROP TABLE pgcast.pending_events;
DROP FUNCTION pgcast.publish_pending_events();
DROP TABLE pgcast.assignment_events;

CREATE VIEW pgcast.assignment_events AS
SELECT c.first_position + ch.ordinal - 1 AS position,
       ch.assignment_id,
       ch.op,
       c.committed_at,
       jsonb_build_object('position', c.first_position + ch.ordinal - 1,
                          'committed_at', c.committed_at) || ch.event AS payload
FROM pgcast.committed_statements c
JOIN pgcast.assignment_changes ch ON ch.statement = c.statement;
COMMENT ON VIEW pgcast.assignment_events IS
    'The durable, commit-ordered event log, as versions 1-3 stored it (one row per event: '
    'position, assignment_id, op, committed_at, payload), and the only source of what clients '
    'receive. Since version 4 a join of pgcast.committed_statements and '
    'pgcast.assignment_changes; pgcast''s own reads use those tables directly (sql/log_*.sql) so '
    'that a range of positions is read through their primary keys. Grant nothing on it.';
COMMENT ON COLUMN pgcast.assignment_events.position IS
    'Strictly increasing in commit order: once position P is visible, no lower position can '
    'commit later. Contiguous within a statement; a transaction that fails after drawing '
    'leaves a hole, which readers tolerate.';
COMMENT ON COLUMN pgcast.assignment_events.payload IS
    'The event: position, op, committed_at, row (the row after the change; for a delete the row '
    'before), old (status, mechanic_id, workshop_id before an update or delete, else null) and '
    'customer_id (the customer of the row''s session when the change was written, or null).';
REVOKE ALL ON pgcast.assignment_events FROM PUBLIC;

-- Publish, per statement, at commit.
CREATE FUNCTION pgcast.publish_statement() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    base bigint;
BEGIN
    IF TG_RELID <> 'pgcast.assignment_changes'::regclass THEN
        RAISE EXCEPTION 'pgcast.publish_statement() runs only on pgcast.assignment_changes';
    END IF;
    -- A doorbell: no row data (listeners read the log). Identical payloads collapse, so a
    -- transaction rings once however many statements it runs.
    PERFORM pg_notify('pgcast_assignments', '');

    -- Commit order. This runs while the transaction commits; the table lock is held until the
    -- transaction ends, so the next committer draws its positions only after this one is
    -- visible. Only pgcast's owner can take it. SHARE UPDATE EXCLUSIVE conflicts with itself
    -- but not with the ACCESS SHARE, ROW SHARE and ROW EXCLUSIVE locks that any role with
    -- USAGE on schema pgcast can take and keep (parse-time locks of a PREPAREd statement).
    -- Everything from here to the end of the transaction is serialized across writers: the
    -- events were written when the changes were captured, only a block of positions and the
    -- commit time are added here, in one row.
    LOCK TABLE pgcast.commit_order IN SHARE UPDATE EXCLUSIVE MODE;
    -- Nobody else draws while the lock is held, so base .. base + rows - 1 are this statement's.
    base := nextval('pgcast.event_position');
    IF NEW.statement_rows > 1 THEN
        PERFORM setval('pgcast.event_position', base + NEW.statement_rows - 1);
    END IF;
    INSERT INTO pgcast.committed_statements (last_position, first_position, statement, committed_at)
    VALUES (base + NEW.statement_rows - 1, base, NEW.statement, clock_timestamp());
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION pgcast.publish_statement() IS
    'Deferred constraint trigger of pgcast.assignment_changes (pgcast_publish_at_commit), fired '
    'at commit once per captured statement (by its first row): rings channel pgcast_assignments '
    'with an empty payload (a doorbell), takes the pgcast.commit_order lock, reserves one block '
    'of positions from pgcast.event_position for the statement''s rows and records it in '
    'pgcast.committed_statements. SECURITY DEFINER; EXECUTE is not granted to anyone.';
REVOKE EXECUTE ON FUNCTION pgcast.publish_statement() FROM PUBLIC;

CREATE CONSTRAINT TRIGGER pgcast_publish_at_commit
    AFTER INSERT ON pgcast.assignment_changes
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.statement_rows IS NOT NULL)
    EXECUTE FUNCTION pgcast.publish_statement();
COMMENT ON TRIGGER pgcast_publish_at_commit ON pgcast.assignment_changes IS
    'pgcast: publishes each captured statement at commit (only its first row is flagged), in '
    'commit order. SET CONSTRAINTS ALL IMMEDIATE makes it fire at each statement and hold the '
    'commit-order lock until the transaction ends. Disabling it leaves changes captured and '
    'unpublished; `pgcast doctor` reports that.';

-- Capture, per statement: the same function (and so the same triggers), now writing the log's
-- content directly. The customer is read when the change is captured, outside the lock; the
-- sessions table is the one version 3 recorded, read back from its function's source.
DO $migration$
DECLARE
    customer_expr  text := 'NULL::uuid';
    v3_source      text;
    sessions_table text;
BEGIN
    SELECT p.prosrc INTO v3_source FROM pg_proc p
    WHERE p.oid = 'pgcast.capture_assignment_changes()'::regprocedure;
    sessions_table := substring(v3_source FROM
        '\(SELECT c\.customer_id FROM (.+?) c WHERE c\.id OPERATOR');
    IF sessions_table IS NULL OR to_regclass(sessions_table) IS NULL THEN
        RAISE WARNING 'pgcast: version 3 recorded no sessions table; events will not name their '
            'session''s customer and customer:<id> topics will stay empty';
    ELSE
        -- A sub-select per row (an index probe), never a join the planner could turn into a
        -- scan of all sessions for one row.
        customer_expr := format(
            '(SELECT c.customer_id FROM %s c WHERE c.id OPERATOR(pg_catalog.=) n.session_id)',
            sessions_table);
    END IF;
    EXECUTE format($function$
CREATE OR REPLACE FUNCTION pgcast.capture_assignment_changes() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    -- One INSERT ... SELECT per statement. `s` yields one row only for the table pgcast was
    -- installed on, and draws the statement's number once. The first row carries the number of
    -- rows, which queues the statement's publishing at commit.
    IF TG_OP = 'INSERT' THEN
        WITH s AS MATERIALIZED (
            SELECT nextval('pgcast.capture_statement') AS statement
            FROM pgcast.log_state st WHERE st.source_table = TG_RELID
        )
        INSERT INTO pgcast.assignment_changes
            (statement, ordinal, statement_rows, op, assignment_id, event)
        SELECT s.statement, n.ordinal, CASE WHEN n.ordinal = 1 THEN n.rows END, 'insert', n.id,
               jsonb_build_object('op', 'insert', 'row', n.row_data, 'old', NULL,
                                  'customer_id', %1$s)
        FROM s, (SELECT row_number() OVER () AS ordinal, count(*) OVER () AS rows,
                        r.id, r.session_id, to_jsonb(r) AS row_data
                 FROM new_rows r) n;
    ELSIF TG_OP = 'UPDATE' THEN
        WITH s AS MATERIALIZED (
            SELECT nextval('pgcast.capture_statement') AS statement
            FROM pgcast.log_state st WHERE st.source_table = TG_RELID
        )
        INSERT INTO pgcast.assignment_changes
            (statement, ordinal, statement_rows, op, assignment_id, event)
        SELECT s.statement, n.ordinal, CASE WHEN n.ordinal = 1 THEN n.rows END, 'update', n.id,
               jsonb_build_object('op', 'update', 'row', n.row_data, 'old', o.old_data,
                                  'customer_id', %1$s)
        FROM s, (SELECT row_number() OVER () AS ordinal, count(*) OVER () AS rows,
                        r.id, r.session_id, to_jsonb(r) AS row_data
                 FROM new_rows r) n
        JOIN (SELECT row_number() OVER () AS ordinal,
                     jsonb_build_object('status', r.status, 'mechanic_id', r.mechanic_id,
                                        'workshop_id', r.workshop_id) AS old_data
              FROM old_rows r) o ON o.ordinal = n.ordinal;
    ELSE
        WITH s AS MATERIALIZED (
            SELECT nextval('pgcast.capture_statement') AS statement
            FROM pgcast.log_state st WHERE st.source_table = TG_RELID
        )
        INSERT INTO pgcast.assignment_changes
            (statement, ordinal, statement_rows, op, assignment_id, event)
        SELECT s.statement, n.ordinal, CASE WHEN n.ordinal = 1 THEN n.rows END, 'delete', n.id,
               jsonb_build_object('op', 'delete', 'row', n.row_data, 'old', n.old_data,
                                  'customer_id', %1$s)
        FROM s, (SELECT row_number() OVER () AS ordinal, count(*) OVER () AS rows,
                        r.id, r.session_id, to_jsonb(r) AS row_data,
                        jsonb_build_object('status', r.status, 'mechanic_id', r.mechanic_id,
                                           'workshop_id', r.workshop_id) AS old_data
                 FROM old_rows r) n;
    END IF;
    IF NOT FOUND AND NOT EXISTS (SELECT 1 FROM pgcast.log_state st
                                 WHERE st.source_table = TG_RELID) THEN
        RAISE EXCEPTION 'pgcast.capture_assignment_changes() records only the table it was installed on'
            USING HINT = 'It is the trigger of ' || (SELECT source_table::text FROM pgcast.log_state);
    END IF;
    RETURN NULL;
END
$body$;
$function$, customer_expr);

    -- Version 2's row trigger, kept where an upgrade could not replace it (pgcast's role did not
    -- own the table): at commit, one statement of one row, published as the statement triggers'
    -- rows are. Same sessions table.
    EXECUTE format($function$
CREATE OR REPLACE FUNCTION pgcast.emit_assignment_event() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    n     record;
    prior jsonb;
BEGIN
    IF TG_OP = 'DELETE' THEN
        n := OLD;
    ELSE
        n := NEW;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        prior := jsonb_build_object(
            'status', OLD.status, 'mechanic_id', OLD.mechanic_id, 'workshop_id', OLD.workshop_id);
    END IF;
    -- The join with log_state admits only the table pgcast was installed on. The row queues
    -- pgcast_publish_at_commit, which fires in this same commit.
    INSERT INTO pgcast.assignment_changes
        (statement, ordinal, statement_rows, op, assignment_id, event)
    SELECT nextval('pgcast.capture_statement'), 1, 1, lower(TG_OP), n.id,
           jsonb_build_object('op', lower(TG_OP), 'row', to_jsonb(n), 'old', prior,
                              'customer_id', %1$s)
    FROM pgcast.log_state st
    WHERE st.source_table = TG_RELID;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgcast.emit_assignment_event() records only the table it was installed on'
            USING HINT = 'It is the trigger of ' || (SELECT source_table::text FROM pgcast.log_state);
    END IF;
    RETURN NULL;
END
$body$;
$function$, customer_expr);
END
$migration$;
COMMENT ON FUNCTION pgcast.capture_assignment_changes() IS
    'Statement-level trigger of session_assignments (pgcast_capture_insert, _update, _delete): '
    'writes every row the statement changed to pgcast.assignment_changes with one INSERT ... '
    'SELECT from the transition tables, under one statement number; pgcast.publish_statement() '
    'gives them their positions at commit. Refuses to run for any table but '
    'pgcast.log_state.source_table. SECURITY DEFINER; EXECUTE is not granted to anyone. '
    'TRUNCATE is not captured.';
COMMENT ON FUNCTION pgcast.emit_assignment_event() IS
    'Version 2''s deferred row trigger of session_assignments, kept only for an install '
    'upgraded by a role that did not own the table (see pgcast.install_capture()): at commit, '
    'writes the change (with its session''s customer) to pgcast.assignment_changes as a '
    'statement of one row, which pgcast.publish_statement() publishes in the same commit. '
    'Refuses to run for any table but pgcast.log_state.source_table. SECURITY DEFINER; EXECUTE '
    'is not granted to anyone.';

-- Retention, in position order: statements (and their rows) whose commit is older than the
-- retention, oldest first. Reads only the oldest batch_size statements (primary key order), so
-- a run that has nothing to delete costs one short index scan.
CREATE OR REPLACE FUNCTION pgcast.prune_events(retention interval, batch_size integer DEFAULT 1000)
    RETURNS integer
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    deleted integer;
    highest bigint;
BEGIN
    -- One pruner at a time across gateway replicas; the others skip this round. The row lock
    -- needs UPDATE on pgcast.log_state, which only pgcast's role has.
    PERFORM 1 FROM pgcast.log_state FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    WITH doomed AS (
        SELECT o.last_position, o.statement
        FROM (SELECT c.last_position, c.statement, c.committed_at
              FROM pgcast.committed_statements c
              ORDER BY c.last_position
              LIMIT batch_size) o
        WHERE o.committed_at < now() - retention
    ), statements AS (
        DELETE FROM pgcast.committed_statements c USING doomed d
        WHERE c.last_position = d.last_position
        RETURNING c.last_position, c.statement
    ), events AS (
        DELETE FROM pgcast.assignment_changes ch USING statements s
        WHERE ch.statement = s.statement
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM events), (SELECT max(last_position) FROM statements)
    INTO deleted, highest;
    UPDATE pgcast.log_state
    SET last_pruned_at = now(),
        prune_retention = retention,
        pruned_through = greatest(pruned_through, coalesce(highest, 0));
    RETURN deleted;
END
$$;
COMMENT ON FUNCTION pgcast.prune_events(interval, integer) IS
    'Deletes, oldest first, at most batch_size committed statements older than retention '
    '(pgcast.committed_statements) with their rows (pgcast.assignment_changes), records the '
    'highest deleted position in pgcast.log_state.pruned_through, the time of the run in '
    'last_pruned_at and the retention in prune_retention. Returns how many events went; call '
    'again until 0. Small batches keep locks short; concurrent callers skip instead of waiting. '
    'EXECUTE is not granted to anyone but the owner.';
REVOKE EXECUTE ON FUNCTION pgcast.prune_events(interval, integer) FROM PUBLIC;

COMMENT ON TABLE pgcast.commit_order IS
    'Holds no rows: the commit-time trigger function (pgcast.publish_statement()) locks it '
    '(SHARE UPDATE EXCLUSIVE) from drawing positions until its transaction ends, so positions '
    'follow commit order. A role without UPDATE, DELETE or TRUNCATE on it cannot take that '
    'lock, and the ROW SHARE / ROW EXCLUSIVE locks any role with USAGE on schema pgcast can hold '
    'on it (e.g. via PREPARE) do not conflict with it. VACUUM and ANALYZE of this empty table '
    'take the same lock for microseconds. A lock held for more than a few seconds (e.g. after '
    'SET CONSTRAINTS ALL IMMEDIATE in a long transaction) delays every write to '
    'session_assignments, and `pgcast doctor` reports it. Grant nothing on it.';
COMMENT ON SEQUENCE pgcast.capture_statement IS
    'Numbers the capturing statements (pgcast.assignment_changes.statement, '
    'pgcast.committed_statements.statement): unique across sessions, cached per session (their '
    'order does not matter: positions are drawn at commit). Not a position. Grant nothing on it.';

CREATE OR REPLACE FUNCTION pgcast.version() RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT 4';
