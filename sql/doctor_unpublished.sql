-- pgcast doctor: captured changes that are not events. One row, one column.
-- unpublished: rows of pgcast.assignment_changes beyond the committed statements' blocks of
-- positions. A statement's rows and its block commit together and are pruned together, so in
-- one snapshot the two agree, unless a statement committed while pgcast_publish_at_commit did
-- not fire (the trigger disabled, or capture firing in replica mode without it): those changes
-- never reached a client, and pruning, which walks committed statements, never removes them.
-- Needs SELECT on pgcast.assignment_changes, or only on its statement column (counts, no event
-- content); without it the query fails with insufficient_privilege and doctor says so. Reads
-- every row of both tables.
SELECT (SELECT count(*) FROM pgcast.assignment_changes)
       - (SELECT coalesce(sum(last_position - first_position + 1), 0)::bigint
          FROM pgcast.committed_statements) AS unpublished
