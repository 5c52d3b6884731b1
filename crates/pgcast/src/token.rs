//! `pgcast token`: a JWT for a user, signed with the configured secret, for operators and
//! tests. The gateway's own minting function is used, so the claims are exactly those it
//! verifies.

use std::time::Duration;

use pgcast_events::{Principal, Role};
use uuid::Uuid;

use crate::config::Secret;
use crate::PgcastError;

/// The principal a token is minted for; a workshop belongs only to a mechanic.
pub fn principal(sub: Uuid, role: Role, workshop: Option<Uuid>) -> Result<Principal, PgcastError> {
    if workshop.is_some() && role != Role::Mechanic {
        return Err(PgcastError::Usage(
            "--workshop applies only to --role mechanic",
        ));
    }
    Ok(Principal {
        user_id: sub,
        role,
        workshop_id: workshop,
    })
}

/// Signs an HS256 token for `who`, valid for `ttl`.
pub fn mint(secret: &Secret, who: &Principal, ttl: Duration) -> Result<String, PgcastError> {
    pgcast_gateway::mint_token(secret.expose(), who, ttl).map_err(PgcastError::Token)
}
