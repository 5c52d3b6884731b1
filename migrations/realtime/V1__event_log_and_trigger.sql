-- pgcast realtime objects, version 1.
--
-- Every committed INSERT, UPDATE or DELETE of session_assignments becomes one row of
-- pgcast.assignment_events with a commit-ordered `position`, and one pg_notify on channel
-- 'pgcast_assignments'. The log is the truth; the notification is only a doorbell that lets
-- listeners read the log without polling.

CREATE SCHEMA IF NOT EXISTS pgcast;
COMMENT ON SCHEMA pgcast IS
    'Realtime objects of pgcast (event log, trigger, version marker). Installed by '
    '`pgcast migrate`; never holds application data.';

CREATE FUNCTION pgcast.version() RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT 1';
COMMENT ON FUNCTION pgcast.version() IS
    'Version of the installed pgcast SQL objects. `pgcast serve` and `pgcast doctor` refuse or '
    'warn when it is older than the binary expects.';

CREATE SEQUENCE pgcast.event_position AS bigint;
COMMENT ON SEQUENCE pgcast.event_position IS
    'Source of event positions. Values are drawn only at commit time under an advisory lock, '
    'so they increase in commit order. A transaction that fails after drawing leaves a hole; '
    'readers tolerate holes.';

CREATE TABLE pgcast.assignment_events (
    position      bigint      PRIMARY KEY,
    assignment_id uuid        NOT NULL,
    op            text        NOT NULL CHECK (op IN ('insert', 'update', 'delete')),
    committed_at  timestamptz NOT NULL,
    payload       jsonb       NOT NULL
);
COMMENT ON TABLE pgcast.assignment_events IS
    'Durable, commit-ordered log of session_assignments changes. Listeners catch up from it '
    'after a reconnect, clients resume from it with `since`, and notifications too large for '
    'NOTIFY are read from it. Pruned by pgcast.prune_events() after the retention period.';
COMMENT ON COLUMN pgcast.assignment_events.position IS
    'Strictly increasing in commit order: once position P is visible, no lower position can '
    'commit later.';
COMMENT ON COLUMN pgcast.assignment_events.committed_at IS
    'clock_timestamp() when the writing transaction reached commit; used for retention and '
    'end-to-end latency.';
COMMENT ON COLUMN pgcast.assignment_events.payload IS
    'Exactly the JSON sent with pg_notify: position, op, committed_at, row (the row after the '
    'change; for a delete the row before) and old (status, mechanic_id, workshop_id before an '
    'update or delete, else null).';
CREATE INDEX assignment_events_committed_at ON pgcast.assignment_events (committed_at);

CREATE TABLE pgcast.log_state (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_through bigint  NOT NULL DEFAULT 0
);
INSERT INTO pgcast.log_state DEFAULT VALUES;
COMMENT ON TABLE pgcast.log_state IS
    'One row. pruned_through: the highest position ever deleted by retention; a client '
    'resuming from a lower position may have missed events and is told to resync.';

CREATE FUNCTION pgcast.emit_assignment_event() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pos      bigint;
    at       timestamptz;
    row_json jsonb;
    old_json jsonb;
    payload  jsonb;
    message  text;
BEGIN
    -- Commit order: this is a deferred trigger, so it runs while the transaction commits.
    -- The advisory lock is held until the transaction ends, so the next committer draws its
    -- position only after this one is visible. NOTIFY already serializes commits, so the lock
    -- adds little. Key 7277017001 is reserved for pgcast's commit-order lock.
    PERFORM pg_advisory_xact_lock(7277017001);
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
    payload := jsonb_build_object(
        'position', pos, 'op', lower(TG_OP), 'committed_at', at, 'row', row_json, 'old', old_json);

    INSERT INTO pgcast.assignment_events (position, assignment_id, op, committed_at, payload)
    VALUES (pos, (row_json ->> 'id')::uuid, lower(TG_OP), at, payload);

    -- NOTIFY payloads must stay under 8000 bytes or the whole transaction fails. A large row
    -- is announced by reference; listeners read it from the log.
    message := payload::text;
    IF octet_length(message) >= 8000 THEN
        message := jsonb_build_object('position', pos, 'ref', true)::text;
    END IF;
    PERFORM pg_notify('pgcast_assignments', message);
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION pgcast.emit_assignment_event() IS
    'Deferred row trigger of session_assignments: at commit, draws a commit-ordered position, '
    'appends the change to pgcast.assignment_events and notifies channel pgcast_assignments '
    '(the full event, or {"position":P,"ref":true} when it would exceed the 8000-byte NOTIFY '
    'limit). Never rejects a write for the size of its notification. TRUNCATE is not captured.';

CREATE CONSTRAINT TRIGGER pgcast_emit_assignment_event
    AFTER INSERT OR UPDATE OR DELETE ON session_assignments
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION pgcast.emit_assignment_event();
COMMENT ON TRIGGER pgcast_emit_assignment_event ON session_assignments IS
    'pgcast: records every committed change in pgcast.assignment_events and notifies '
    'pgcast_assignments. Deferred to commit so positions follow commit order. Disabling it '
    'silences every live client; `pgcast doctor` reports that.';

CREATE FUNCTION pgcast.prune_events(retention interval, batch_size integer DEFAULT 1000)
    RETURNS integer
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    deleted integer;
    highest bigint;
BEGIN
    -- One pruner at a time across gateway replicas; the others skip this round.
    -- Key 7277017002 is reserved for pgcast's pruning lock.
    IF NOT pg_try_advisory_xact_lock(7277017002) THEN
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
    IF deleted > 0 THEN
        UPDATE pgcast.log_state SET pruned_through = greatest(pruned_through, highest);
    END IF;
    RETURN deleted;
END
$$;
COMMENT ON FUNCTION pgcast.prune_events(interval, integer) IS
    'Deletes at most batch_size log rows older than retention and records the highest deleted '
    'position in pgcast.log_state. Returns how many rows went; call again until 0. Small '
    'batches keep locks short; concurrent callers skip instead of waiting.';
