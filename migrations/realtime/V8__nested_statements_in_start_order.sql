-- pgcast realtime objects, version 8: a statement run inside another one publishes after it.
--
-- Each statement's events are captured when the statement ends (an AFTER ... FOR EACH
-- STATEMENT trigger) and published at commit in the order they were captured. A statement
-- that runs inside another (an application's trigger on session_assignments that updates the
-- table again) ends first, so before version 8 its events came first: when an UPDATE's row
-- trigger changed the same row again, the row's last event was the outer statement's, an
-- older state than the row's, and every client kept that state. Since version 8 a statement's
-- capture puts its events before those of every statement that started inside it; within a
-- transaction events follow the order the statements started in, which is the order in which
-- each row's versions were written (PostgreSQL refuses to let a statement change a row that a
-- statement inside it has already changed).
--
-- How a capture knows what started inside its statement, at no cost to a statement nothing
-- runs inside (the common case): a BEFORE ... FOR EACH STATEMENT trigger whose WHEN condition
-- is true only for a statement run inside a trigger, or while something is noted. It notes the
-- statement's start in the transaction's setting pgcast.nesting; a capture of such a statement
-- notes its statement number there. The capture of the enclosing statement finds the numbers
-- noted since its own start and moves its events into the first places of that group
-- (pgcast.order_nested_statements()): the events change places, the positions the statements
-- draw at commit do not. A setting any role can set: a writer that forges it can only reorder
-- its own transaction's events, because a statement is moved only if its first row names the
-- writer's own transaction (assignment_changes.nested_xact).
--
-- Not covered: a statement that a function runs inside another statement without a trigger in
-- between (UPDATE session_assignments SET ... = f() where f() writes session_assignments; a
-- volatile function writing the table it is called from). Version 2's row trigger, where an
-- upgrade could not replace it, queues each row's event when the row is written and needs none
-- of this.
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
    'Set on the first row of a statement that ran inside another statement on '
    'session_assignments (pg_current_xact_id() of its transaction), else null: '
    'pgcast.order_nested_statements() moves only statements of its own transaction.';
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
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- pg_trigger_depth() counts this call: the statement runs at depth pg_trigger_depth() - 1.
    IF pg_trigger_depth() > 1 THEN
        -- A statement inside a trigger: note its start ("s" and its depth) for its capture.
        PERFORM set_config('pgcast.nesting',
                           coalesce(current_setting('pgcast.nesting', true), '')
                               || ' s' || (pg_trigger_depth() - 1),
                           true);
    ELSE
        -- A statement of the transaction's own: nothing noted before it can be inside it.
        PERFORM set_config('pgcast.nesting', '', true);
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION pgcast.note_statement_start() IS
    'BEFORE ... FOR EACH STATEMENT trigger pgcast_statement_start of session_assignments, run '
    'only for a statement that runs inside a trigger, or while the transaction''s setting '
    'pgcast.nesting holds something: notes the statement''s start there (a statement inside a '
    'trigger) or empties it (any other). Writes nothing else. Since version 8; see '
    'pgcast.order_nested_statements(). EXECUTE is not granted to anyone.';
REVOKE EXECUTE ON FUNCTION pgcast.note_statement_start() FROM PUBLIC;

CREATE FUNCTION pgcast.order_nested_statements(own bigint) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- The captured statement's depth: this runs inside its capture trigger.
    depth   integer := pg_trigger_depth() - 1;
    tokens  text[] := string_to_array(
                          btrim(coalesce(current_setting('pgcast.nesting', true), '')), ' ');
    started integer := 0;
    inside  bigint[];
BEGIN
    -- What was noted since this statement started: all of it for a statement of the
    -- transaction's own (the list was emptied when it started), else what follows the last
    -- start noted at its depth. None noted: pgcast_statement_start did not run (not installed,
    -- or disabled); order nothing and note nothing.
    IF depth > 0 THEN
        started := (SELECT max(i) FROM generate_subscripts(tokens, 1) AS i
                    WHERE tokens[i] = 's' || depth);
        IF started IS NULL THEN
            RETURN;
        END IF;
    END IF;
    inside := ARRAY(SELECT substr(t, 2)::bigint
                    FROM unnest(tokens[started + 1:]) WITH ORDINALITY AS u(t, i)
                    WHERE t ~ '^c[0-9]{1,18}$'
                    ORDER BY i);
    IF cardinality(inside) > 0 THEN
        -- The statements captured inside this one, if they are this transaction's, and this
        -- one: their rows are the places (in publishing order: by statement number, which is
        -- capture order, then ordinal), this statement's events go first, then theirs as they
        -- stand. Only contents move; the keys and each statement's row count stay.
        WITH moved AS (
            SELECT ch.statement FROM pgcast.assignment_changes ch
            WHERE ch.statement = ANY (inside) AND ch.ordinal = 1
              AND ch.nested_xact = pg_current_xact_id()
        ), involved AS (
            SELECT ch.statement, ch.ordinal, ch.op, ch.assignment_id, ch.event
            FROM pgcast.assignment_changes ch
            WHERE ch.statement = own OR ch.statement IN (SELECT m.statement FROM moved m)
        ), places AS (
            SELECT v.statement, v.ordinal,
                   row_number() OVER (ORDER BY v.statement, v.ordinal) AS n
            FROM involved v
        ), events AS (
            SELECT v.op, v.assignment_id, v.event,
                   row_number() OVER (ORDER BY v.statement <> own, v.statement, v.ordinal) AS n
            FROM involved v
        )
        UPDATE pgcast.assignment_changes ch
        SET op = e.op, assignment_id = e.assignment_id, event = e.event
        FROM places p JOIN events e ON e.n = p.n
        WHERE ch.statement = p.statement AND ch.ordinal = p.ordinal
          AND EXISTS (SELECT 1 FROM moved);
    END IF;
    IF depth = 0 THEN
        PERFORM set_config('pgcast.nesting', '', true);
    ELSE
        -- For the statement this one runs inside: this statement's number, after those of the
        -- statements inside it, in place of its start.
        UPDATE pgcast.assignment_changes SET nested_xact = pg_current_xact_id()
        WHERE statement = own AND ordinal = 1;
        PERFORM set_config('pgcast.nesting',
                           array_to_string(tokens[:started - 1]
                                           || ARRAY(SELECT 'c' || s FROM unnest(inside) AS s)
                                           || ('c' || own), ' '),
                           true);
    END IF;
END
$$;
COMMENT ON FUNCTION pgcast.order_nested_statements(bigint) IS
    'Called by pgcast.capture_assignment_changes() after it captured statement `own`, when that '
    'statement ran inside a trigger or something is noted in the transaction''s setting '
    'pgcast.nesting: gives the statement''s events the first places among the rows of the '
    'statements that ran inside it (those noted since it started whose first row names this '
    'transaction), so that a transaction''s events follow the order its statements started in; '
    'then notes `own` for the statement it runs inside, if any. Since version 8. EXECUTE is not '
    'granted to anyone.';
REVOKE EXECUTE ON FUNCTION pgcast.order_nested_statements(bigint) FROM PUBLIC;

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
            JOIN (SELECT row_number() OVER () AS pair, r.id, r.session_id,
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
    -- Version 8. A statement run inside another statement's trigger is captured first: put
    -- this statement's events before theirs (pgcast.order_nested_statements()). Nothing to do,
    -- and one setting read, for a statement nothing ran inside and that runs inside nothing.
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
        RAISE NOTICE 'pgcast: not the owner of %, its triggers stay as they are (correct; '
            'version 2''s row trigger is slower); run `pgcast migrate` again as a member of its '
            'owner role', source;
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
        'pgcast: notes where a statement run inside a trigger starts, so that a statement''s '
        'events are logged before those of the statements that ran inside it '
        '(pgcast.note_statement_start()). Without it those come first, as before version 8; '
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
