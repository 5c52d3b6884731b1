-- pgcast: the listener's probe, on its LISTEN connection, when it connects and after every
-- silence. Answering shows the connection is alive; the value says whether commits ring no
-- doorbell because PostgreSQL's notification queue has reached pgcast.doorbell_queue_limit()
-- (a session holding its place in the queue lets it fill), in which case the listener reads the
-- log on a short timer instead of waiting for doorbells. It does so from four fifths of that
-- limit: commits check the queue as they publish, the probe only every 0.5 s, and a queue that
-- hovers at the limit would otherwise leave commits that rang no doorbell unread until the
-- listener's 15 s idle read.
-- $1 = the connection's application_name with the listener's position
-- ('pgcast-listener:1234'), so that `pgcast doctor` can tell how far behind each listener is.
SELECT pg_notification_queue_usage() >= pgcast.doorbell_queue_limit() * 0.8 AS doorbells_off,
       set_config('application_name', $1, false)
