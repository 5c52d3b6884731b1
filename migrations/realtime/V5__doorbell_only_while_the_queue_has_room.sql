-- Version 5: the doorbell rings only while PostgreSQL's notification queue has room.
--
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

CREATE OR REPLACE FUNCTION pgcast.version() RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT 5';
