-- pgcast realtime objects, version 7: the log keeps each event as json (its text), not jsonb.
--
-- pgcast never asks PostgreSQL to look inside a stored event: it reads each one whole, as text,
-- and decodes it itself. jsonb cost both ways. Writing: to_jsonb() and jsonb_build_object() parse
-- every value into jsonb's binary form and sort its keys, where to_json() and
-- json_build_object() only write text. Reading: event::text prints jsonb back to text, about
-- 3 microseconds of the reading backend per event (100,000 events: 460-490 ms, against
-- 160-190 ms for the same events stored as json), paid by the listener at every doorbell, by
-- every replay and by `pgcast tail`; for json it is the stored text as it is. pgbench
-- (2026-11-29; inserts, fsync off, small tables, interleaved 4 s rounds, no reader): 100-row
-- transactions 4-8 % more commits/s, 1-row transactions about the same within the noise.
-- The stored text is a little shorter too (440 bytes against 461 for a typical event).
--
-- And jsonb refuses what a json column of the application may hold (a \u0000 escape): with
-- to_jsonb such a row failed the capture, and with it the application's write; to_json keeps
-- it as it is. The view pgcast.assignment_events still shows each payload as jsonb, as before
-- (it fails on such a row; pgcast's own reads do not use it).
--
-- The column's type changes in place: PostgreSQL rewrites pgcast.assignment_changes (every
-- retained event) while it holds the table's ACCESS EXCLUSIVE lock, and every write to
-- session_assignments waits at its capture until this migration commits: on a large log,
-- apply it at a quiet time, or prune first.
--
-- Locks. The view goes first (nothing on the write path reads it), then the table: a writer
-- may take the table and pgcast.log_state in either order (a capture's plan, once cached,
-- locks the table it inserts into first), so this migration takes nothing that a writer holding
-- the table could be waiting for. It never locks pgcast.log_state; pgcast.committed_statements
-- only in ACCESS SHARE, for the new view.
DROP VIEW pgcast.assignment_events;
LOCK TABLE pgcast.assignment_changes IN ACCESS EXCLUSIVE MODE;
-- The view read the column; it is made again below, the same but for a cast.
ALTER TABLE pgcast.assignment_changes ALTER COLUMN event TYPE json USING event::json;
COMMENT ON COLUMN pgcast.assignment_changes.event IS
    'The event''s payload but for position and committed_at, which only commit knows: op, row '
    '(the row after the change; for a delete, before), old (status, mechanic_id, workshop_id '
    'before an update or delete, else null) and customer_id (the customer of the row''s session '
    'when the change was written). json, not jsonb (since version 7): written as text and read '
    'by pgcast as text, as it is stored; only the view pgcast.assignment_events parses it.';

CREATE VIEW pgcast.assignment_events AS
SELECT c.first_position + ch.ordinal - 1 AS position,
       ch.assignment_id,
       ch.op,
       c.committed_at,
       jsonb_build_object('position', c.first_position + ch.ordinal - 1,
                          'committed_at', c.committed_at) || ch.event::jsonb AS payload
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

-- The capture functions of version 5, writing json: to_json() for to_jsonb(),
-- json_build_object() for jsonb_build_object(), nothing else changed. The sessions table is the
-- one the installed function names, read back from its source.
DO $migration$
DECLARE
    customer_expr  text := 'NULL::uuid';
    old_customer   text := 'NULL::uuid';
    v6_source      text;
    sessions_table text;
BEGIN
    SELECT p.prosrc INTO v6_source FROM pg_proc p
    WHERE p.oid = 'pgcast.capture_assignment_changes()'::regprocedure;
    sessions_table := substring(v6_source FROM
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
    RETURN NULL;
END
$body$;
$function$, customer_expr, old_customer);

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
    o     record;
    op    text := lower(TG_OP);
    prior json;
BEGIN
    IF TG_OP = 'DELETE' THEN
        n := OLD;
    ELSE
        n := NEW;
    END IF;
    IF TG_OP = 'UPDATE' AND (OLD.id, OLD.session_id) IS DISTINCT FROM (NEW.id, NEW.session_id) THEN
        -- A move: the old row's delete first, a statement of one row of its own.
        o := OLD;
        INSERT INTO pgcast.assignment_changes
            (statement, ordinal, statement_rows, op, assignment_id, event)
        SELECT nextval('pgcast.capture_statement'), 1, 1, 'delete', o.id,
               json_build_object('op', 'delete', 'row', to_json(o),
                                 'old', json_build_object('status', o.status,
                                                          'mechanic_id', o.mechanic_id,
                                                          'workshop_id', o.workshop_id),
                                 'customer_id', %2$s)
        FROM pgcast.log_state st
        WHERE st.source_table = TG_RELID;
        op := 'insert';
    ELSIF TG_OP <> 'INSERT' THEN
        prior := json_build_object(
            'status', OLD.status, 'mechanic_id', OLD.mechanic_id, 'workshop_id', OLD.workshop_id);
    END IF;
    -- The join with log_state admits only the table pgcast was installed on. The row queues
    -- pgcast_publish_at_commit, which fires in this same commit.
    INSERT INTO pgcast.assignment_changes
        (statement, ordinal, statement_rows, op, assignment_id, event)
    SELECT nextval('pgcast.capture_statement'), 1, 1, op, n.id,
           json_build_object('op', op, 'row', to_json(n), 'old', prior,
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
$function$, customer_expr, old_customer);
END
$migration$;

CREATE OR REPLACE FUNCTION pgcast.version() RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT 7';
