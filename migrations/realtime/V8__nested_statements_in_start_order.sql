-- pgcast realtime objects, version 8: a statement run inside another one publishes after it.
--
-- Each statement's events are captured when the statement ends (an AFTER ... FOR EACH
-- STATEMENT trigger) and published at commit in the order they were captured. A statement that
-- an application's AFTER trigger on session_assignments runs (an UPDATE's row trigger that
-- updates the same row again) ends first, so before version 8 its events came first: the row's
-- last event was the outer statement's, an older state than the row's, and every client kept
-- that state. Since version 8 a statement's capture puts its events before those of the
-- statements that ran inside it: within a transaction, statements publish in the order they
-- started in, which is the order in which an AFTER trigger's statements change each row.
--
-- How a capture knows what ran inside its statement, at no cost to a statement nothing runs
-- inside (the common case): a BEFORE ... FOR EACH STATEMENT trigger whose WHEN condition is
-- true only for a statement run inside a trigger, or while the transaction's setting
-- pgcast.nesting is set. Its function marks where the statement starts: a statement number
-- drawn then, in the setting pgcast.start_<depth>, at the statement's trigger depth. The
-- statements this session captures later have higher numbers (one session draws in order).
-- A capture that ran inside a trigger, or saw pgcast.nesting set, calls
-- pgcast.order_nested_statements(): the transaction's statements numbered between its start
-- mark and its own number, captured that way (their first row carries the transaction's id,
-- assignment_changes.nested_xact), ran inside it; its events take the first places among
-- theirs. The events change places; the blocks of positions the statements draw at commit do
-- not. A statement run at the top level empties pgcast.nesting when it starts. The settings
-- are ones any role can set: a writer that forges them reorders only its own transaction's
-- events (the transaction's id must match), and garbage in them reads as no mark.
--
-- Not covered:
-- - a statement that a function runs inside another statement without a trigger in between
--   (UPDATE session_assignments SET ... = f() where f() writes session_assignments);
-- - a statement that an application's BEFORE trigger runs (a row trigger, or a statement
--   trigger that fires after pgcast_statement_start, by name) changes rows before the outer
--   statement does: it is now logged after the outer statement. Only a row both change is
--   affected, and only when the inner statement frees a key the outer one then takes (a BEFORE
--   INSERT trigger that deletes the row with the new row's id); PostgreSQL refuses any other
--   change by both of one row.
-- Without pgcast_statement_start (not the table owner's member at upgrade, or disabled) the
-- capture orders nothing: statements are logged as they are captured, as in version 7.
-- Version 2's row trigger, where an upgrade could not replace it, queues each row's event when
-- the row is written and needs none of this.
--
-- Also: the capture of an UPDATE pairs old and new rows with a FULL JOIN (see there), so that
-- a large UPDATE after a small one in the same session is no longer quadratic.
--
-- Locks. The application table first, in SHARE ROW EXCLUSIVE mode (what CREATE TRIGGER takes,
-- and only where pgcast's role may create triggers on it): no writer is then between a
-- capture and its commit. Then pgcast.assignment_changes, for its new column (no rewrite).
DO $lock$
DECLARE
    source regclass := (SELECT source_table FROM pgcast.log_state);
BEGIN
    IF pg_has_role((SELECT c.relowner FROM pg_class c WHERE c.oid = source), 'USAGE') THEN
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', source);
    END IF;
END
$lock$;

ALTER TABLE pgcast.assignment_changes ADD COLUMN nested_xact xid8;
COMMENT ON COLUMN pgcast.assignment_changes.nested_xact IS
    'Set on the first row of a statement captured inside a trigger, or next to one '
    '(pg_current_xact_id() of its transaction), else null: pgcast.order_nested_statements() '
    'moves only statements of its own transaction. Since version 8.';
COMMENT ON TABLE pgcast.assignment_changes IS
    'The content of the event log: one row per event, written by '
    'pgcast.capture_assignment_changes() when its statement ran: a row of session_assignments '
    'the statement changed, or two for a row whose id or session_id changed (the old row''s '
    'delete, the new row''s insert). Before commit, pgcast.order_nested_statements() may swap '
    'the contents of its own transaction''s rows (since version 8). A row is an event once its '
    'statement is in pgcast.committed_statements (at commit); read them together through the '
    'view pgcast.assignment_events. Pruned with its statement by pgcast.prune_events(), a batch '
    'of events at a time. Grant nothing on it: a role that could write here could forge events.';

CREATE FUNCTION pgcast.note_statement_start() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    mark bigint;
BEGIN
    -- pg_trigger_depth() counts this call: the statement runs at depth pg_trigger_depth() - 1.
    IF pg_trigger_depth() = 1 THEN
        -- A statement of the transaction's own, run while pgcast.nesting is set: what was
        -- captured before it did not run inside it (its start mark below says so).
        PERFORM set_config('pgcast.nesting', '', true);
    END IF;
    -- The mark: every statement this session captures from now on has a higher number. One
    -- number per such statement, never used for anything else.
    mark := nextval('pgcast.capture_statement');
    PERFORM set_config('pgcast.start_' || (pg_trigger_depth() - 1), mark::text, true);
    -- The first statement inside a trigger in this transaction marks the top level too, for a
    -- top-level statement that started while nothing was noted (its start trigger did not run):
    -- nothing of this transaction was captured inside a trigger before this mark.
    IF current_setting('pgcast.start_0', true) IS NULL
       OR current_setting('pgcast.start_0', true) = '' THEN
        PERFORM set_config('pgcast.start_0', mark::text, true);
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION pgcast.note_statement_start() IS
    'BEFORE ... FOR EACH STATEMENT trigger pgcast_statement_start of session_assignments, run '
    'only for a statement that runs inside a trigger, or while the transaction''s setting '
    'pgcast.nesting is set: marks the statement''s start in the setting pgcast.start_<depth> '
    '(a number drawn from pgcast.capture_statement) and, at the top level, empties '
    'pgcast.nesting. Writes nothing else. Since version 8; see '
    'pgcast.order_nested_statements(). SECURITY DEFINER; EXECUTE is not granted to anyone.';
REVOKE EXECUTE ON FUNCTION pgcast.note_statement_start() FROM PUBLIC;

CREATE FUNCTION pgcast.order_nested_statements(own bigint) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- The captured statement's start mark, at its depth (this runs inside its capture
    -- trigger).
    mark  text := current_setting('pgcast.start_' || (pg_trigger_depth() - 1), true);
    since bigint;
    moved bigint[];
BEGIN
    -- No mark (or not a number): pgcast_statement_start did not run, which it does for every
    -- statement inside a trigger (missing, or disabled). Then order nothing and flag nothing:
    -- the order of version 7, statements as they were captured.
    IF mark IS NULL OR mark !~ '^[0-9]{1,18}$' THEN
        RETURN;
    END IF;
    since := mark::bigint;
    -- The statements that ran inside this one: numbered after its start and before it by this
    -- session, captured by this transaction as statements inside a trigger (or next to them).
    -- Their rows and this statement's are the places, in publishing order (statement number,
    -- which is capture order, then ordinal); this statement's events go first, then theirs as
    -- they stand. Only contents move; the keys and each statement's row count stay.
    moved := ARRAY(SELECT ch.statement FROM pgcast.assignment_changes ch
                   WHERE ch.statement > since AND ch.statement < own AND ch.ordinal = 1
                     AND ch.nested_xact = pg_current_xact_id()
                   ORDER BY ch.statement);
    IF cardinality(moved) > 0 THEN
        -- One pass: the places (keys in publishing order) zipped with the rows whose contents
        -- go there (keys in the new order), as arrays of keys only; the contents are read from
        -- the table as it stood before this UPDATE. No join whose plan could turn quadratic.
        WITH involved AS (
            SELECT ch.statement, ch.ordinal FROM pgcast.assignment_changes ch
            WHERE ch.statement = ANY (moved || own)
        ), orders AS (
            SELECT array_agg(v.statement ORDER BY v.statement, v.ordinal) AS place_statements,
                   array_agg(v.ordinal ORDER BY v.statement, v.ordinal) AS place_ordinals,
                   array_agg(v.statement ORDER BY v.statement <> own, v.statement, v.ordinal)
                       AS from_statements,
                   array_agg(v.ordinal ORDER BY v.statement <> own, v.statement, v.ordinal)
                       AS from_ordinals
            FROM involved v
        )
        UPDATE pgcast.assignment_changes ch
        SET op = src.op, assignment_id = src.assignment_id, event = src.event
        FROM orders o
        CROSS JOIN unnest(o.place_statements, o.place_ordinals, o.from_statements,
                          o.from_ordinals) AS z(statement, ordinal, from_statement, from_ordinal)
        JOIN pgcast.assignment_changes src
          ON src.statement = z.from_statement AND src.ordinal = z.from_ordinal
        WHERE ch.statement = z.statement AND ch.ordinal = z.ordinal
          AND (z.statement, z.ordinal) IS DISTINCT FROM (z.from_statement, z.from_ordinal);
    END IF;
    -- For the statement this one runs inside, and for another capture of this same statement
    -- (an INSERT ... ON CONFLICT DO UPDATE is captured as its updates and its inserts).
    UPDATE pgcast.assignment_changes SET nested_xact = pg_current_xact_id()
    WHERE statement = own AND ordinal = 1;
    PERFORM set_config('pgcast.nesting', 'set', true);
END
$$;
COMMENT ON FUNCTION pgcast.order_nested_statements(bigint) IS
    'Called by pgcast.capture_assignment_changes() after it captured statement `own`, when that '
    'statement ran inside a trigger or the transaction''s setting pgcast.nesting is set: gives '
    'the statement''s events the first places among the rows of the statements that ran inside '
    'it (this transaction''s, numbered after its start mark pgcast.start_<depth>, see '
    'pgcast.note_statement_start()), so that a transaction''s events follow the order its '
    'statements started in; then marks `own` (assignment_changes.nested_xact) for the statement '
    'it runs inside and sets pgcast.nesting. Since version 8. EXECUTE is not granted to anyone.';
REVOKE EXECUTE ON FUNCTION pgcast.order_nested_statements(bigint) FROM PUBLIC;

-- Both run as the capture function's owner (the start trigger's as SECURITY DEFINER, the other
-- called by the capture), whichever member of that role applies this migration.
DO $owner$
DECLARE
    owner regrole := (SELECT p.proowner::regrole FROM pg_proc p
                      WHERE p.oid = 'pgcast.capture_assignment_changes()'::regprocedure);
BEGIN
    EXECUTE format('ALTER FUNCTION pgcast.note_statement_start() OWNER TO %s', owner);
    EXECUTE format('ALTER FUNCTION pgcast.order_nested_statements(bigint) OWNER TO %s', owner);
END
$owner$;

-- The capture function of version 7, and then: a statement's events go before those of the
-- statements that ran inside it. The sessions table is the one the installed function names.
DO $migration$
DECLARE
    customer_expr    text := 'NULL::uuid';
    old_customer     text := 'NULL::uuid';
    installed_source text;
    sessions_table   text;
BEGIN
    SELECT p.prosrc INTO installed_source FROM pg_proc p
    WHERE p.oid = 'pgcast.capture_assignment_changes()'::regprocedure;
    sessions_table := substring(installed_source FROM
        '\(SELECT c\.customer_id FROM (.+?) c WHERE c\.id OPERATOR');
    IF sessions_table IS NULL OR to_regclass(sessions_table) IS NULL THEN
        RAISE WARNING 'pgcast: the installed capture names no sessions table; events will not name their '
            'session''s customer and customer:<id> topics will stay empty';
    ELSE
        -- A sub-select per row (an index probe), never a join the planner could turn into a
        -- scan of all sessions for one row. The second: the old row's session (a move's delete).
        customer_expr := format(
            '(SELECT c.customer_id FROM %s c WHERE c.id OPERATOR(pg_catalog.=) n.session_id)',
            sessions_table);
        old_customer := format(
            '(SELECT c.customer_id FROM %s c WHERE c.id OPERATOR(pg_catalog.=) o.session_id)',
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
               json_build_object('op', 'insert', 'row', n.row_data, 'old', NULL,
                                 'customer_id', %1$s)
        FROM s, (SELECT row_number() OVER () AS ordinal, count(*) OVER () AS rows,
                        r.id, r.session_id, to_json(r) AS row_data
                 FROM new_rows r) n;
    ELSIF TG_OP = 'UPDATE' THEN
        -- Each new row is paired with its old one by their order in the transition tables
        -- (PostgreSQL writes both in the same order). A pair whose id or session_id differs
        -- is a move: the old row's delete, and later in the statement the new row's insert.
        -- A FULL JOIN (every row has its pair, so it is the inner join), because PostgreSQL
        -- runs a full join only as a hash or merge join: up to version 7 the plan it cached
        -- for a session's first capture of an UPDATE (of one row: a nested loop that computes
        -- the inner side again for each outer row) made a later large UPDATE in that session
        -- quadratic (2,000 rows: 18 s; 10,000: minutes).
        WITH s AS MATERIALIZED (
            SELECT nextval('pgcast.capture_statement') AS statement
            FROM pgcast.log_state st WHERE st.source_table = TG_RELID
        ), pairs AS (
            SELECT n.pair, n.id, n.session_id, n.row_data, o.id AS old_id,
                   o.session_id AS old_session_id, o.row_data AS old_row, o.old_data,
                   (n.id, n.session_id) IS DISTINCT FROM (o.id, o.session_id) AS moved
            FROM (SELECT row_number() OVER () AS pair, r.id, r.session_id,
                         to_json(r) AS row_data
                  FROM new_rows r) n
            FULL JOIN (SELECT row_number() OVER () AS pair, r.id, r.session_id,
                         to_json(r) AS row_data,
                         json_build_object('status', r.status, 'mechanic_id', r.mechanic_id,
                                           'workshop_id', r.workshop_id) AS old_data
                  FROM old_rows r) o ON o.pair = n.pair
        ), changes AS (
            SELECT p.pair, 0 AS part, 'delete' AS op, p.old_id AS id, p.old_row AS row_data,
                   p.old_data, %2$s AS customer_id
            FROM pairs p, LATERAL (SELECT p.old_session_id AS session_id) o
            WHERE p.moved
            UNION ALL
            SELECT p.pair, 1, CASE WHEN p.moved THEN 'insert' ELSE 'update' END, p.id,
                   p.row_data, CASE WHEN p.moved THEN NULL ELSE p.old_data END,
                   %1$s
            FROM pairs p, LATERAL (SELECT p.session_id) n
        ), numbered AS (
            -- Every move's delete first, then each pair's insert or update: rows that swap
            -- ids (a deferrable key) end with both ids present, as they are.
            SELECT row_number() OVER (ORDER BY c.part, c.pair) AS ordinal,
                   count(*) OVER () AS rows, c.*
            FROM changes c
        )
        INSERT INTO pgcast.assignment_changes
            (statement, ordinal, statement_rows, op, assignment_id, event)
        SELECT s.statement, x.ordinal, CASE WHEN x.ordinal = 1 THEN x.rows END, x.op, x.id,
               json_build_object('op', x.op, 'row', x.row_data, 'old', x.old_data,
                                 'customer_id', x.customer_id)
        FROM s, numbered x;
    ELSE
        WITH s AS MATERIALIZED (
            SELECT nextval('pgcast.capture_statement') AS statement
            FROM pgcast.log_state st WHERE st.source_table = TG_RELID
        )
        INSERT INTO pgcast.assignment_changes
            (statement, ordinal, statement_rows, op, assignment_id, event)
        SELECT s.statement, n.ordinal, CASE WHEN n.ordinal = 1 THEN n.rows END, 'delete', n.id,
               json_build_object('op', 'delete', 'row', n.row_data, 'old', n.old_data,
                                 'customer_id', %1$s)
        FROM s, (SELECT row_number() OVER () AS ordinal, count(*) OVER () AS rows,
                        r.id, r.session_id, to_json(r) AS row_data,
                        json_build_object('status', r.status, 'mechanic_id', r.mechanic_id,
                                          'workshop_id', r.workshop_id) AS old_data
                 FROM old_rows r) n;
    END IF;
    IF NOT FOUND AND NOT EXISTS (SELECT 1 FROM pgcast.log_state st
                                 WHERE st.source_table = TG_RELID) THEN
        RAISE EXCEPTION 'pgcast.capture_assignment_changes() records only the table it was installed on'
            USING HINT = 'It is the trigger of ' || (SELECT source_table::text FROM pgcast.log_state);
    END IF;
    -- Version 8. A statement run inside a trigger of this one was captured first: put this
    -- statement's events before theirs (pgcast.order_nested_statements()). Nothing to do, and
    -- one setting read, for a statement nothing ran inside and that runs inside nothing.
    IF FOUND AND (pg_trigger_depth() > 1
                  OR current_setting('pgcast.nesting', true) <> '') THEN
        PERFORM pgcast.order_nested_statements(currval('pgcast.capture_statement'));
    END IF;
    RETURN NULL;
END
$body$;
$function$, customer_expr, old_customer);

END
$migration$;

-- The swap to statement capture (version 3), now with the start trigger: creates what is
-- missing, keeps what is there.
CREATE OR REPLACE FUNCTION pgcast.install_capture() RETURNS text
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
       AND EXISTS (SELECT 1 FROM pg_trigger t
                   WHERE t.tgrelid = source AND t.tgname = 'pgcast_statement_start')
       AND NOT EXISTS (SELECT 1 FROM pg_trigger t
                       WHERE t.tgrelid = source AND t.tgname = 'pgcast_emit_assignment_event') THEN
        RETURN 'installed';
    END IF;
    IF NOT pg_has_role((SELECT c.relowner FROM pg_class c WHERE c.oid = source), 'USAGE') THEN
        RAISE NOTICE 'pgcast: not a member of the owner of %, so its pgcast triggers stay as '
            'they are (every change is logged; see `pgcast doctor`); run `pgcast migrate` again '
            'as a member of its owner role', source;
        RETURN 'not the owner';
    END IF;
    -- In one transaction: no change is captured twice or missed while the triggers change.
    IF EXISTS (SELECT 1 FROM pg_trigger t
               WHERE t.tgrelid = source AND t.tgname = 'pgcast_emit_assignment_event') THEN
        EXECUTE format('DROP TRIGGER pgcast_emit_assignment_event ON %s', source);
    END IF;
    FOREACH op IN ARRAY ARRAY['insert', 'update', 'delete'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_trigger t
                       WHERE t.tgrelid = source AND t.tgname = 'pgcast_capture_' || op
                         AND t.tgfoid = capture) THEN
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
        END IF;
        EXECUTE format(
            'COMMENT ON TRIGGER pgcast_capture_%s ON %s IS %L', op, source,
            format('pgcast: writes the rows each %s statement changes to the event log '
                   '(pgcast.assignment_changes); pgcast_publish_at_commit numbers them at '
                   'commit, in commit order. Disabling it silences every live client for %ss; '
                   '`pgcast doctor` reports that.',
                   upper(op), upper(op)));
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger t
                   WHERE t.tgrelid = source AND t.tgname = 'pgcast_statement_start') THEN
        -- The WHEN condition is all a statement nothing runs inside pays: the function runs
        -- only for a statement inside a trigger, or while something is noted.
        EXECUTE format(
            'CREATE TRIGGER pgcast_statement_start BEFORE INSERT OR UPDATE OR DELETE ON %s '
            'FOR EACH STATEMENT '
            'WHEN (pg_catalog.pg_trigger_depth() > 0 '
            'OR pg_catalog.current_setting(''pgcast.nesting'', true) <> '''') '
            'EXECUTE FUNCTION pgcast.note_statement_start()', source);
    END IF;
    EXECUTE format(
        'COMMENT ON TRIGGER pgcast_statement_start ON %s IS %L', source,
        'pgcast: marks where a statement run inside a trigger starts, so that a statement''s '
        'events are logged before those of the statements that ran inside it '
        '(pgcast.note_statement_start()). Without it those come first, as in version 7; '
        '`pgcast doctor` warns.');
    RETURN 'installed';
END
$$;
COMMENT ON FUNCTION pgcast.install_capture() IS
    'Installs pgcast''s triggers on the source table: the statement triggers '
    'pgcast_capture_insert, _update and _delete (version 3; they replace version 2''s row '
    'trigger pgcast_emit_assignment_event) and pgcast_statement_start (version 8), creating '
    'those missing. Needs membership in the table''s owner role; without it, changes nothing and '
    'returns ''not the owner''. Called by the migrations and by every `pgcast migrate`. EXECUTE '
    'is not granted to anyone.';
REVOKE EXECUTE ON FUNCTION pgcast.install_capture() FROM PUBLIC;

SELECT pgcast.install_capture();

CREATE OR REPLACE FUNCTION pgcast.version() RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT 8';
