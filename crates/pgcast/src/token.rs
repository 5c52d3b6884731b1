//! `pgcast token`: a JWT for a user, signed with the configured secret and stamped with the
//! configured issuer and audience, for operators and tests. The gateway's own minter is used,
//! so the claims are exactly those it verifies.

use std::time::Duration;

use pgcast_events::{Principal, Role};
use pgcast_gateway::TokenMinter;
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

/// Signs an HS256 token for `who`, valid for `ttl`, stamped with `issuer` (`iss`) and
/// `audience` (`aud`) when given.
pub fn mint(
    secret: &Secret,
    who: &Principal,
    ttl: Duration,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<String, PgcastError> {
    let mut minter = TokenMinter::new(secret.expose()).map_err(PgcastError::Token)?;
    if let Some(issuer) = issuer {
        minter = minter.with_issuer(issuer).map_err(PgcastError::Token)?;
    }
    if let Some(audience) = audience {
        minter = minter.with_audience(audience).map_err(PgcastError::Token)?;
    }
    minter.mint(who, ttl).map_err(PgcastError::Token)
}
