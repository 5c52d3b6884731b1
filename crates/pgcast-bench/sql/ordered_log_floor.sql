-- pgcast-bench only: the floors of a durable, commit-ordered event log (scenario 9).
--
-- The ordered-log floor: the least any log that readers resume from must do per changed row,
-- with nothing of pgcast's own: a deferred row trigger that, at commit, takes a lock that
-- orders committers, draws a position and appends to_json(NEW) to a logged table with only
-- its primary key, then rings an empty doorbell. No payload beyond the row, no customer, no
-- staging, no privileges, no pruning index.
--
-- The event-content floor: the same trigger, appending the content each of pgcast's log rows
-- carries (op, the row, the old status/mechanic/workshop, the session's customer looked up in
-- sessions, position and commit time), built before the lock, and running as its owner with a
-- fixed search_path (SECURITY DEFINER), as the trigger of a log that writers may not write
-- themselves must (pgcast's also refuses other tables and grants EXECUTE to nobody; neither
-- costs a write anything). What a log of pgcast's events costs when nothing else is added, row
-- by row: the lock is held through every row after a transaction's first. @SESSIONS@ is the
-- application's sessions table, schema-qualified (bench `log_floor.rs` fills it in).
--
-- Both append to one table and ring one channel; one reader (bench `log_floor.rs`) reads the
-- rows after its position at each doorbell. Both store json, as pgcast's log does since its
-- schema version 7 (text written and read as it is; jsonb would be parsed on the way in and
-- printed on the way out). Installed for the scenario and dropped after it;
-- created disabled (the scenario enables one variant at a time).
-- Made afresh: a table left by a run that did not finish may have another shape.
DROP TABLE IF EXISTS public.pgcast_bench_log_floor;
CREATE TABLE public.pgcast_bench_log_floor (
    position bigint PRIMARY KEY,
    payload  json   NOT NULL
);
CREATE TABLE IF NOT EXISTS public.pgcast_bench_log_floor_order ();
CREATE SEQUENCE IF NOT EXISTS public.pgcast_bench_log_floor_position;
CREATE OR REPLACE FUNCTION public.pgcast_bench_log_floor_append() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    row_json json := to_json(NEW);
BEGIN
    PERFORM pg_notify('pgcast_bench_log_floor', '');
    LOCK TABLE public.pgcast_bench_log_floor_order IN SHARE UPDATE EXCLUSIVE MODE;
    INSERT INTO public.pgcast_bench_log_floor (position, payload)
    VALUES (nextval('public.pgcast_bench_log_floor_position'), row_json);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS pgcast_bench_log_floor ON session_assignments;
CREATE CONSTRAINT TRIGGER pgcast_bench_log_floor
    AFTER INSERT OR UPDATE ON session_assignments
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION public.pgcast_bench_log_floor_append();
ALTER TABLE session_assignments DISABLE TRIGGER pgcast_bench_log_floor;
REVOKE EXECUTE ON FUNCTION public.pgcast_bench_log_floor_append() FROM PUBLIC;
CREATE OR REPLACE FUNCTION public.pgcast_bench_content_floor_append() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    row_json json := to_json(NEW);
    old_json json := CASE WHEN TG_OP = 'UPDATE' THEN json_build_object(
                         'status', OLD.status, 'mechanic_id', OLD.mechanic_id,
                         'workshop_id', OLD.workshop_id) END;
    customer uuid := (SELECT s.customer_id FROM @SESSIONS@ s WHERE s.id = NEW.session_id);
    pos bigint;
    at  timestamptz;
BEGIN
    PERFORM pg_notify('pgcast_bench_log_floor', '');
    LOCK TABLE public.pgcast_bench_log_floor_order IN SHARE UPDATE EXCLUSIVE MODE;
    pos := nextval('public.pgcast_bench_log_floor_position');
    at := clock_timestamp();
    INSERT INTO public.pgcast_bench_log_floor (position, payload)
    VALUES (pos, json_build_object('position', pos, 'committed_at', at, 'op', lower(TG_OP),
                                   'row', row_json, 'old', old_json, 'customer_id', customer));
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS pgcast_bench_content_floor ON session_assignments;
CREATE CONSTRAINT TRIGGER pgcast_bench_content_floor
    AFTER INSERT OR UPDATE ON session_assignments
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION public.pgcast_bench_content_floor_append();
ALTER TABLE session_assignments DISABLE TRIGGER pgcast_bench_content_floor;
REVOKE EXECUTE ON FUNCTION public.pgcast_bench_content_floor_append() FROM PUBLIC;
