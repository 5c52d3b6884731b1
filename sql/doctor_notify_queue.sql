-- pgcast doctor: fraction (0..1) of the NOTIFY queue in use. It grows when a listening session
-- does not consume its notifications; at 1 every transaction that notifies fails at commit.
SELECT pg_notification_queue_usage()
