-- pgcast demo: does this customer have an open session, i.e. an assignment that is queued,
-- offered or accepted (what the customer page's active-session banner shows)?
-- $1 = customer id.
SELECT EXISTS (
    SELECT 1
    FROM session_assignments a
    JOIN sessions s ON s.id = a.session_id
    WHERE s.customer_id = $1
      AND a.status IN ('queued', 'offered', 'accepted')
)
