-- Version 5: the doorbell rings only while PostgreSQL's notification queue has room;
-- retention deletes at most a batch of events per call, however large a statement was; and an
-- assignment that moves (an UPDATE of id or session_id) is logged as a delete and an insert.
--
-- The doorbell.
-- PostgreSQL keeps every notification until the slowest listening session of the cluster has
-- read past it, and once its queue (8 GB) is full every transaction that notifies fails at
-- commit ("too many notifications in the NOTIFY queue"). pgcast's own listener reads its
-- doorbells at once, but any role that can connect may LISTEN on some channel and then stay
-- idle in a transaction: its place in the queue stops moving, and anybody's NOTIFYs fill the
-- queue behind it. With a doorbell rung at every commit, that would make every write to
-- session_assignments fail. A write must never fail because of notification, so past
-- pgcast.doorbell_queue_limit() the commit skips its doorbell. Nothing is lost: the events are
-- in the log, and pgcast's listener, which checks the queue whenever it has heard no doorbell
-- for a while, reads the log on a short timer for as long as the queue is that full.

CREATE FUNCTION pgcast.doorbell_queue_limit() RETURNS double precision
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT 0.5::double precision';
COMMENT ON FUNCTION pgcast.doorbell_queue_limit() IS
    'The share of PostgreSQL''s notification queue (pg_notification_queue_usage()) at and above '
    'which pgcast.publish_statement() rings no doorbell, so that a queue held full by another '
    'session''s listener never fails a write; pgcast''s listener then reads the log on a short '
    'timer instead. A constant, read by the trigger and by the listener alike.';

-- Publish, per statement, at commit: version 4's function, with the doorbell guarded.
CREATE OR REPLACE FUNCTION pgcast.publish_statement() RETURNS trigger
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
    -- transaction rings once however many statements it runs. Not while the notification
    -- queue is filling up (a session holding it fills it for everyone, and a full queue fails
    -- the commit): the listener then finds the events by reading the log on a timer.
    IF pg_notification_queue_usage() < pgcast.doorbell_queue_limit() THEN
        PERFORM pg_notify('pgcast_assignments', '');
    END IF;

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
    'with an empty payload (a doorbell) unless pg_notification_queue_usage() has reached '
    'pgcast.doorbell_queue_limit(), takes the pgcast.commit_order lock, reserves one block of '
    'positions from pgcast.event_position for the statement''s rows and records it in '
    'pgcast.committed_statements. SECURITY DEFINER; EXECUTE is not granted to anyone.';
REVOKE EXECUTE ON FUNCTION pgcast.publish_statement() FROM PUBLIC;

-- Retention, by events. Version 4 deleted up to batch_size whole statements per call, so one
-- call could delete any number of events (a 1,000,000-row statement, or 1,000 statements of
-- 1,000 rows): past the pruner's statement timeout that call failed, and as the same batch was
-- tried again every minute, the log was never pruned again. Now a call deletes the oldest due
-- statements whose events add up to at most batch_size; a statement with more events than
-- that loses its oldest batch_size events per call, pruned_through moving within it, and its
-- row in pgcast.committed_statements goes with its last events.
CREATE OR REPLACE FUNCTION pgcast.prune_events(retention interval, batch_size integer DEFAULT 1000)
    RETURNS integer
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    deleted integer;
    highest bigint;
    oldest pgcast.committed_statements;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'pgcast.prune_events(): batch_size must be at least 1, not %', batch_size;
    END IF;
    -- One pruner at a time across gateway replicas; the others skip this round. The row lock
    -- needs UPDATE on pgcast.log_state, which only pgcast's role has.
    PERFORM 1 FROM pgcast.log_state FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    -- Whole statements, oldest first, while they and all before them are due and their events
    -- fit in the batch. Reads at most batch_size statements (primary key order): each has at
    -- least one event.
    WITH oldest_first AS (
        SELECT c.last_position, c.statement,
               every(c.committed_at < now() - retention)
                   OVER (ORDER BY c.last_position) AS due_through,
               sum(c.last_position - c.first_position + 1)
                   OVER (ORDER BY c.last_position) AS events_through
        FROM (SELECT * FROM pgcast.committed_statements
              ORDER BY last_position
              LIMIT batch_size) c
    ), doomed AS (
        SELECT o.last_position, o.statement
        FROM oldest_first o
        WHERE o.due_through AND o.events_through <= batch_size
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
    IF highest IS NULL THEN
        -- Nothing fitted: the oldest statement, if due, has more events than a batch. Its
        -- oldest batch_size events (ordinals are 1 .. its event count).
        SELECT * INTO oldest
        FROM pgcast.committed_statements
        ORDER BY last_position
        LIMIT 1;
        IF FOUND AND oldest.committed_at < now() - retention THEN
            WITH gone AS (
                DELETE FROM pgcast.assignment_changes ch
                WHERE ch.statement = oldest.statement
                  AND ch.ordinal < (SELECT min(r.ordinal) FROM pgcast.assignment_changes r
                                    WHERE r.statement = oldest.statement) + batch_size
                RETURNING ch.ordinal
            )
            SELECT count(*), oldest.first_position + max(ordinal) - 1 INTO deleted, highest
            FROM gone;
            IF highest IS NULL OR highest >= oldest.last_position THEN
                -- Its last events went (or it had none left): so does the statement.
                DELETE FROM pgcast.committed_statements WHERE last_position = oldest.last_position;
                highest := oldest.last_position;
            END IF;
        END IF;
    END IF;
    UPDATE pgcast.log_state
    SET last_pruned_at = now(),
        prune_retention = retention,
        pruned_through = greatest(pruned_through, coalesce(highest, 0));
    RETURN deleted;
END
$$;
COMMENT ON FUNCTION pgcast.prune_events(interval, integer) IS
    'Deletes, oldest first, committed statements older than retention '
    '(pgcast.committed_statements) with their rows (pgcast.assignment_changes), at most '
    'batch_size events per call: whole statements while they fit, else the oldest batch_size '
    'events of the oldest statement. Records the highest deleted position in '
    'pgcast.log_state.pruned_through, the time of the run in last_pruned_at and the retention in '
    'prune_retention. Returns how many events went; call again until 0. Small batches keep '
    'locks and statements short; concurrent callers skip instead of waiting. EXECUTE is not '
    'granted to anyone but the owner.';
REVOKE EXECUTE ON FUNCTION pgcast.prune_events(interval, integer) FROM PUBLIC;

-- An assignment that moves: an UPDATE that changes a row's id or session_id is logged as two
-- events, the old row deleted (with its old session's customer) and the new row inserted. As one
-- update event, named by the new row only, whoever could see the old one (its session's
-- customer, a mechanic who was a member of that session through it) was never told it left, and
-- a mechanic kept the old session's membership. The capture functions are written again with
-- that; the sessions table is the one version 4 recorded, read back from its function's source.
DO $migration$
DECLARE
    customer_expr  text := 'NULL::uuid';
    old_customer   text := 'NULL::uuid';
    v4_source      text;
    sessions_table text;
BEGIN
    SELECT p.prosrc INTO v4_source FROM pg_proc p
    WHERE p.oid = 'pgcast.capture_assignment_changes()'::regprocedure;
    sessions_table := substring(v4_source FROM
        '\(SELECT c\.customer_id FROM (.+?) c WHERE c\.id OPERATOR');
    IF sessions_table IS NULL OR to_regclass(sessions_table) IS NULL THEN
        RAISE WARNING 'pgcast: version 4 recorded no sessions table; events will not name their '
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
               jsonb_build_object('op', 'insert', 'row', n.row_data, 'old', NULL,
                                  'customer_id', %1$s)
        FROM s, (SELECT row_number() OVER () AS ordinal, count(*) OVER () AS rows,
                        r.id, r.session_id, to_jsonb(r) AS row_data
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
                         to_jsonb(r) AS row_data
                  FROM new_rows r) n
            JOIN (SELECT row_number() OVER () AS pair, r.id, r.session_id,
                         to_jsonb(r) AS row_data,
                         jsonb_build_object('status', r.status, 'mechanic_id', r.mechanic_id,
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
               jsonb_build_object('op', x.op, 'row', x.row_data, 'old', x.old_data,
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
    prior jsonb;
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
               jsonb_build_object('op', 'delete', 'row', to_jsonb(o),
                                  'old', jsonb_build_object('status', o.status,
                                                            'mechanic_id', o.mechanic_id,
                                                            'workshop_id', o.workshop_id),
                                  'customer_id', %2$s)
        FROM pgcast.log_state st
        WHERE st.source_table = TG_RELID;
        op := 'insert';
    ELSIF TG_OP <> 'INSERT' THEN
        prior := jsonb_build_object(
            'status', OLD.status, 'mechanic_id', OLD.mechanic_id, 'workshop_id', OLD.workshop_id);
    END IF;
    -- The join with log_state admits only the table pgcast was installed on. The row queues
    -- pgcast_publish_at_commit, which fires in this same commit.
    INSERT INTO pgcast.assignment_changes
        (statement, ordinal, statement_rows, op, assignment_id, event)
    SELECT nextval('pgcast.capture_statement'), 1, 1, op, n.id,
           jsonb_build_object('op', op, 'row', to_jsonb(n), 'old', prior,
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
COMMENT ON TABLE pgcast.assignment_changes IS
    'The content of the event log: one row per event, written by '
    'pgcast.capture_assignment_changes() when its statement ran: a row of session_assignments '
    'the statement changed, or two for a row whose id or session_id changed (the old row''s '
    'delete, the new row''s insert). A row is an event once its statement is in '
    'pgcast.committed_statements (at commit); read them together through the view '
    'pgcast.assignment_events. Pruned with its statement by pgcast.prune_events(), a batch of '
    'events at a time. Grant nothing on it: a role that could write here could forge events.';
COMMENT ON COLUMN pgcast.assignment_changes.ordinal IS
    'Order of the event within its statement, from 1: its position is the statement''s '
    'first_position + ordinal - 1.';
COMMENT ON COLUMN pgcast.assignment_changes.statement_rows IS
    'On the statement''s first event only (else null): how many events the statement wrote. '
    'That row queues the deferred pgcast_publish_at_commit trigger, which draws that many '
    'positions.';
COMMENT ON FUNCTION pgcast.capture_assignment_changes() IS
    'Statement-level trigger of session_assignments (pgcast_capture_insert, _update, _delete): '
    'writes every row the statement changed to pgcast.assignment_changes with one INSERT ... '
    'SELECT from the transition tables, under one statement number; an UPDATE that changes a '
    'row''s id or session_id is written as the old row''s delete and the new row''s insert. '
    'pgcast.publish_statement() gives them their positions at commit. Refuses to run for any '
    'table but pgcast.log_state.source_table. SECURITY DEFINER; EXECUTE is not granted to '
    'anyone. TRUNCATE is not captured.';
COMMENT ON FUNCTION pgcast.emit_assignment_event() IS
    'Version 2''s deferred row trigger of session_assignments, kept only for an install '
    'upgraded by a role that did not own the table (see pgcast.install_capture()): at commit, '
    'writes the change (with its session''s customer) to pgcast.assignment_changes as a '
    'statement of one row (a change of id or session_id as two: the old row''s delete, then the '
    'new row''s insert; seeing one row at a time, it logs two rows that swap ids as a delete '
    'after an insert of the same id, and a client keyed by id loses that row until its next '
    'change), which pgcast.publish_statement() publishes in the same commit. '
    'Refuses to run for any table but pgcast.log_state.source_table. SECURITY DEFINER; EXECUTE '
    'is not granted to anyone.';

CREATE OR REPLACE FUNCTION pgcast.version() RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT 5';
