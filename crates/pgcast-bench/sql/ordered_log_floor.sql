-- pgcast-bench only: the floor of a durable, commit-ordered event log (scenario 9). The least
-- any log that readers resume from must do per changed row, with nothing of pgcast's own: a
-- deferred row trigger that, at commit, takes a lock that orders committers, draws a position
-- and appends to_jsonb(NEW) to a logged table with only its primary key, then rings an empty
-- doorbell. No payload beyond the row, no customer, no staging, no privileges, no pruning
-- index. Its reader (bench `log_floor.rs`) reads the rows after its position at each doorbell.
-- Installed for the scenario and dropped after it; created disabled (the scenario enables one
-- variant at a time).
CREATE TABLE IF NOT EXISTS public.pgcast_bench_log_floor (
    position bigint PRIMARY KEY,
    payload  jsonb  NOT NULL
);
CREATE TABLE IF NOT EXISTS public.pgcast_bench_log_floor_order ();
CREATE SEQUENCE IF NOT EXISTS public.pgcast_bench_log_floor_position;
CREATE OR REPLACE FUNCTION public.pgcast_bench_log_floor_append() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    row_json jsonb := to_jsonb(NEW);
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
