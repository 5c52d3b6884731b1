-- pgcast doctor: grants that let a role other than pgcast's owner write the log, draw
-- positions, run pgcast's functions or create objects in schema pgcast. No rows = none.
-- A NULL ACL means the default privileges, which for functions include EXECUTE for PUBLIC
-- (hence acldefault). SELECT on the log is a deliberate read grant (e.g. a monitor role) and is
-- not listed.
SELECT format('%s on %s to %s', a.privilege_type, o.object,
              CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END)
FROM (
    SELECT 'function ' || p.oid::regprocedure::text AS object, p.proowner AS owner,
           coalesce(p.proacl, acldefault('f', p.proowner)) AS acl,
           ARRAY['EXECUTE'] AS dangerous
    FROM pg_proc p
    WHERE p.pronamespace = 'pgcast'::regnamespace
      AND p.proname IN ('emit_assignment_event', 'prune_events')
    UNION ALL
    SELECT CASE c.relkind WHEN 'S' THEN 'sequence ' ELSE 'table ' END || c.oid::regclass::text,
           c.relowner,
           coalesce(c.relacl, acldefault(CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END::"char",
                                         c.relowner)),
           CASE c.relkind WHEN 'S' THEN ARRAY['USAGE', 'UPDATE']
                          ELSE ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'TRIGGER'] END
    FROM pg_class c
    WHERE c.relnamespace = 'pgcast'::regnamespace AND c.relkind IN ('r', 'S')
    UNION ALL
    SELECT 'schema pgcast', n.nspowner, coalesce(n.nspacl, acldefault('n', n.nspowner)),
           ARRAY['CREATE']
    FROM pg_namespace n
    WHERE n.nspname = 'pgcast'
) AS o
CROSS JOIN LATERAL aclexplode(o.acl) AS a
WHERE a.grantee <> o.owner
  AND a.privilege_type = ANY (o.dangerous)
ORDER BY 1
