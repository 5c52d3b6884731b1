-- pgcast: one retention batch. $1 = retention in seconds (float8), $2 = at most this many events.
-- Returns the number of rows deleted (0 = done, or another replica is pruning right now).
SELECT pgcast.prune_events(make_interval(secs => $1), $2)
