-- pgcast doctor: privileges that let a role other than pgcast's owner write the log, draw or
-- reset positions, run pgcast's functions, take or block pgcast's locks, or create objects in
-- schema pgcast. One row per role and object, e.g.
-- 'INSERT, DELETE on table pgcast.assignment_changes to app'. No rows = none.
--
-- Effective privileges are checked (has_*_privilege), not only the ACLs: a role also gets them
-- from a role it is a member of, e.g. the predefined pg_write_all_data. Not listed: superusers
-- (they bypass every check; pgcast needs none), the owner of each object and the roles that are
-- members of that owner (they are the owner), and predefined roles themselves (their members
-- are listed instead).
--
-- Why each privilege is dangerous:
--   functions: EXECUTE on the SECURITY DEFINER trigger functions (capture_assignment_changes,
--     capture_truncate, publish_statement, and version 2's emit_assignment_event) lets a role
--     attach them to
--     a table of its own and append to the log; on prune_events it lets a role delete the log;
--     install_capture is the migration's trigger swap, for pgcast's owner only;
--     note_statement_start and order_nested_statements (version 8) are parts of the capture,
--     called by its triggers only.
--   tables: INSERT/UPDATE/DELETE/TRUNCATE write the log or its state; UPDATE, DELETE, TRUNCATE
--     (and MAINTAIN from PostgreSQL 17) also allow LOCK TABLE in any mode, i.e. holding the
--     commit-order lock; TRIGGER attaches code that runs as pgcast's owner inside its trigger;
--     REFERENCES lets a role's foreign key hold SHARE ROW EXCLUSIVE on the table and KEY SHARE
--     row locks on log_state, stalling commits or pruning.
--   sequence: UPDATE (setval) breaks the order of positions; USAGE draws positions.
--   schema: CREATE lets a role add objects to pgcast's schema.
--   PUBLIC only: SELECT on the log (the view pgcast.assignment_events or the two tables it
--     joins) would show every event to every role that can connect.
-- SELECT, INSERT, UPDATE and REFERENCES can also be granted on single columns, and a column is
-- enough to do harm (UPDATE of first_position reorders the log, INSERT of a few columns forges
-- an event): for those the check is has_any_column_privilege, which a table grant satisfies too.
WITH objects AS (
    SELECT 'function'::text AS kind, 'function ' || p.oid::regprocedure::text AS object,
           p.oid, p.proowner AS owner, ARRAY['EXECUTE'] AS dangerous,
           '{}'::text[] AS dangerous_for_public
    FROM pg_proc p
    WHERE p.pronamespace = to_regnamespace('pgcast')
      AND p.proname IN ('emit_assignment_event', 'capture_assignment_changes',
                        'publish_statement', 'install_capture', 'prune_events',
                        'note_statement_start', 'order_nested_statements',
                        'capture_truncate')
    UNION ALL
    SELECT 'table', 'table ' || c.oid::regclass::text, c.oid, c.relowner,
           ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'TRIGGER', 'REFERENCES']
               || CASE WHEN current_setting('server_version_num')::int >= 170000
                       THEN ARRAY['MAINTAIN'] ELSE '{}'::text[] END,
           CASE WHEN c.relname IN ('assignment_changes', 'committed_statements')
                THEN ARRAY['SELECT'] ELSE '{}'::text[] END
    FROM pg_class c
    WHERE c.relnamespace = to_regnamespace('pgcast') AND c.relkind IN ('r', 'p')
    UNION ALL
    SELECT 'view', 'view ' || c.oid::regclass::text, c.oid, c.relowner, '{}'::text[],
           ARRAY['SELECT']
    FROM pg_class c
    WHERE c.relnamespace = to_regnamespace('pgcast') AND c.relkind = 'v'
    UNION ALL
    SELECT 'sequence', 'sequence ' || c.oid::regclass::text, c.oid, c.relowner,
           ARRAY['USAGE', 'UPDATE'], '{}'::text[]
    FROM pg_class c
    WHERE c.relnamespace = to_regnamespace('pgcast') AND c.relkind = 'S'
    UNION ALL
    SELECT 'schema', 'schema pgcast', n.oid, n.nspowner, ARRAY['CREATE'], '{}'::text[]
    FROM pg_namespace n
    WHERE n.nspname = 'pgcast'
), grantees AS (
    -- 'public' is how has_*_privilege names the PUBLIC pseudo-role.
    SELECT 'public'::text AS name, NULL::oid AS oid, 'PUBLIC'::text AS shown
    UNION ALL
    SELECT r.rolname::text, r.oid, r.rolname::text
    FROM pg_roles r
    WHERE NOT r.rolsuper AND r.rolname !~ '^pg_'
), pairs AS (
    SELECT o.*, d.priv, d.ord,
           o.kind IN ('table', 'view')
               AND d.priv IN ('SELECT', 'INSERT', 'UPDATE', 'REFERENCES') AS columnwise
    FROM objects o
    CROSS JOIN LATERAL unnest(o.dangerous || o.dangerous_for_public) WITH ORDINALITY AS d(priv, ord)
), checked AS (
    SELECT p.object, p.priv, p.ord, g.shown,
           g.oid IS NULL                    AS is_public,
           p.priv = ANY (p.dangerous)       AS for_everyone,
           CASE
               WHEN p.columnwise THEN has_any_column_privilege(g.name, p.oid, p.priv)
               WHEN p.kind = 'function' THEN has_function_privilege(g.name, p.oid, p.priv)
               WHEN p.kind IN ('table', 'view') THEN has_table_privilege(g.name, p.oid, p.priv)
               WHEN p.kind = 'sequence' THEN has_sequence_privilege(g.name, p.oid, p.priv)
               WHEN p.kind = 'schema' THEN has_schema_privilege(g.name, p.oid, p.priv)
           END                              AS has_it,
           CASE
               WHEN p.columnwise THEN has_any_column_privilege('public', p.oid, p.priv)
               WHEN p.kind = 'function' THEN has_function_privilege('public', p.oid, p.priv)
               WHEN p.kind IN ('table', 'view') THEN has_table_privilege('public', p.oid, p.priv)
               WHEN p.kind = 'sequence' THEN has_sequence_privilege('public', p.oid, p.priv)
               WHEN p.kind = 'schema' THEN has_schema_privilege('public', p.oid, p.priv)
           END                              AS public_has_it
    FROM pairs p
    CROSS JOIN grantees g
    WHERE g.oid IS NULL OR NOT pg_has_role(g.oid, p.owner, 'MEMBER')
)
-- A privilege PUBLIC has is listed once, for PUBLIC, not again for every role.
SELECT format('%s on %s to %s', string_agg(priv, ', ' ORDER BY ord), object, shown)
FROM checked
WHERE has_it AND (is_public OR (for_everyone AND NOT public_has_it))
GROUP BY object, shown
ORDER BY bool_or(is_public) DESC, shown, object
