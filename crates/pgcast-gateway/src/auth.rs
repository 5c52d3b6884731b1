//! HS256 JWT verification (and minting, for operators and tests).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use pgcast_events::{Principal, Role};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::GatewayError;

/// Claims of a pgcast token.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: Uuid,
    role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    workshop_id: Option<Uuid>,
    exp: u64,
}

/// Verifies tokens with one shared secret. Only HS256 is accepted: `alg: none` and every other
/// algorithm (including RS/ES confusion attacks) fail before the signature is looked at.
#[derive(Clone)]
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenVerifier { key: <redacted> }")
    }
}

impl TokenVerifier {
    /// A verifier for tokens signed with `secret`.
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        TokenVerifier {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// The principal of a valid token.
    pub fn verify(&self, token: &str) -> Result<Principal, GatewayError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?;
        let c = data.claims;
        Ok(Principal {
            user_id: c.sub,
            role: c.role,
            workshop_id: c.workshop_id,
        })
    }
}

/// Mints a token for `who`, valid for `ttl`.
pub fn mint_token(secret: &[u8], who: &Principal, ttl: Duration) -> Result<String, GatewayError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let claims = Claims {
        sub: who.user_id,
        role: who.role,
        workshop_id: who.workshop_id,
        exp: (now + ttl).as_secs(),
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mechanic() -> Principal {
        Principal {
            user_id: Uuid::from_u128(1),
            role: Role::Mechanic,
            workshop_id: Some(Uuid::from_u128(2)),
        }
    }

    fn b64(s: &str) -> String {
        use std::fmt::Write;
        // Minimal base64url without padding, to forge headers in tests.
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = s.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                let _ = write!(out, "{}", A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn round_trip() {
        let token = mint_token(b"secret", &mechanic(), Duration::from_secs(60)).unwrap();
        assert_eq!(
            TokenVerifier::new(b"secret").verify(&token).unwrap(),
            mechanic()
        );
    }

    #[test]
    fn rejects_wrong_secret_expired_garbage_none_and_missing_exp() {
        let v = TokenVerifier::new(b"secret");
        let other = mint_token(b"other", &mechanic(), Duration::from_secs(60)).unwrap();
        assert!(v.verify(&other).is_err());
        assert!(v.verify("garbage").is_err());
        assert!(v.verify("").is_err());
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - 3600;
        let claims = format!(
            r#"{{"sub":"00000000-0000-0000-0000-000000000001","role":"mechanic","exp":{exp}}}"#
        );
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::from_str::<serde_json::Value>(&claims).unwrap(),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(v.verify(&expired).is_err(), "expired");
        let no_exp = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub":"00000000-0000-0000-0000-000000000001","role":"mechanic"}),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(v.verify(&no_exp).is_err(), "missing exp");
        let future = exp + 7200;
        let body = b64(&format!(
            r#"{{"sub":"00000000-0000-0000-0000-000000000001","role":"service","exp":{future}}}"#
        ));
        let none = format!("{}.{body}.", b64(r#"{"alg":"none","typ":"JWT"}"#));
        assert!(v.verify(&none).is_err(), "alg none");
        // HS512 signed with the right secret is still not HS256.
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &serde_json::json!({"sub":"00000000-0000-0000-0000-000000000001","role":"service","exp":future}),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(v.verify(&hs512).is_err(), "algorithm confusion");
        let bad_sub = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub":"alice","role":"service","exp":future}),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(v.verify(&bad_sub).is_err(), "sub must be a uuid");
        let bad_role = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub":"00000000-0000-0000-0000-000000000001","role":"admin","exp":future}),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(v.verify(&bad_role).is_err(), "unknown role");
    }
}
