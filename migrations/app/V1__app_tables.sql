-- Application tables of the mechanics marketplace, as used by `pgcast demo` and the tests.
-- In production the application owns these tables and this migration set is skipped
-- (`pgcast migrate --realtime-only`).

CREATE EXTENSION IF NOT EXISTS pgcrypto; -- gen_random_uuid() before PostgreSQL 13

CREATE TABLE IF NOT EXISTS sessions (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id uuid NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('free', 'paid')),
    status      text NOT NULL DEFAULT 'open',
    created_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE sessions IS
    'A customer''s help session. Owned by the application; pgcast reads customer_id to decide '
    'who may subscribe to session:<id>.';

CREATE TABLE IF NOT EXISTS session_assignments (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    session_id      uuid NOT NULL,
    mechanic_id     uuid,
    workshop_id     uuid,
    status          text NOT NULL CHECK (status IN
                        ('queued', 'offered', 'accepted', 'declined', 'cancelled', 'expired', 'completed')),
    urgent          boolean NOT NULL DEFAULT false,
    customer_name   text,
    vehicle_summary text,
    concern         text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE session_assignments IS
    'Who works on a session: queued for everybody (no workshop, no mechanic), for one workshop, '
    'or offered to one mechanic; then accepted, declined, cancelled, expired or completed. Any '
    'service may write it; pgcast turns every committed change into an event.';

CREATE INDEX IF NOT EXISTS session_assignments_session_id ON session_assignments (session_id);
CREATE INDEX IF NOT EXISTS session_assignments_open ON session_assignments (status)
    WHERE status IN ('queued', 'offered');
