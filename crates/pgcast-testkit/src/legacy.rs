//! SQL that puts a migrated test database in a state an upgrade can leave behind.

/// Drops the statement-level capture triggers of the current schema.
pub const DROP_CAPTURE_TRIGGERS: &str = "
    DROP TRIGGER pgcast_capture_insert ON session_assignments;
    DROP TRIGGER pgcast_capture_update ON session_assignments;
    DROP TRIGGER pgcast_capture_delete ON session_assignments;";

/// Creates schema version 2's row trigger, which an upgrade run by a role that did not own
/// `session_assignments` could not replace (its function is still in the schema).
pub const CREATE_VERSION_2_ROW_TRIGGER: &str = "
    CREATE CONSTRAINT TRIGGER pgcast_emit_assignment_event
        AFTER INSERT OR UPDATE OR DELETE ON session_assignments
        DEFERRABLE INITIALLY DEFERRED
        FOR EACH ROW EXECUTE FUNCTION pgcast.emit_assignment_event();";
