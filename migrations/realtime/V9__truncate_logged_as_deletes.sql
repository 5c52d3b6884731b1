-- pgcast schema version 9: a TRUNCATE of the source table is logged, as a delete of each row.
--
-- Up to version 8 the capture triggers fired for INSERT, UPDATE and DELETE only: a TRUNCATE of
-- session_assignments (or a TRUNCATE ... CASCADE of a table it references) removed every row
-- and logged nothing. Live clients and every `since` resume kept the cards forever, while a
-- fresh snapshot showed none.
--
-- Version 9 adds `pgcast_capture_truncate`, a BEFORE TRUNCATE statement trigger (the rows are
-- still there when it fires) that writes one delete event per row, as a DELETE of all of them
-- would, in one statement of the log: numbered at commit, in commit order, with the same
-- publishing trigger. A rolled-back TRUNCATE rolls its events back with it. A TRUNCATE of a
-- large table therefore costs what logging that many deletes costs.
--
-- Not covered: a TRUNCATE in a REPEATABLE READ or SERIALIZABLE transaction is refused (its
-- snapshot may not show rows committed since, which TRUNCATE removes anyway); `TRUNCATE ONLY`
-- of a table with inheritance children logs their rows too (the trigger cannot tell ONLY
-- from a plain TRUNCATE, which empties them); an application's BEFORE TRUNCATE trigger that
-- fires after this one (by name) and writes the table is logged after the deletes; and
-- pgcast's role reads the table itself now: without SELECT on it every TRUNCATE fails, and
-- row-level security that hides rows from that role leaves their deletes unlogged.
--
-- The trigger is created by pgcast.install_capture(), so only where pgcast's role is a member
-- of the table's owner role (CREATE TRIGGER and COMMENT ON TRIGGER need it); elsewhere a
-- TRUNCATE stays unlogged, `pgcast doctor` warns, and a `pgcast migrate` run as a member of
-- the owner adds it.

-- The function, with the sessions table the installed capture function names (as version 8
-- read it), so that each delete carries its session's customer like any other.
DO $migration$
DECLARE
    customer_expr    text := 'NULL::uuid';
    installed_source text;
    sessions_table   text;
BEGIN
    SELECT p.prosrc INTO installed_source FROM pg_proc p
    WHERE p.oid = 'pgcast.capture_assignment_changes()'::regprocedure;
    sessions_table := substring(installed_source FROM
        '\(SELECT c\.customer_id FROM (.+?) c WHERE c\.id OPERATOR');
    IF sessions_table IS NOT NULL AND to_regclass(sessions_table) IS NOT NULL THEN
        customer_expr := format(
            '(SELECT c.customer_id FROM %s c WHERE c.id OPERATOR(pg_catalog.=) n.session_id)',
            sessions_table);
    END IF;
    EXECUTE format($function$
CREATE OR REPLACE FUNCTION pgcast.capture_truncate() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgcast.log_state st WHERE st.source_table = TG_RELID) THEN
        RAISE EXCEPTION 'pgcast.capture_truncate() records only the table it was installed on'
            USING HINT = 'It is the trigger of ' || (SELECT source_table::text FROM pgcast.log_state);
    END IF;
    -- (A single percent sign below is written twice: this body is a format() template.)
    -- The rows are read with the transaction's snapshot. Under REPEATABLE READ or
    -- SERIALIZABLE that snapshot may predate rows other transactions committed since, which
    -- TRUNCATE (not MVCC-safe) removes all the same: they would go unlogged, and clients would
    -- keep them. Refused rather than lost.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgcast: TRUNCATE of %% is logged only in a READ COMMITTED transaction',
            TG_RELID::regclass
            USING HINT = 'Run it in a READ COMMITTED transaction, or use DELETE: under '
                || current_setting('transaction_isolation') || ' it could remove rows this '
                || 'transaction cannot see, and no client would be told.';
    END IF;
    -- The events of a DELETE of every row (see pgcast.capture_assignment_changes()), read
    -- from the table itself: a TRUNCATE has no transition table. The first row carries the
    -- number of rows, which queues the statement's publishing at commit; an empty table
    -- writes nothing.
    EXECUTE format(%1$L, TG_RELID::regclass);
    RETURN NULL;
END
$body$;
$function$, format($query$
        WITH s AS MATERIALIZED (SELECT nextval('pgcast.capture_statement') AS statement)
        INSERT INTO pgcast.assignment_changes
            (statement, ordinal, statement_rows, op, assignment_id, event)
        SELECT s.statement, n.ordinal, CASE WHEN n.ordinal = 1 THEN n.rows END, 'delete', n.id,
               json_build_object('op', 'delete', 'row', n.row_data, 'old', n.old_data,
                                 'customer_id', %s)
        FROM s,
             (SELECT row_number() OVER () AS ordinal, count(*) OVER () AS rows,
                     r.id, r.session_id, to_json(r) AS row_data,
                     json_build_object('status', r.status, 'mechanic_id', r.mechanic_id,
                                       'workshop_id', r.workshop_id) AS old_data
              FROM %%s r) n
$query$, customer_expr));
END
$migration$;
COMMENT ON FUNCTION pgcast.capture_truncate() IS
    'Trigger function of pgcast_capture_truncate (BEFORE TRUNCATE, FOR EACH STATEMENT) on the '
    'source table: writes a delete event for every row the TRUNCATE removes to '
    'pgcast.assignment_changes, as one statement of the log (published at commit like any '
    'other). Refuses a TRUNCATE outside READ COMMITTED, whose snapshot could miss rows it '
    'removes. Since version 9. SECURITY DEFINER; EXECUTE is not granted to anyone.';
REVOKE EXECUTE ON FUNCTION pgcast.capture_truncate() FROM PUBLIC;

-- It runs as the capture function's owner, whichever member of that role applies this.
DO $owner$
DECLARE
    owner regrole := (SELECT p.proowner::regrole FROM pg_proc p
                      WHERE p.oid = 'pgcast.capture_assignment_changes()'::regprocedure);
BEGIN
    EXECUTE format('ALTER FUNCTION pgcast.capture_truncate() OWNER TO %s', owner);
END
$owner$;

-- Version 8's install_capture(), and the TRUNCATE trigger: creates what is missing, keeps what
-- is there.
CREATE OR REPLACE FUNCTION pgcast.install_capture() RETURNS text
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    source   regclass := (SELECT source_table FROM pgcast.log_state);
    capture  oid := 'pgcast.capture_assignment_changes()'::regprocedure;
    truncator oid := 'pgcast.capture_truncate()'::regprocedure;
    op       text;
BEGIN
    IF (SELECT count(*) FROM pg_trigger t
        WHERE t.tgrelid = source AND t.tgfoid = capture AND NOT t.tgisinternal) = 3
       AND EXISTS (SELECT 1 FROM pg_trigger t
                   WHERE t.tgrelid = source AND t.tgname = 'pgcast_statement_start')
       AND EXISTS (SELECT 1 FROM pg_trigger t
                   WHERE t.tgrelid = source AND t.tgname = 'pgcast_capture_truncate'
                     AND t.tgfoid = truncator)
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
                   WHERE t.tgrelid = source AND t.tgname = 'pgcast_capture_truncate'
                     AND t.tgfoid = truncator) THEN
        IF EXISTS (SELECT 1 FROM pg_trigger t
                   WHERE t.tgrelid = source AND t.tgname = 'pgcast_capture_truncate') THEN
            EXECUTE format('DROP TRIGGER pgcast_capture_truncate ON %s', source);
        END IF;
        EXECUTE format(
            'CREATE TRIGGER pgcast_capture_truncate BEFORE TRUNCATE ON %s '
            'FOR EACH STATEMENT EXECUTE FUNCTION pgcast.capture_truncate()', source);
    END IF;
    EXECUTE format(
        'COMMENT ON TRIGGER pgcast_capture_truncate ON %s IS %L', source,
        'pgcast: logs a TRUNCATE as a delete of every row it removes (pgcast.capture_truncate()), '
        'published at commit like any statement. Without it a TRUNCATE reaches no client; '
        '`pgcast doctor` warns.');
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
    'trigger pgcast_emit_assignment_event), pgcast_statement_start (version 8) and '
    'pgcast_capture_truncate (version 9), creating those missing. Needs membership in the '
    'table''s owner role; without it, changes nothing and returns ''not the owner''. Called by '
    'the migrations and by every `pgcast migrate`. EXECUTE is not granted to anyone.';
REVOKE EXECUTE ON FUNCTION pgcast.install_capture() FROM PUBLIC;

SELECT pgcast.install_capture();

CREATE OR REPLACE FUNCTION pgcast.version() RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT 9';
