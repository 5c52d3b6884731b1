//! Who the tests play and the tokens they carry: principals of each role, HS256 tokens minted
//! here as any identity provider would (independently of the gateway's own minter, so a change
//! to what the gateway accepts shows up), and a token's claims read without verifying it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use pgcast_events::{Principal, Role};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::base64url;

/// How long [`token`] tokens live: longer than any test.
pub const TEN_MINUTES: Duration = Duration::from_secs(600);

/// A new user of `role`, without a workshop.
pub fn principal(role: Role) -> Principal {
    Principal {
        user_id: Uuid::new_v4(),
        role,
        workshop_id: None,
    }
}

/// A new mechanic, of `workshop` or freelance.
pub fn mechanic(workshop: Option<Uuid>) -> Principal {
    Principal {
        workshop_id: workshop,
        ..principal(Role::Mechanic)
    }
}

/// A new customer.
pub fn customer() -> Principal {
    principal(Role::Customer)
}

/// A new service (sees every event).
pub fn service() -> Principal {
    principal(Role::Service)
}

/// An HS256 token signed with `secret` for `who`, valid from now for `ttl`: `sub`, `role`,
/// `workshop_id` (when set), `iat` and `exp`, as the README's token section describes.
pub fn mint(secret: &[u8], who: &Principal, ttl: Duration) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    let mut claims = json!({
        "sub": who.user_id,
        "role": who.role.as_str(),
        "iat": now.as_secs(),
        "exp": (now + ttl).as_secs(),
    });
    if let Some(workshop) = who.workshop_id {
        claims["workshop_id"] = json!(workshop);
    }
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing cannot fail")
}

/// A token signed with `secret` for a new user of `role`, valid for ten minutes.
pub fn token(secret: &[u8], role: Role) -> String {
    mint(secret, &principal(role), TEN_MINUTES)
}

/// The claims of a JWT, read without verifying its signature.
pub fn claims(token: &str) -> Value {
    let payload = token
        .split('.')
        .nth(1)
        .unwrap_or_else(|| panic!("not a JWT: {token}"));
    let bytes =
        base64url::decode(payload).unwrap_or_else(|| panic!("payload not base64url: {payload}"));
    serde_json::from_slice(&bytes).expect("JSON claims")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_claims_read_back() {
        let who = mechanic(Some(Uuid::new_v4()));
        let claims = claims(&mint(
            b"0123456789abcdef0123456789abcdef",
            &who,
            TEN_MINUTES,
        ));
        assert_eq!(claims["sub"], who.user_id.to_string());
        assert_eq!(claims["role"], "mechanic");
        assert_eq!(claims["workshop_id"], who.workshop_id.unwrap().to_string());
        let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
        assert_eq!(lifetime, 600);
        assert!(claims.get("workshop_id").is_some());
        let plain = super::claims(&token(b"0123456789abcdef0123456789abcdef", Role::Service));
        assert!(plain.get("workshop_id").is_none(), "{plain}");
    }
}
