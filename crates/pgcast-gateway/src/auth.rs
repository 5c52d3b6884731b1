//! HS256 JWT verification (and minting, for operators and tests).
//!
//! A token is accepted only if it is signed with HS256 and the configured secret (at least
//! [`MIN_SECRET_BYTES`] long), has an `exp` that has not passed, an `nbf` (when present) that
//! has, and — when the gateway is configured with them — exactly the expected `iss` and `aud`.
//! Both time checks allow the configured leeway for clock skew between the token's minter and
//! the gateway.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use pgcast_events::{Principal, Role};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{GatewayConfig, GatewayError};

/// Shortest HS256 secret accepted, in bytes: 256 bits, the size of the HMAC-SHA256 output
/// (RFC 7518 §3.2 requires a key at least that long). A shorter secret can be brute-forced
/// offline from any one token, after which anyone can mint a `service` token.
pub const MIN_SECRET_BYTES: usize = 32;

/// Clock skew allowed on `exp` and `nbf` unless configured otherwise.
pub(crate) const DEFAULT_LEEWAY: Duration = Duration::from_secs(5);

/// Claims of a pgcast token as the gateway reads them. `iss` and `aud` are checked by the
/// validation itself (they may be strings or arrays), so they are not deserialized here.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Uuid,
    role: Role,
    #[serde(default)]
    workshop_id: Option<Uuid>,
    exp: u64,
    /// Read only so that a present but malformed `nbf` fails the token: jsonwebtoken skips
    /// the `nbf` check when the claim is not a number.
    #[serde(default)]
    #[allow(dead_code)]
    nbf: Option<u64>,
}

/// Claims of a pgcast token as [`TokenMinter`] writes them.
#[derive(Debug, Serialize)]
struct MintedClaims<'a> {
    sub: Uuid,
    role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    workshop_id: Option<Uuid>,
    /// Issued at: informational (nothing checks it), useful when reading a token by hand.
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// What a valid token says: who it is for, and until when it may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The token's user.
    pub principal: Principal,
    /// The token's `exp` claim, unix seconds. The connection must stop delivering at this
    /// time (plus the leeway) unless the client refreshes its token.
    pub expires_at: u64,
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
        f.debug_struct("TokenVerifier")
            .field("key", &"<redacted>")
            .field("issuer", &self.validation.iss)
            .field("audience", &self.validation.aud)
            .field("leeway", &self.validation.leeway)
            .finish()
    }
}

impl TokenVerifier {
    /// A verifier for tokens signed with `secret`, with the default leeway of 5 s and no
    /// issuer or audience binding (a token that names an audience is then refused: it was
    /// minted for someone else). Refuses a secret shorter than [`MIN_SECRET_BYTES`].
    pub fn new(secret: &[u8]) -> Result<Self, GatewayError> {
        check_secret(secret)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = leeway_secs(DEFAULT_LEEWAY);
        Ok(TokenVerifier {
            key: DecodingKey::from_secret(secret),
            validation,
        })
    }

    /// The verifier `config` describes: its secret, issuer, audience and leeway.
    pub fn from_config(config: &GatewayConfig) -> Result<Self, GatewayError> {
        let mut verifier = TokenVerifier::new(&config.jwt_secret)?.with_leeway(config.token_leeway);
        if let Some(issuer) = &config.jwt_issuer {
            verifier = verifier.with_issuer(issuer)?;
        }
        if let Some(audience) = &config.jwt_audience {
            verifier = verifier.with_audience(audience)?;
        }
        Ok(verifier)
    }

    /// Accepts only tokens whose `iss` is `issuer` (a token without `iss` is refused).
    pub fn with_issuer(mut self, issuer: &str) -> Result<Self, GatewayError> {
        if issuer.is_empty() {
            return Err(GatewayError::InvalidConfig("the JWT issuer is empty"));
        }
        self.validation.set_issuer(&[issuer]);
        self.require("iss");
        Ok(self)
    }

    /// Accepts only tokens whose `aud` is or contains `audience` (a token without `aud` is
    /// refused).
    pub fn with_audience(mut self, audience: &str) -> Result<Self, GatewayError> {
        if audience.is_empty() {
            return Err(GatewayError::InvalidConfig("the JWT audience is empty"));
        }
        self.validation.set_audience(&[audience]);
        self.require("aud");
        Ok(self)
    }

    /// Clock skew allowed on `exp` and `nbf` (rounded up to whole seconds).
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.validation.leeway = leeway_secs(leeway);
        self
    }

    fn require(&mut self, claim: &str) {
        self.validation
            .required_spec_claims
            .insert(claim.to_owned());
    }

    /// The principal of a valid token and its expiry.
    pub fn verify(&self, token: &str) -> Result<Verified, GatewayError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?;
        let c = data.claims;
        Ok(Verified {
            principal: Principal {
                user_id: c.sub,
                role: c.role,
                workshop_id: c.workshop_id,
            },
            expires_at: c.exp,
        })
    }
}

/// Signs tokens with one shared secret, stamping the configured issuer and audience. This is
/// the one place pgcast builds token claims, so they are exactly those [`TokenVerifier`]
/// checks.
#[derive(Clone)]
pub struct TokenMinter {
    key: EncodingKey,
    issuer: Option<String>,
    audience: Option<String>,
}

impl std::fmt::Debug for TokenMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenMinter")
            .field("key", &"<redacted>")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl TokenMinter {
    /// A minter signing with `secret`, without `iss` or `aud`. Refuses a secret shorter than
    /// [`MIN_SECRET_BYTES`].
    pub fn new(secret: &[u8]) -> Result<Self, GatewayError> {
        check_secret(secret)?;
        Ok(TokenMinter {
            key: EncodingKey::from_secret(secret),
            issuer: None,
            audience: None,
        })
    }

    /// Stamps `iss` on every token.
    pub fn with_issuer(mut self, issuer: impl Into<String>) -> Result<Self, GatewayError> {
        let issuer = issuer.into();
        if issuer.is_empty() {
            return Err(GatewayError::InvalidConfig("the JWT issuer is empty"));
        }
        self.issuer = Some(issuer);
        Ok(self)
    }

    /// Stamps `aud` on every token.
    pub fn with_audience(mut self, audience: impl Into<String>) -> Result<Self, GatewayError> {
        let audience = audience.into();
        if audience.is_empty() {
            return Err(GatewayError::InvalidConfig("the JWT audience is empty"));
        }
        self.audience = Some(audience);
        Ok(self)
    }

    /// A token for `who`, valid from now for `ttl`. No `nbf` is set: a token is valid from
    /// the moment it exists, and `nbf = now` would only add failures on a gateway whose clock
    /// is behind the minter's.
    pub fn mint(&self, who: &Principal, ttl: Duration) -> Result<String, GatewayError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let exp = now.checked_add(ttl).ok_or(GatewayError::InvalidConfig(
            "the token lifetime is too long",
        ))?;
        let claims = MintedClaims {
            sub: who.user_id,
            role: who.role,
            workshop_id: who.workshop_id,
            iat: now.as_secs(),
            exp: exp.as_secs(),
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.key,
        )?)
    }
}

/// Mints a token for `who`, valid for `ttl`, without `iss` or `aud`: shorthand for
/// `TokenMinter::new(secret)?.mint(who, ttl)`.
pub fn mint_token(secret: &[u8], who: &Principal, ttl: Duration) -> Result<String, GatewayError> {
    TokenMinter::new(secret)?.mint(who, ttl)
}

fn check_secret(secret: &[u8]) -> Result<(), GatewayError> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(GatewayError::SecretTooShort {
            len: secret.len(),
            min: MIN_SECRET_BYTES,
        });
    }
    Ok(())
}

/// jsonwebtoken counts leeway in whole seconds; a fraction rounds up so that a configured
/// leeway is never shortened.
fn leeway_secs(leeway: Duration) -> u64 {
    leeway.as_secs() + u64::from(leeway.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const SECRET: &[u8] = b"auth-unit-test-secret-of-32-bytes";
    const SUB: &str = "00000000-0000-0000-0000-000000000001";

    fn mechanic() -> Principal {
        Principal {
            user_id: Uuid::from_u128(1),
            role: Role::Mechanic,
            workshop_id: Some(Uuid::from_u128(2)),
        }
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn verifier() -> TokenVerifier {
        TokenVerifier::new(SECRET).unwrap()
    }

    /// A token with arbitrary claims, signed with `alg` and `secret`.
    fn signed(alg: Algorithm, claims: &Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    fn hs256(claims: &Value) -> String {
        signed(Algorithm::HS256, claims, SECRET)
    }

    /// Valid service claims expiring in an hour, plus `extra`.
    fn claims(extra: Value) -> Value {
        let mut c = json!({"sub": SUB, "role": "service", "exp": now() + 3600});
        if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), extra) {
            c.extend(extra);
        }
        c
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
    fn round_trip_reports_principal_and_expiry() {
        let before = now();
        let token = mint_token(SECRET, &mechanic(), Duration::from_secs(60)).unwrap();
        let verified = verifier().verify(&token).unwrap();
        assert_eq!(verified.principal, mechanic());
        let after = now();
        assert!(
            (before + 60..=after + 60).contains(&verified.expires_at),
            "{verified:?}"
        );
    }

    #[test]
    fn expires_at_is_the_tokens_exp() {
        let exp = now() + 1234;
        let token = hs256(&json!({"sub": SUB, "role": "customer", "exp": exp}));
        assert_eq!(verifier().verify(&token).unwrap().expires_at, exp);
    }

    #[test]
    fn secrets_shorter_than_32_bytes_are_refused() {
        for len in [0, 1, 16, 31] {
            let secret = vec![b'k'; len];
            match TokenVerifier::new(&secret) {
                Err(GatewayError::SecretTooShort { len: l, min: 32 }) => assert_eq!(l, len),
                other => panic!("{len}-byte secret: {other:?}"),
            }
            assert!(matches!(
                TokenMinter::new(&secret),
                Err(GatewayError::SecretTooShort { .. })
            ));
            assert!(mint_token(&secret, &mechanic(), Duration::from_secs(60)).is_err());
        }
        let message = TokenVerifier::new(&[b'k'; 16]).unwrap_err().to_string();
        assert!(
            message.contains("16") && message.contains("32"),
            "{message}"
        );
        assert!(TokenVerifier::new(&[b'k'; 32]).is_ok());
        // The whole configuration goes through the same check.
        let config = GatewayConfig::new(vec![b'k'; 16]);
        assert!(matches!(
            TokenVerifier::from_config(&config),
            Err(GatewayError::SecretTooShort { len: 16, .. })
        ));
    }

    #[test]
    fn exp_is_required_and_enforced_with_the_leeway() {
        let v = verifier();
        assert!(v
            .verify(&hs256(&json!({"sub": SUB, "role": "service"})))
            .is_err());
        let expired = hs256(&claims(json!({"exp": now() - 60})));
        assert!(v.verify(&expired).is_err(), "expired a minute ago");
        let within_leeway = hs256(&claims(json!({"exp": now() - 1})));
        assert!(v.verify(&within_leeway).is_ok(), "within the 5 s leeway");
        assert!(v
            .with_leeway(Duration::from_secs(120))
            .verify(&expired)
            .is_ok());
        let not_a_number = hs256(&claims(json!({"exp": "tomorrow"})));
        assert!(verifier().verify(&not_a_number).is_err());
    }

    #[test]
    fn nbf_in_the_future_is_refused_beyond_the_leeway() {
        let v = verifier();
        let later = hs256(&claims(json!({"nbf": now() + 60})));
        assert!(v.verify(&later).is_err(), "not valid for another minute");
        let skewed = hs256(&claims(json!({"nbf": now() + 2})));
        assert!(v.verify(&skewed).is_ok(), "within the 5 s leeway");
        let past = hs256(&claims(json!({"nbf": now() - 60})));
        assert!(v.verify(&past).is_ok());
        // A malformed nbf is not silently skipped.
        let garbled = hs256(&claims(json!({"nbf": "later"})));
        assert!(v.verify(&garbled).is_err());
        let strict = verifier().with_leeway(Duration::ZERO);
        assert!(strict.verify(&skewed).is_err(), "no leeway configured");
    }

    #[test]
    fn issuer_binding() {
        let bound = verifier().with_issuer("https://id.example").unwrap();
        let right = hs256(&claims(json!({"iss": "https://id.example"})));
        let wrong = hs256(&claims(json!({"iss": "https://evil.example"})));
        let missing = hs256(&claims(json!({})));
        let not_a_string = hs256(&claims(json!({"iss": 7})));
        assert!(bound.verify(&right).is_ok());
        assert!(bound.verify(&wrong).is_err(), "other issuer");
        assert!(bound.verify(&missing).is_err(), "no issuer");
        assert!(bound.verify(&not_a_string).is_err(), "issuer not a string");
        // Unbound: the issuer is not looked at.
        assert!(verifier().verify(&wrong).is_ok());
        assert!(verifier().verify(&missing).is_ok());
        assert!(verifier().with_issuer("").is_err());
    }

    #[test]
    fn audience_binding() {
        let bound = verifier().with_audience("pgcast").unwrap();
        let right = hs256(&claims(json!({"aud": "pgcast"})));
        let among = hs256(&claims(json!({"aud": ["billing", "pgcast"]})));
        let wrong = hs256(&claims(json!({"aud": "billing"})));
        let missing = hs256(&claims(json!({})));
        assert!(bound.verify(&right).is_ok());
        assert!(bound.verify(&among).is_ok());
        assert!(bound.verify(&wrong).is_err(), "other audience");
        assert!(bound.verify(&missing).is_err(), "no audience");
        // Unbound: a token minted for some audience is someone else's.
        assert!(verifier().verify(&wrong).is_err());
        assert!(verifier().verify(&missing).is_ok());
        assert!(verifier().with_audience("").is_err());
    }

    #[test]
    fn minted_claims_match_a_bound_verifier() {
        let minter = TokenMinter::new(SECRET)
            .unwrap()
            .with_issuer("https://id.example")
            .unwrap()
            .with_audience("pgcast")
            .unwrap();
        let token = minter.mint(&mechanic(), Duration::from_secs(60)).unwrap();
        let mut config = GatewayConfig::new(SECRET);
        config.jwt_issuer = Some("https://id.example".into());
        config.jwt_audience = Some("pgcast".into());
        let bound = TokenVerifier::from_config(&config).unwrap();
        assert_eq!(bound.verify(&token).unwrap().principal, mechanic());
        // Each binding matters on its own.
        config.jwt_audience = Some("other".into());
        assert!(TokenVerifier::from_config(&config)
            .unwrap()
            .verify(&token)
            .is_err());
        config.jwt_audience = Some("pgcast".into());
        config.jwt_issuer = Some("https://other.example".into());
        assert!(TokenVerifier::from_config(&config)
            .unwrap()
            .verify(&token)
            .is_err());
        // An unbound minter's token fails a bound verifier.
        let plain = mint_token(SECRET, &mechanic(), Duration::from_secs(60)).unwrap();
        assert!(bound.verify(&plain).is_err());
        assert!(TokenMinter::new(SECRET).unwrap().with_issuer("").is_err());
        assert!(TokenMinter::new(SECRET)
            .unwrap()
            .mint(&mechanic(), Duration::MAX)
            .is_err());
    }

    #[test]
    fn rejects_wrong_secret_garbage_none_and_algorithm_confusion() {
        let v = verifier();
        let other = mint_token(
            b"another-secret-that-is-32-bytes-long",
            &mechanic(),
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(v.verify(&other).is_err(), "wrong secret");
        assert!(v.verify("garbage").is_err());
        assert!(v.verify("").is_err());
        let future = now() + 7200;
        let body = b64(&format!(
            r#"{{"sub":"{SUB}","role":"service","exp":{future}}}"#
        ));
        let none = format!("{}.{body}.", b64(r#"{"alg":"none","typ":"JWT"}"#));
        assert!(v.verify(&none).is_err(), "alg none");
        // HS512 signed with the right secret is still not HS256.
        let hs512 = signed(Algorithm::HS512, &claims(json!({})), SECRET);
        assert!(v.verify(&hs512).is_err(), "algorithm confusion");
        let bad_sub = hs256(&claims(json!({"sub": "alice"})));
        assert!(v.verify(&bad_sub).is_err(), "sub must be a uuid");
        let bad_role = hs256(&claims(json!({"role": "admin"})));
        assert!(v.verify(&bad_role).is_err(), "unknown role");
        // The same claims with the right algorithm are accepted: the refusals above are not
        // about the claims.
        assert!(v.verify(&hs256(&claims(json!({})))).is_ok());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let shown = format!("{:?} {:?}", verifier(), TokenMinter::new(SECRET).unwrap());
        assert!(!shown.contains("auth-unit-test"), "{shown}");
    }
}
