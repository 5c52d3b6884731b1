//! SQL that puts a migrated test database in a state an upgrade can leave behind.

/// Schema version 2's row trigger (its function is still in the schema).
macro_rules! create_version_2_row_trigger {
    () => {
        "
        CREATE CONSTRAINT TRIGGER pgcast_emit_assignment_event
            AFTER INSERT OR UPDATE OR DELETE ON session_assignments
            DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW EXECUTE FUNCTION pgcast.emit_assignment_event();"
    };
}

/// Creates schema version 2's row trigger, which an upgrade run by a role that did not own
/// `session_assignments` could not replace.
pub const CREATE_VERSION_2_ROW_TRIGGER: &str = create_version_2_row_trigger!();

/// Leaves the table as such an upgrade did: the current statement-level capture triggers, the
/// start trigger and the TRUNCATE trigger dropped, version 2's row trigger in their place.
pub const KEEP_VERSION_2_ROW_TRIGGER: &str = concat!(
    "
    DROP TRIGGER pgcast_capture_insert ON session_assignments;
    DROP TRIGGER pgcast_capture_update ON session_assignments;
    DROP TRIGGER pgcast_capture_delete ON session_assignments;
    DROP TRIGGER pgcast_statement_start ON session_assignments;
    DROP TRIGGER pgcast_capture_truncate ON session_assignments;",
    create_version_2_row_trigger!()
);
