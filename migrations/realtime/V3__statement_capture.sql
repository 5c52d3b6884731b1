-- pgcast realtime objects, version 3: capture per statement, publish once per transaction.
--
-- Version 2 ran a deferred row trigger at commit: per changed row, a plpgsql call with its own
-- search_path, to_jsonb, a sub-select of the customer and an INSERT into the log, all while
-- holding the commit-order lock, which serializes every writer's commit. A 100-row transaction
-- reached a third of the commit rate of a bare pg_notify row trigger.
--
-- Version 3 splits the work in two:
--
-- * Capture, per statement, concurrently with other writers. Three statement-level AFTER
--   triggers on session_assignments (INSERT, UPDATE, DELETE) read the statement's transition
--   tables and stage each changed row, as JSON, in pgcast.pending_events with one set-based
--   INSERT ... SELECT. A staged row belongs to its transaction (pg_current_xact_id()) and is
--   ordered by statement and by row within the statement. A savepoint rolled back takes its
--   staged rows with it; a rolled-back transaction leaves only dead rows.
-- * Publish, once per transaction, at commit. The first row a transaction stages carries a
--   flag that queues one deferred constraint trigger on pgcast.pending_events. At commit it
--   takes the staged rows back (and each session's customer), then takes the commit-order lock
--   and, under it, only reserves one block of positions from pgcast.event_position and inserts
--   the finished log rows. One doorbell per transaction, as before.
--
-- The log (pgcast.assignment_events) and its payload are unchanged. Positions still follow
-- commit order (drawn under the same SHARE UPDATE EXCLUSIVE lock, held to the end of the
-- transaction) and stay contiguous within a transaction, in the order of the writes.
--
-- Replacing the trigger on session_assignments needs its owner (DROP TRIGGER, COMMENT ON
-- TRIGGER). pgcast's role may no longer be a member of that owner after the first install; the
-- upgrade then keeps version 2's row trigger, which still logs every change correctly (more
-- slowly), says so in a NOTICE, and `pgcast doctor` warns until `pgcast migrate` is run again
-- while pgcast's role is a member of the table's owner (pgcast.install_capture() does the swap).

-- Staging. UNLOGGED: a staged row only lives until its transaction commits (it is then moved
-- to the log, which is logged) or aborts (it is dead), so nothing in it must survive a crash,
-- and it costs no WAL. Empty on a standby, where nothing writes.
CREATE UNLOGGED TABLE pgcast.pending_events (
    xact          xid8    NOT NULL,
    statement     bigint  NOT NULL,
    ordinal       bigint  NOT NULL,
    first         boolean NOT NULL,
    op            text    NOT NULL,
    assignment_id uuid    NOT NULL,
    event         jsonb   NOT NULL,
    PRIMARY KEY (xact, statement, ordinal)
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
        autovacuum_vacuum_insert_threshold = -1);
COMMENT ON TABLE pgcast.pending_events IS
    'Changes of session_assignments captured by the statements of transactions that have not '
    'committed yet (UNLOGGED: nothing here outlives its transaction). Written by '
    'pgcast.capture_assignment_changes() per statement; at commit, '
    'pgcast.publish_pending_events() moves a transaction''s rows to pgcast.assignment_events '
    'with their commit-ordered positions. Empty between transactions except for dead rows '
    'awaiting vacuum. Grant nothing on it: a role that could insert here could forge events.';
COMMENT ON COLUMN pgcast.pending_events.xact IS
    'pg_current_xact_id() of the writing transaction: publish takes back exactly its own rows.';
COMMENT ON COLUMN pgcast.pending_events.statement IS
    'Order of the capturing statement within its transaction (pgcast.capture_statement).';
COMMENT ON COLUMN pgcast.pending_events.ordinal IS
    'Order of the row within its statement (the order of the transition table).';
COMMENT ON COLUMN pgcast.pending_events.first IS
    'True on the first row a transaction stages: it alone queues the deferred '
    'pgcast_publish_at_commit trigger, so publishing runs once per transaction.';
COMMENT ON COLUMN pgcast.pending_events.event IS
    'The event''s payload but for position and committed_at, which only commit knows: op, row '
    '(the row after the change; for a delete, before), old (status, mechanic_id, workshop_id '
    'before an update or delete, else null) and customer_id (the customer of the row''s session '
    'when the change was written).';
REVOKE ALL ON pgcast.pending_events FROM PUBLIC;

CREATE SEQUENCE pgcast.capture_statement AS bigint CACHE 32;
COMMENT ON SEQUENCE pgcast.capture_statement IS
    'Orders the capturing statements of one transaction (pgcast.pending_events.statement). Only '
    'the order within one session matters, so values are cached per session. Not a position. '
    'Grant nothing on it.';
REVOKE ALL ON SEQUENCE pgcast.capture_statement FROM PUBLIC;

-- Capture. A statement-level trigger sees all rows of the statement at once in its transition
-- tables (new_rows, old_rows). For an UPDATE both hold one row per updated row, written in the
-- same order, so the n-th old row is the n-th new row's previous version even when the update
-- changes `id`.
-- Created with the application's `sessions` table written into it, schema-qualified, as
-- version 2 did: the table version 2 resolved is read back from its function's source, so this
-- migration does not depend on the search_path of this run. The customer is read when the
-- change is captured (in the writing transaction), outside the commit-order lock.
DO $migration$
DECLARE
    customer_expr  text := 'NULL::uuid';
    v2_source      text;
    sessions_table text;
BEGIN
    SELECT p.prosrc INTO v2_source FROM pg_proc p
    WHERE p.oid = 'pgcast.emit_assignment_event()'::regprocedure;
    sessions_table := substring(v2_source FROM '\(SELECT s\.customer_id FROM (.+?) s WHERE s\.id = ');
    IF sessions_table IS NULL OR to_regclass(sessions_table) IS NULL THEN
        RAISE WARNING 'pgcast: version 2 recorded no sessions table; events will not name their '
            'session''s customer and customer:<id> topics will stay empty';
    ELSE
        -- A sub-select per row (an index probe), never a join the planner could turn into a
        -- scan of all sessions for one row.
        customer_expr := format(
            '(SELECT c.customer_id FROM %s c WHERE c.id OPERATOR(pg_catalog.=) n.session_id)',
            sessions_table);
    END IF;
    EXECUTE format($function$
CREATE FUNCTION pgcast.capture_assignment_changes() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    -- One INSERT ... SELECT per statement. `s` yields one row only for the table pgcast was
    -- installed on; it draws the statement's order once and says whether this is the
    -- transaction's first staged row (rows staged under a savepoint that was rolled back are
    -- invisible here, so the next statement flags again).
    IF TG_OP = 'INSERT' THEN
        WITH s AS MATERIALIZED (
            SELECT pg_current_xact_id() AS xact, nextval('pgcast.capture_statement') AS statement,
                   NOT EXISTS (SELECT 1 FROM pgcast.pending_events p
                               WHERE p.xact = pg_current_xact_id()) AS is_first
            FROM pgcast.log_state st WHERE st.source_table = TG_RELID
        )
        INSERT INTO pgcast.pending_events (xact, statement, ordinal, first, op, assignment_id, event)
        SELECT s.xact, s.statement, n.ordinal, s.is_first AND n.ordinal = 1, 'insert', n.id,
               jsonb_build_object('op', 'insert', 'row', n.row_data, 'old', NULL,
                                  'customer_id', %1$s)
        FROM s, (SELECT row_number() OVER () AS ordinal, r.id, r.session_id,
                        to_jsonb(r) AS row_data
                 FROM new_rows r) n;
    ELSIF TG_OP = 'UPDATE' THEN
        WITH s AS MATERIALIZED (
            SELECT pg_current_xact_id() AS xact, nextval('pgcast.capture_statement') AS statement,
                   NOT EXISTS (SELECT 1 FROM pgcast.pending_events p
                               WHERE p.xact = pg_current_xact_id()) AS is_first
            FROM pgcast.log_state st WHERE st.source_table = TG_RELID
        )
        INSERT INTO pgcast.pending_events (xact, statement, ordinal, first, op, assignment_id, event)
        SELECT s.xact, s.statement, n.ordinal, s.is_first AND n.ordinal = 1, 'update', n.id,
               jsonb_build_object('op', 'update', 'row', n.row_data, 'old', o.old_data,
                                  'customer_id', %1$s)
        FROM s, (SELECT row_number() OVER () AS ordinal, r.id, r.session_id,
                        to_jsonb(r) AS row_data
                 FROM new_rows r) n
        JOIN (SELECT row_number() OVER () AS ordinal,
                     jsonb_build_object('status', r.status, 'mechanic_id', r.mechanic_id,
                                        'workshop_id', r.workshop_id) AS old_data
              FROM old_rows r) o ON o.ordinal = n.ordinal;
    ELSE
        WITH s AS MATERIALIZED (
            SELECT pg_current_xact_id() AS xact, nextval('pgcast.capture_statement') AS statement,
                   NOT EXISTS (SELECT 1 FROM pgcast.pending_events p
                               WHERE p.xact = pg_current_xact_id()) AS is_first
            FROM pgcast.log_state st WHERE st.source_table = TG_RELID
        )
        INSERT INTO pgcast.pending_events (xact, statement, ordinal, first, op, assignment_id, event)
        SELECT s.xact, s.statement, n.ordinal, s.is_first AND n.ordinal = 1, 'delete', n.id,
               jsonb_build_object('op', 'delete', 'row', n.row_data, 'old', n.old_data,
                                  'customer_id', %1$s)
        FROM s, (SELECT row_number() OVER () AS ordinal, r.id, r.session_id,
                        to_jsonb(r) AS row_data,
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
END
$migration$;
COMMENT ON FUNCTION pgcast.capture_assignment_changes() IS
    'Statement-level trigger of session_assignments (pgcast_capture_insert, _update, _delete): '
    'stages every row the statement changed in pgcast.pending_events with one INSERT ... SELECT '
    'from the transition tables; pgcast.publish_pending_events() turns them into log rows at '
    'commit. Refuses to run for any table but pgcast.log_state.source_table. SECURITY DEFINER; '
    'EXECUTE is not granted to anyone. TRUNCATE is not captured.';
REVOKE EXECUTE ON FUNCTION pgcast.capture_assignment_changes() FROM PUBLIC;

CREATE FUNCTION pgcast.publish_pending_events() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    base bigint;
    n    bigint;
    at   timestamptz;
BEGIN
    IF TG_RELID <> 'pgcast.pending_events'::regclass THEN
        RAISE EXCEPTION 'pgcast.publish_pending_events() runs only on pgcast.pending_events';
    END IF;
    -- A doorbell: no row data (listeners read the log). Identical payloads collapse, so a
    -- transaction rings once however many rows it writes.
    PERFORM pg_notify('pgcast_assignments', '');

    -- Commit order. This runs while the transaction commits; the table lock is held until the
    -- transaction ends, so the next committer draws its positions only after this one is
    -- visible. Only pgcast's owner can take it. SHARE UPDATE EXCLUSIVE conflicts with itself
    -- but not with the ACCESS SHARE, ROW SHARE and ROW EXCLUSIVE locks that any role with
    -- USAGE on schema pgcast can take and keep (parse-time locks of a PREPAREd statement).
    -- Everything from here to the end of the transaction is serialized across writers: the
    -- payloads were built when the changes were captured, only positions and the commit time
    -- are added here.
    LOCK TABLE pgcast.commit_order IN SHARE UPDATE EXCLUSIVE MODE;
    -- A block of positions, one per staged row, in write order: nobody else draws while the
    -- lock is held, so base .. base + n - 1 are this transaction's.
    base := nextval('pgcast.event_position');
    at := clock_timestamp();
    WITH moved AS (
        DELETE FROM pgcast.pending_events p WHERE p.xact = NEW.xact
        RETURNING p.statement, p.ordinal, p.op, p.assignment_id, p.event
    ), ordered AS (
        SELECT row_number() OVER (ORDER BY m.statement, m.ordinal) AS i, m.*
        FROM moved m
    )
    INSERT INTO pgcast.assignment_events (position, assignment_id, op, committed_at, payload)
    SELECT base + o.i - 1, o.assignment_id, o.op, at,
           jsonb_build_object('position', base + o.i - 1, 'committed_at', at) || o.event
    FROM ordered o;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 1 THEN
        PERFORM setval('pgcast.event_position', base + n - 1);
    END IF;
    -- n = 0: already published (SET CONSTRAINTS ALL IMMEDIATE publishes at each statement);
    -- the position drawn is a hole, which readers tolerate.
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION pgcast.publish_pending_events() IS
    'Deferred constraint trigger of pgcast.pending_events (pgcast_publish_at_commit), fired once '
    'per transaction: at commit, takes the transaction''s staged changes back with each '
    'session''s customer, rings channel pgcast_assignments with an empty payload (a doorbell), '
    'then takes the pgcast.commit_order lock, reserves one block of positions from '
    'pgcast.event_position and appends the changes to pgcast.assignment_events in write order. '
    'SECURITY DEFINER; EXECUTE is not granted to anyone.';
REVOKE EXECUTE ON FUNCTION pgcast.publish_pending_events() FROM PUBLIC;

CREATE CONSTRAINT TRIGGER pgcast_publish_at_commit
    AFTER INSERT ON pgcast.pending_events
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.first)
    EXECUTE FUNCTION pgcast.publish_pending_events();
COMMENT ON TRIGGER pgcast_publish_at_commit ON pgcast.pending_events IS
    'pgcast: publishes a transaction''s staged changes at commit (once per transaction: only '
    'its first staged row is flagged). SET CONSTRAINTS ALL IMMEDIATE makes it fire at each '
    'statement and hold the commit-order lock until the transaction ends. Disabling it leaves '
    'changes staged and unpublished; `pgcast doctor` reports that.';

-- The swap from version 2's row trigger to the statement triggers. A function, so that an
-- install whose role did not own the table at upgrade time can finish later (`pgcast migrate`
-- calls it after the migrations).
CREATE FUNCTION pgcast.install_capture() RETURNS text
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    source   regclass := (SELECT source_table FROM pgcast.log_state);
    capture  oid := 'pgcast.capture_assignment_changes()'::regprocedure;
    op       text;
BEGIN
    IF (SELECT count(*) FROM pg_trigger t
        WHERE t.tgrelid = source AND t.tgfoid = capture AND NOT t.tgisinternal) = 3
       AND NOT EXISTS (SELECT 1 FROM pg_trigger t
                       WHERE t.tgrelid = source AND t.tgname = 'pgcast_emit_assignment_event') THEN
        RETURN 'installed';
    END IF;
    IF NOT pg_has_role((SELECT c.relowner FROM pg_class c WHERE c.oid = source), 'USAGE') THEN
        RAISE NOTICE 'pgcast: not the owner of %, its trigger stays version 2''s row trigger '
            '(correct, slower); run `pgcast migrate` again as a member of its owner role', source;
        RETURN 'not the owner';
    END IF;
    -- In one transaction: no change is captured twice or missed while the triggers change.
    IF EXISTS (SELECT 1 FROM pg_trigger t
               WHERE t.tgrelid = source AND t.tgname = 'pgcast_emit_assignment_event') THEN
        EXECUTE format('DROP TRIGGER pgcast_emit_assignment_event ON %s', source);
    END IF;
    FOREACH op IN ARRAY ARRAY['insert', 'update', 'delete'] LOOP
        IF EXISTS (SELECT 1 FROM pg_trigger t
                   WHERE t.tgrelid = source AND t.tgname = 'pgcast_capture_' || op) THEN
            EXECUTE format('DROP TRIGGER pgcast_capture_%s ON %s', op, source);
        END IF;
        EXECUTE format(
            'CREATE TRIGGER pgcast_capture_%s AFTER %s ON %s REFERENCING %s '
            'FOR EACH STATEMENT EXECUTE FUNCTION pgcast.capture_assignment_changes()',
            op, upper(op), source,
            CASE op WHEN 'insert' THEN 'NEW TABLE AS new_rows'
                    WHEN 'update' THEN 'OLD TABLE AS old_rows NEW TABLE AS new_rows'
                    ELSE 'OLD TABLE AS old_rows' END);
        EXECUTE format(
            'COMMENT ON TRIGGER pgcast_capture_%s ON %s IS %L', op, source,
            format('pgcast: stages the rows each %s statement changes for the event log; '
                   'pgcast_publish_at_commit on pgcast.pending_events appends them to '
                   'pgcast.assignment_events at commit, in commit order. Disabling it silences '
                   'every live client for %ss; `pgcast doctor` reports that.',
                   upper(op), upper(op)));
    END LOOP;
    RETURN 'installed';
END
$$;
COMMENT ON FUNCTION pgcast.install_capture() IS
    'Replaces version 2''s row trigger pgcast_emit_assignment_event on the source table with '
    'the statement triggers pgcast_capture_insert, _update and _delete (version 3). Needs '
    'membership in the table''s owner role; without it, changes nothing and returns '
    '''not the owner''. Called by the version 3 migration and by every `pgcast migrate`. '
    'EXECUTE is not granted to anyone.';
REVOKE EXECUTE ON FUNCTION pgcast.install_capture() FROM PUBLIC;

SELECT pgcast.install_capture();

COMMENT ON FUNCTION pgcast.emit_assignment_event() IS
    'Version 2''s deferred row trigger of session_assignments, kept only for an install '
    'upgraded by a role that did not own the table (see pgcast.install_capture()): at commit, '
    'draws a commit-ordered position under the pgcast.commit_order lock, appends the change '
    '(with its session''s customer) to pgcast.assignment_events and rings channel '
    'pgcast_assignments with an empty payload. Refuses to run for any table but '
    'pgcast.log_state.source_table. SECURITY DEFINER; EXECUTE is not granted to anyone.';
COMMENT ON TABLE pgcast.commit_order IS
    'Holds no rows: the commit-time trigger function (pgcast.publish_pending_events()) locks it '
    '(SHARE UPDATE EXCLUSIVE) from drawing positions until its transaction ends, so positions '
    'follow commit order. A role without UPDATE, DELETE or TRUNCATE on it cannot take that '
    'lock, and the ROW SHARE / ROW EXCLUSIVE locks any role with USAGE on schema pgcast can hold '
    'on it (e.g. via PREPARE) do not conflict with it. VACUUM and ANALYZE of this empty table '
    'take the same lock for microseconds. A lock held for more than a few seconds (e.g. after '
    'SET CONSTRAINTS ALL IMMEDIATE in a long transaction) delays every write to '
    'session_assignments, and `pgcast doctor` reports it. Grant nothing on it.';

CREATE OR REPLACE FUNCTION pgcast.version() RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT 3';
