-- pgcast doctor: captured changes that are not events. One row, one column.
-- unpublished: rows of pgcast.assignment_changes whose statement is not in
-- pgcast.committed_statements. A statement's rows and its row there commit together and are
-- pruned together, so in one snapshot every captured row has its statement, unless the
-- statement committed while pgcast_publish_at_commit did not fire (the trigger disabled, or
-- capture firing in replica mode without it): those changes never reached a client, and
-- pruning, which walks committed statements, never removes them. The same anti-join as the
-- DELETE doctor prints, so the count is what it removes.
-- Needs SELECT on pgcast.assignment_changes, or only on its statement column (no event
-- content); without it the query fails with insufficient_privilege and doctor says so. Reads
-- every row of both tables (committed_statements has no index on statement).
SELECT count(*) AS unpublished
FROM pgcast.assignment_changes ch
WHERE NOT EXISTS (SELECT 1 FROM pgcast.committed_statements c WHERE c.statement = ch.statement)
