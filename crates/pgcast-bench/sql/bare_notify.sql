-- pgcast-bench only: the database-alone baseline, the trigger teams write by hand. A plain
-- AFTER row trigger that NOTIFYs the whole row as JSON on its own channel, so a bare LISTEN
-- connection (and the relays of the "other servers" scenario) can time each commit without
-- pgcast: pgcast's own NOTIFY is a doorbell without content and cannot be matched to a commit.
-- Installed while a baseline reader or relay runs and dropped after; pgcast and the baseline
-- see the same commits, and the extra NOTIFY costs both alike.
CREATE OR REPLACE FUNCTION public.pgcast_bench_bare_notify() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('pgcast_bench_bare', to_jsonb(NEW)::text);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS pgcast_bench_bare_notify ON session_assignments;
CREATE TRIGGER pgcast_bench_bare_notify
    AFTER INSERT OR UPDATE ON session_assignments
    FOR EACH ROW EXECUTE FUNCTION public.pgcast_bench_bare_notify();
