-- pgcast realtime objects, version 2: only the database decides what a client sees.
--
-- * The NOTIFY becomes a doorbell without content: any role that can connect may LISTEN and
--   NOTIFY on any channel, so a notification can be neither private nor trusted. Listeners read
--   every event from the log. One transaction rings once (identical payloads collapse).
-- * The trigger function runs only for the table it was installed on, and nobody but its owner
--   may execute pgcast's functions.
-- * Commit order and pruning use locks on pgcast-owned tables, which a role without privileges
--   on them cannot take (an advisory key can be taken by any role). The commit-order lock is
--   SHARE UPDATE EXCLUSIVE: the strongest locks a role without privileges can hold on a table
--   (ROW SHARE and ROW EXCLUSIVE, taken when a statement naming it is parsed, e.g. kept by
--   PREPARE until that role's transaction ends) do not conflict with it.
-- * Each log row records the customer of its session, so `customer:<id>` subscribers are found
--   without a query per event.

-- The table the trigger serves, and when pruning last ran.
ALTER TABLE pgcast.log_state
    ADD COLUMN source_table regclass,
    ADD COLUMN last_pruned_at timestamptz,
    ADD COLUMN prune_retention interval;
-- The table version 1 installed the trigger on (whatever the search_path is now); a clear
-- error instead of a NULL when that is not exactly one table.
DO $migration$
DECLARE
    tables regclass[];
BEGIN
    SELECT array_agg(t.tgrelid::regclass ORDER BY t.tgrelid) INTO tables
    FROM pg_trigger t
    WHERE t.tgname = 'pgcast_emit_assignment_event'
      AND t.tgfoid = 'pgcast.emit_assignment_event()'::regprocedure;
    IF tables IS NULL THEN
        RAISE EXCEPTION 'pgcast: trigger pgcast_emit_assignment_event not found on any table'
            USING HINT = 'Recreate it on session_assignments as migration V1 does, then migrate '
                         'again.';
    ELSIF cardinality(tables) > 1 THEN
        RAISE EXCEPTION 'pgcast: trigger pgcast_emit_assignment_event is on several tables: %',
            array_to_string(tables::text[], ', ')
            USING HINT = 'Drop it from every table but session_assignments, then migrate again.';
    END IF;
    UPDATE pgcast.log_state SET source_table = tables[1];
END
$migration$;
ALTER TABLE pgcast.log_state ALTER COLUMN source_table SET NOT NULL;
COMMENT ON TABLE pgcast.log_state IS
    'One row: pruned_through (retention), source_table (the table the trigger function serves), '
    'last_pruned_at and prune_retention (the last pruning run). Its row lock, taken with SKIP '
    'LOCKED, lets one pruner work at a time.';
COMMENT ON COLUMN pgcast.log_state.pruned_through IS
    'The highest position ever deleted by retention; a client resuming from a lower position '
    'may have missed events and is told to resync.';
COMMENT ON COLUMN pgcast.log_state.source_table IS
    'The session_assignments table pgcast''s trigger is installed on. The trigger function '
    'refuses to run for any other table.';
COMMENT ON COLUMN pgcast.log_state.last_pruned_at IS
    'When pgcast.prune_events() last ran (whether or not it deleted anything); `pgcast doctor` '
    'reports pruning that has stopped while rows older than prune_retention remain.';
COMMENT ON COLUMN pgcast.log_state.prune_retention IS
    'The retention the last pgcast.prune_events() run was given (`pgcast serve --retention`).';

CREATE TABLE pgcast.commit_order ();
COMMENT ON TABLE pgcast.commit_order IS
    'Holds no rows: the trigger function locks it (SHARE UPDATE EXCLUSIVE) from drawing a '
    'position until its transaction ends, so positions follow commit order. A role without '
    'UPDATE, DELETE or TRUNCATE on it cannot take that lock, and the ROW SHARE / ROW EXCLUSIVE '
    'locks any role with USAGE on schema pgcast can hold on it (e.g. via PREPARE) do not '
    'conflict with it. VACUUM and ANALYZE of this empty table take the same lock for '
    'microseconds. A lock held for more than a few seconds (e.g. after SET CONSTRAINTS ALL '
    'IMMEDIATE in a long transaction) delays every write to session_assignments, and `pgcast '
    'doctor` reports it. Grant nothing on it.';
REVOKE ALL ON pgcast.commit_order FROM PUBLIC;
COMMENT ON SEQUENCE pgcast.event_position IS
    'Source of event positions. Values are drawn only at commit time under the pgcast.commit_order '
    'lock, so they increase in commit order. A transaction that fails after drawing leaves a '
    'hole; readers tolerate holes. Grant nothing on it (setval would break the order).';

-- The function is created here with the application's `sessions` table written into it,
-- schema-qualified (the function's search_path holds only pg_catalog and pg_temp, so nothing
-- an unprivileged role creates can stand in for a table it reads). Without a `sessions` table
-- the log records no customer and `customer:<id>` topics stay empty (a warning says so).
DO $migration$
DECLARE
    sessions_table text;
    customer_expr  text := 'NULL::uuid';
BEGIN
    SELECT format('%I.%I', n.nspname, c.relname) INTO sessions_table
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = to_regclass('sessions');
    IF sessions_table IS NULL THEN
        RAISE WARNING 'pgcast: no sessions table on the search_path; events will not name their '
            'session''s customer and customer:<id> topics will stay empty';
    ELSE
        customer_expr := format(
            '(SELECT s.customer_id FROM %s s WHERE s.id = (row_json ->> ''session_id'')::uuid)',
            sessions_table);
    END IF;
    EXECUTE format($function$
CREATE OR REPLACE FUNCTION pgcast.emit_assignment_event() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    pos      bigint;
    at       timestamptz;
    row_json jsonb;
    old_json jsonb;
BEGIN
    -- Commit order: this is a deferred trigger, so it runs while the transaction commits. The
    -- table lock is held until the transaction ends, so the next committer draws its position
    -- only after this one is visible. NOTIFY already serializes commits, so the lock adds
    -- little. Only pgcast's owner can take it (this function runs as that owner). SHARE UPDATE
    -- EXCLUSIVE conflicts with itself but not with the ACCESS SHARE, ROW SHARE and ROW
    -- EXCLUSIVE locks that any role with USAGE on schema pgcast can take and keep (a PREPAREd
    -- SELECT, SELECT ... FOR UPDATE or INSERT naming the table is locked at parse time, before
    -- the permission check); EXCLUSIVE would wait for them.
    LOCK TABLE pgcast.commit_order IN SHARE UPDATE EXCLUSIVE MODE;
    pos := nextval('pgcast.event_position');
    at := clock_timestamp();

    IF TG_OP = 'DELETE' THEN
        row_json := to_jsonb(OLD);
    ELSE
        row_json := to_jsonb(NEW);
    END IF;
    IF TG_OP <> 'INSERT' THEN
        old_json := jsonb_build_object(
            'status', OLD.status, 'mechanic_id', OLD.mechanic_id, 'workshop_id', OLD.workshop_id);
    END IF;

    -- The join with log_state admits only the table pgcast was installed on.
    INSERT INTO pgcast.assignment_events (position, assignment_id, op, committed_at, payload)
    SELECT pos, (row_json ->> 'id')::uuid, lower(TG_OP), at,
           jsonb_build_object(
               'position', pos, 'op', lower(TG_OP), 'committed_at', at,
               'row', row_json, 'old', old_json,
               'customer_id', %s)
    FROM pgcast.log_state st
    WHERE st.source_table = TG_RELID;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgcast.emit_assignment_event() records only the table it was installed on'
            USING HINT = 'It is the trigger of ' || (SELECT source_table::text FROM pgcast.log_state);
    END IF;

    -- A doorbell: no row data (listeners read the log). Identical payloads collapse, so a
    -- transaction rings once however many rows it writes, and no row is too large to notify.
    PERFORM pg_notify('pgcast_assignments', '');
    RETURN NULL;
END
$body$
$function$, customer_expr);
END
$migration$;
COMMENT ON FUNCTION pgcast.emit_assignment_event() IS
    'Deferred row trigger of session_assignments: at commit, draws a commit-ordered position '
    'under the pgcast.commit_order lock, appends the change (with its session''s customer) to '
    'pgcast.assignment_events and rings channel pgcast_assignments with an empty payload (a '
    'doorbell: listeners read the log; one per transaction). Never rejects a write for the size '
    'of a row. Refuses to run for any table but pgcast.log_state.source_table. SECURITY '
    'DEFINER; EXECUTE is not granted to anyone. TRUNCATE is not captured.';
REVOKE EXECUTE ON FUNCTION pgcast.emit_assignment_event() FROM PUBLIC;

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
        SELECT position FROM pgcast.assignment_events
        WHERE committed_at < now() - retention
        ORDER BY position
        LIMIT batch_size
    ), gone AS (
        DELETE FROM pgcast.assignment_events e USING doomed d
        WHERE e.position = d.position
        RETURNING e.position
    )
    SELECT count(*), max(position) INTO deleted, highest FROM gone;
    UPDATE pgcast.log_state
    SET last_pruned_at = now(),
        prune_retention = retention,
        pruned_through = greatest(pruned_through, coalesce(highest, 0));
    RETURN deleted;
END
$$;
COMMENT ON FUNCTION pgcast.prune_events(interval, integer) IS
    'Deletes at most batch_size log rows older than retention, records the highest deleted '
    'position in pgcast.log_state.pruned_through, the time of the run in last_pruned_at and '
    'the retention in prune_retention. '
    'Returns how many rows went; call again until 0. Small batches keep locks short; concurrent '
    'callers skip instead of waiting. EXECUTE is not granted to anyone but the owner.';
REVOKE EXECUTE ON FUNCTION pgcast.prune_events(interval, integer) FROM PUBLIC;

COMMENT ON TABLE pgcast.assignment_events IS
    'Durable, commit-ordered log of session_assignments changes, and the only source of what '
    'clients receive: listeners read it after every doorbell and after a reconnect, clients '
    'resume from it with `since`. Pruned by pgcast.prune_events() after the retention period.';
COMMENT ON COLUMN pgcast.assignment_events.payload IS
    'The event: position, op, committed_at, row (the row after the change; for a delete the row '
    'before), old (status, mechanic_id, workshop_id before an update or delete, else null) and '
    'customer_id (the customer of the row''s session in sessions at commit, or null).';
-- On the table the trigger is on, whatever the search_path of this run. Commenting a trigger
-- takes ownership of its table, which pgcast's role need not keep after the first install (the
-- application may own session_assignments): without it, version 1's comment stays.
DO $migration$
BEGIN
    IF NOT pg_has_role((SELECT c.relowner FROM pg_class c
                        WHERE c.oid = (SELECT source_table FROM pgcast.log_state)), 'USAGE') THEN
        RAISE NOTICE 'pgcast: not the owner of %, its trigger keeps the comment of version 1',
            (SELECT source_table FROM pgcast.log_state);
        RETURN;
    END IF;
    EXECUTE format(
        'COMMENT ON TRIGGER pgcast_emit_assignment_event ON %s IS %L',
        (SELECT source_table FROM pgcast.log_state),
        'pgcast: records every committed change in pgcast.assignment_events and rings '
        'pgcast_assignments (an empty doorbell). Deferred to commit so positions follow commit '
        'order; SET CONSTRAINTS ALL IMMEDIATE makes it fire at the statement and hold pgcast''s '
        'commit-order lock until the transaction ends. Disabling it silences every live '
        'client; `pgcast doctor` reports that.');
END
$migration$;

CREATE OR REPLACE FUNCTION pgcast.version() RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT 2';
