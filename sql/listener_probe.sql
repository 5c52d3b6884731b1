-- pgcast: the listener's probe, on its LISTEN connection, when it connects and after every
-- silence. Answering shows the connection is alive; the value says whether commits ring no
-- doorbell because PostgreSQL's notification queue has reached pgcast.doorbell_queue_limit()
-- (a session holding its place in the queue lets it fill), in which case the listener reads the
-- log on a short timer instead of waiting for doorbells.
-- $1 = the connection's application_name with the listener's position
-- ('pgcast-listener:1234'), so that `pgcast doctor` can tell how far behind each listener is.
SELECT pg_notification_queue_usage() >= pgcast.doorbell_queue_limit() AS doorbells_off,
       set_config('application_name', $1, false)
