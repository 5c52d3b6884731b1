-- pgcast doctor: whether this session is encrypted, as the server sees it (a pooler or proxy
-- in between would show its own link here, not pgcast's). Readable by any role for its own
-- session.
SELECT ssl, version, cipher, bits
FROM pg_stat_ssl
WHERE pid = pg_backend_pid()
