//! JWT verification (and HS256 minting, for operators and tests).
//!
//! One path verifies every token, whatever holds the key:
//!
//! ```text
//!  token ─▶ header (alg, kid) ─▶ key source ─▶ the one key for it ─▶ signature, exp, nbf, iss, aud
//!            HS256 secret │ PEM public key │ JWKS (cached)            (only that key's algorithm)
//!                                                                         │
//!                          claims ─▶ ClaimMapping (JSON pointers, role map) ─▶ Principal
//! ```
//!
//! Exactly one key source is configured, and each key verifies exactly one algorithm: the
//! secret HS256, a public key the algorithm of its type (or `--jwt-algorithm`), a JWKS key its
//! own `alg`. A token naming another algorithm is refused before its signature is looked at,
//! so an HS256 token "signed" with a public key is never accepted, nor is `alg: none`.
//!
//! A token is accepted only if it has an `exp` that has not passed, an `nbf` (when present)
//! that has, and — when the gateway is configured with them — exactly the expected `iss` and
//! `aud`. Both time checks allow the configured leeway for clock skew between the token's
//! minter and the gateway.
//!
//! Why about 1,200 lines: one verification path for every key source, so each claim check is
//! written once; half of the file is the unit tests that pin each check (algorithms, exp/nbf and
//! leeway, iss/aud, claim pointers, the role map, minting).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use pgcast_events::{Principal, Role};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::jwks::{Jwks, Lookup};
use crate::keys::{PublicKey, VerifyingKey};
use crate::{GatewayConfig, GatewayError};

/// Shortest HS256 secret accepted, in bytes: 256 bits, the size of the HMAC-SHA256 output
/// (RFC 7518 §3.2 requires a key at least that long). A shorter secret can be brute-forced
/// offline from any one token, after which anyone can mint a `service` token.
pub const MIN_SECRET_BYTES: usize = 32;

/// Clock skew allowed on `exp` and `nbf` unless configured otherwise.
pub(crate) const DEFAULT_LEEWAY: Duration = Duration::from_secs(5);

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

/// A JSON pointer (RFC 6901) to one claim of a token, such as `/sub`, `/realm_access/roles`
/// or `/https:~1~1app.example~1workshop` (a `/` inside a claim name is written `~1`, a `~`
/// is written `~0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPointer(String);

impl ClaimPointer {
    /// A pointer that starts with `/` and escapes `~` correctly.
    pub fn parse(text: &str) -> Result<ClaimPointer, String> {
        if !text.starts_with('/') || text.len() < 2 {
            return Err(
                "expected a JSON pointer to a claim, such as /sub or /app_metadata/role".to_owned(),
            );
        }
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
                return Err(
                    "a '~' in a JSON pointer must be written ~0 (and a '/' in a claim name ~1)"
                        .to_owned(),
                );
            }
        }
        if text.chars().any(char::is_control) {
            return Err("must not contain control characters".to_owned());
        }
        Ok(ClaimPointer(text.to_owned()))
    }

    /// The pointer as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClaimPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The identity provider's role values and the pgcast role each one stands for, written
/// `provider_value=pgcast_role,…` (e.g. `garage-mechanic=mechanic,backend=service`). Empty:
/// the role claim holds pgcast's own role names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleMap(Vec<(String, Role)>);

impl RoleMap {
    /// Parses `value=role,value=role`; each value once, each role `mechanic`, `customer` or
    /// `service`.
    pub fn parse(text: &str) -> Result<RoleMap, String> {
        let mut map = Vec::new();
        for entry in text.split(',').map(str::trim) {
            let Some((value, role)) = entry.rsplit_once('=') else {
                return Err(format!(
                    "expected provider_value=pgcast_role, got {entry:?} (e.g. \
                     garage-mechanic=mechanic,backend=service)"
                ));
            };
            let (value, role) = (value.trim(), role.trim());
            if value.is_empty() {
                return Err(format!("an empty provider value in {entry:?}"));
            }
            let role = role_named(role).ok_or_else(|| {
                format!("{role:?} is not a pgcast role (mechanic, customer or service)")
            })?;
            if map.iter().any(|(v, _): &(String, Role)| v == value) {
                return Err(format!("{value:?} is mapped twice"));
            }
            map.push((value.to_owned(), role));
        }
        Ok(RoleMap(map))
    }

    /// True when no value is mapped (the claim holds pgcast's role names).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The pgcast role a claim value stands for. With a map, only mapped values count: a
    /// provider role that happens to be called `service` grants nothing unless mapped.
    fn role_of(&self, value: &str) -> Option<Role> {
        if self.0.is_empty() {
            role_named(value)
        } else {
            self.0.iter().find(|(v, _)| v == value).map(|(_, r)| *r)
        }
    }
}

impl fmt::Display for RoleMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, (value, role)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{value}={}", role.as_str())?;
        }
        Ok(())
    }
}

fn role_named(name: &str) -> Option<Role> {
    [Role::Mechanic, Role::Customer, Role::Service]
        .into_iter()
        .find(|r| r.as_str() == name)
}

/// Where the user, role and workshop are in a token's claims, so that an identity provider's
/// tokens work as they are. The default reads pgcast's own claims: `/sub`, `/role` and
/// `/workshop_id`, role names as they are.
///
/// - the user (`sub`) must be a uuid string;
/// - the role claim may be a string or an array of strings (Keycloak's
///   `/realm_access/roles`, Cognito's `/cognito:groups`): the values that name a pgcast role
///   (through the [`RoleMap`], when one is set) must name exactly one;
/// - the workshop claim may be absent or `null`; otherwise it must be a uuid string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimMapping {
    /// The user's id. Default `/sub`.
    pub sub: ClaimPointer,
    /// The role. Default `/role`.
    pub role: ClaimPointer,
    /// The workshop of a mechanic. Default `/workshop_id`.
    pub workshop: ClaimPointer,
    /// Provider role values → pgcast roles. Default empty (pgcast's role names).
    pub roles: RoleMap,
}

impl Default for ClaimMapping {
    fn default() -> Self {
        ClaimMapping {
            sub: ClaimPointer("/sub".to_owned()),
            role: ClaimPointer("/role".to_owned()),
            workshop: ClaimPointer("/workshop_id".to_owned()),
            roles: RoleMap::default(),
        }
    }
}

impl ClaimMapping {
    /// The principal `claims` name. Errors say which claim is wrong, never its value.
    fn principal(&self, claims: &Value) -> Result<Principal, GatewayError> {
        let bad = |pointer: &ClaimPointer, why: &str| {
            GatewayError::Claims(format!("claim {pointer}: {why}"))
        };
        let user_id = claims
            .pointer(self.sub.as_str())
            .ok_or_else(|| bad(&self.sub, "missing"))?
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or_else(|| bad(&self.sub, "not a uuid string"))?;
        let values: Vec<&str> = match claims.pointer(self.role.as_str()) {
            None => return Err(bad(&self.role, "missing")),
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            Some(_) => return Err(bad(&self.role, "not a string or an array of strings")),
        };
        let mut role = None;
        for found in values.into_iter().filter_map(|v| self.roles.role_of(v)) {
            match role {
                Some(r) if r != found => {
                    return Err(bad(&self.role, "names more than one pgcast role"))
                }
                _ => role = Some(found),
            }
        }
        let role = role.ok_or_else(|| {
            bad(
                &self.role,
                if self.roles.is_empty() {
                    "names no pgcast role (mechanic, customer or service)"
                } else {
                    "names no role of the role map"
                },
            )
        })?;
        let workshop_id = match claims.pointer(self.workshop.as_str()) {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_str()
                    .and_then(|s| Uuid::parse_str(s).ok())
                    .ok_or_else(|| bad(&self.workshop, "not a uuid string"))?,
            ),
        };
        Ok(Principal {
            user_id,
            role,
            workshop_id,
        })
    }
}

/// Where the verifying keys come from.
#[derive(Clone)]
enum Keys {
    /// A shared secret: HS256 only.
    Secret(Arc<VerifyingKey>),
    /// One public key, with its one algorithm.
    PublicKey(PublicKey),
    /// The identity provider's key set.
    Jwks(Jwks),
}

impl Keys {
    /// The key for `header` among those at hand (never waits).
    fn cached(&self, header: &Header) -> Result<Arc<VerifyingKey>, GatewayError> {
        match self {
            Keys::Secret(key) => only(key, header),
            Keys::PublicKey(key) => only(key.verifying_key(), header),
            Keys::Jwks(jwks) => match jwks.cached(header) {
                Lookup::Found(key) => Ok(key),
                Lookup::Refused(why) => Err(GatewayError::KeyNotFound(why)),
                Lookup::Unknown => Err(GatewayError::KeyNotFound(format!(
                    "no {:?} key {:?} among the cached keys",
                    header.alg, header.kid
                ))),
            },
        }
    }

    /// The key for `header`, reading the identity provider's keys when it names one not yet
    /// known.
    async fn fetching(&self, header: &Header) -> Result<Arc<VerifyingKey>, GatewayError> {
        match self {
            Keys::Jwks(jwks) => jwks.key(header).await,
            _ => self.cached(header),
        }
    }

    fn describe(&self) -> String {
        match self {
            Keys::Secret(_) => "HS256 secret <redacted>".to_owned(),
            Keys::PublicKey(key) => format!("{key:?}"),
            Keys::Jwks(jwks) => format!("JWKS {}", jwks.url()),
        }
    }
}

/// A single key verifies only its own algorithm (the key's `kid`, if the token has one, is not
/// looked at).
fn only(key: &Arc<VerifyingKey>, header: &Header) -> Result<Arc<VerifyingKey>, GatewayError> {
    if header.alg != key.algorithm {
        return Err(GatewayError::KeyNotFound(format!(
            "the token is signed with {:?}; only {:?} is accepted",
            header.alg, key.algorithm
        )));
    }
    Ok(key.clone())
}

/// Verifies tokens with the configured key source (an HS256 secret, a public key or a JWKS
/// URL), then reads the principal through the [`ClaimMapping`]. Cheap to clone; clones share
/// a JWKS cache.
#[derive(Clone)]
pub struct TokenVerifier {
    keys: Keys,
    /// Its `algorithms` hold the key source's usual algorithm; a key of another one (a JWKS
    /// with mixed keys) verifies with a copy.
    validation: Validation,
    claims: ClaimMapping,
}

impl fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("keys", &self.keys.describe())
            .field("issuer", &self.validation.iss)
            .field("audience", &self.validation.aud)
            .field("leeway", &self.validation.leeway)
            .field("claims", &self.claims)
            .finish()
    }
}

impl TokenVerifier {
    /// A verifier for tokens signed with `secret` (HS256), with the default leeway of 5 s, the
    /// default claims and no issuer or audience binding (a token that names an audience is
    /// then refused: it was minted for someone else). Refuses a secret shorter than
    /// [`MIN_SECRET_BYTES`].
    pub fn new(secret: &[u8]) -> Result<Self, GatewayError> {
        check_secret(secret)?;
        Ok(TokenVerifier::with_keys(Keys::Secret(Arc::new(
            VerifyingKey {
                kid: None,
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(secret),
            },
        ))))
    }

    /// A verifier for tokens signed with the private half of `key`, in its one algorithm.
    pub fn with_public_key(key: PublicKey) -> Self {
        TokenVerifier::with_keys(Keys::PublicKey(key))
    }

    /// A verifier for tokens signed with one of the keys published at a JWKS URL.
    pub fn with_jwks(jwks: Jwks) -> Self {
        TokenVerifier::with_keys(Keys::Jwks(jwks))
    }

    fn with_keys(keys: Keys) -> Self {
        let usual = match &keys {
            Keys::Secret(key) => key.algorithm,
            Keys::PublicKey(key) => key.algorithm(),
            Keys::Jwks(jwks) => jwks.settings().algorithm.unwrap_or(Algorithm::RS256),
        };
        let mut validation = Validation::new(usual);
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = leeway_secs(DEFAULT_LEEWAY);
        TokenVerifier {
            keys,
            validation,
            claims: ClaimMapping::default(),
        }
    }

    /// The verifier `config` describes: its one key source (secret, public key or JWKS),
    /// claim mapping, issuer, audience and leeway.
    pub fn from_config(config: &GatewayConfig) -> Result<Self, GatewayError> {
        let mut verifier = match (&config.jwt_public_key, &config.jwt_jwks) {
            (None, None) => TokenVerifier::new(&config.jwt_secret)?,
            (Some(key), None) if config.jwt_secret.is_empty() => {
                TokenVerifier::with_public_key(key.clone())
            }
            (None, Some(jwks)) if config.jwt_secret.is_empty() => {
                TokenVerifier::with_jwks(jwks.clone())
            }
            _ => {
                return Err(GatewayError::InvalidConfig(
                    "configure exactly one token key source: a JWT secret, a public key or a \
                     JWKS URL",
                ))
            }
        }
        .with_leeway(config.token_leeway)
        .with_claims(config.jwt_claims.clone());
        if let Some(issuer) = &config.jwt_issuer {
            verifier = verifier.with_issuer(issuer)?;
        }
        if let Some(audience) = &config.jwt_audience {
            verifier = verifier.with_audience(audience)?;
        }
        Ok(verifier)
    }

    /// Reads the principal through `claims` instead of pgcast's own claim names.
    pub fn with_claims(mut self, claims: ClaimMapping) -> Self {
        self.claims = claims;
        self
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

    /// The principal of a valid token and its expiry, with the keys at hand: this never
    /// waits, so a token naming a JWKS key not yet read is refused. Connections use
    /// [`verify_async`](Self::verify_async).
    pub fn verify(&self, token: &str) -> Result<Verified, GatewayError> {
        let header = jsonwebtoken::decode_header(token)?;
        let key = self.keys.cached(&header)?;
        self.check(token, &key)
    }

    /// [`verify`](Self::verify), reading the identity provider's keys first when the token
    /// names a key not yet known (bounded by the JWKS timeout; one read at a time, at most
    /// one per `min_refresh`). Without a JWKS it never waits.
    pub async fn verify_async(&self, token: &str) -> Result<Verified, GatewayError> {
        let header = jsonwebtoken::decode_header(token)?;
        let key = self.keys.fetching(&header).await?;
        self.check(token, &key)
    }

    /// The one verification: `key`'s algorithm only, then the time and audience claims, then
    /// the mapping.
    fn check(&self, token: &str, key: &VerifyingKey) -> Result<Verified, GatewayError> {
        let data = if self.validation.algorithms == [key.algorithm] {
            jsonwebtoken::decode::<Value>(token, &key.key, &self.validation)?
        } else {
            let mut validation = self.validation.clone();
            validation.algorithms = vec![key.algorithm];
            jsonwebtoken::decode::<Value>(token, &key.key, &validation)?
        };
        let claims = data.claims;
        // jsonwebtoken checks `exp` (required) but skips an `nbf` that is not a number: a
        // malformed one must fail the token, not be ignored.
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| GatewayError::Claims("claim /exp: not a number".to_owned()))?;
        if claims.get("nbf").is_some_and(|nbf| nbf.as_u64().is_none()) {
            return Err(GatewayError::Claims("claim /nbf: not a number".to_owned()));
        }
        Ok(Verified {
            principal: self.claims.principal(&claims)?,
            expires_at: exp,
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

    /// base64url without padding, to forge headers in tests.
    fn b64(s: &str) -> String {
        pgcast_testkit::base64url::encode(s)
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

    // Key sources other than the secret, and the claim mapping.

    use crate::keys::test_keys::{self, TestKey};
    use crate::PublicKey;

    fn public_key_verifier(key: &TestKey) -> TokenVerifier {
        TokenVerifier::with_public_key(PublicKey::from_pem(key.public_pem.as_bytes()).unwrap())
    }

    #[test]
    fn public_keys_verify_their_own_algorithm() {
        let keys = [
            test_keys::rsa(),
            &test_keys::ec(Algorithm::ES256),
            &test_keys::ec(Algorithm::ES384),
            &test_keys::ed25519(),
        ];
        for key in keys {
            let v = public_key_verifier(key);
            assert_eq!(
                PublicKey::from_pem(key.public_pem.as_bytes())
                    .unwrap()
                    .algorithm(),
                key.algorithm
            );
            let token = key.sign(Some("any-kid"), &claims(json!({})));
            let verified = v
                .verify(&token)
                .unwrap_or_else(|e| panic!("{key:?}: {e}", key = key.algorithm));
            assert_eq!(verified.principal.role, Role::Service);
            // Another key of the same type is not this one.
            let other = match key.algorithm {
                Algorithm::RS256 => None,
                Algorithm::EdDSA => Some(test_keys::ed25519()),
                alg => Some(test_keys::ec(alg)),
            };
            if let Some(other) = other {
                assert!(v.verify(&other.sign(None, &claims(json!({})))).is_err());
            }
        }
    }

    #[test]
    fn a_public_key_is_never_an_hmac_secret() {
        // The classic forgery: an HS256 token whose "secret" is the public key file, which
        // everyone has. A verifier that let the token pick the algorithm would accept it.
        for key in [
            test_keys::rsa(),
            &test_keys::ec(Algorithm::ES256),
            &test_keys::ed25519(),
        ] {
            let v = public_key_verifier(key);
            for hs in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
                let forged = signed(hs, &claims(json!({})), key.public_pem.as_bytes());
                assert!(
                    v.verify(&forged).is_err(),
                    "{hs:?} with the public key as secret"
                );
            }
            let future = now() + 7200;
            let body = b64(&format!(
                r#"{{"sub":"{SUB}","role":"service","exp":{future}}}"#
            ));
            let none = format!("{}.{body}.", b64(r#"{"alg":"none","typ":"JWT"}"#));
            assert!(v.verify(&none).is_err(), "alg none");
        }
        // And the secret verifies nothing but HS256: a token signed with a key pair fails
        // before any key is tried.
        let rs = test_keys::rsa().sign(None, &claims(json!({})));
        assert!(matches!(
            verifier().verify(&rs),
            Err(GatewayError::KeyNotFound(_))
        ));
    }

    #[test]
    fn a_key_verifies_one_algorithm_even_within_its_family() {
        let rsa = test_keys::rsa();
        let v = public_key_verifier(rsa);
        // RS512 with the same RSA key: a valid signature, but not the configured algorithm.
        let rs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::RS512),
            &claims(json!({})),
            &EncodingKey::from_rsa_pem(rsa.private_pem.as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(v.verify(&rs512).is_err());
        let v512 = TokenVerifier::with_public_key(
            PublicKey::from_pem(rsa.public_pem.as_bytes())
                .unwrap()
                .with_algorithm(Algorithm::RS512)
                .unwrap(),
        );
        assert!(v512.verify(&rs512).is_ok());
        assert!(v512.verify(&rsa.sign(None, &claims(json!({})))).is_err());
        // ES384 is not for a P-256 key, and no RSA algorithm is for an EC key.
        let p256 =
            PublicKey::from_pem(test_keys::ec(Algorithm::ES256).public_pem.as_bytes()).unwrap();
        for alg in [
            Algorithm::ES384,
            Algorithm::RS256,
            Algorithm::EdDSA,
            Algorithm::HS256,
        ] {
            assert!(p256.clone().with_algorithm(alg).is_err(), "{alg:?}");
        }
    }

    #[test]
    fn only_public_keys_in_pem_are_read() {
        let rsa = test_keys::rsa();
        let ec = test_keys::ec(Algorithm::ES256);
        for (pem, hint) in [
            (rsa.private_pem.clone(), "private key"),
            (ec.private_pem.clone(), "private key"),
            (
                "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n".to_owned(),
                "certificate",
            ),
            ("not a pem".to_owned(), "PEM"),
            (String::new(), "PEM"),
            (format!("{}{}", rsa.public_pem, ec.public_pem), "several"),
            (
                "-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n".to_owned(),
                "not an RSA",
            ),
        ] {
            let err = PublicKey::from_pem(pem.as_bytes()).unwrap_err();
            assert!(err.is_config(), "{err}");
            assert!(err.to_string().contains(hint), "{hint}: {err}");
        }
        // PKCS#1 `RSA PUBLIC KEY` works as well as SubjectPublicKeyInfo.
        use rsa::pkcs1::EncodeRsaPublicKey;
        use rsa::pkcs8::DecodePublicKey;
        let pkcs1 = rsa::RsaPublicKey::from_public_key_pem(&rsa.public_pem)
            .unwrap()
            .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
            .unwrap();
        let key = PublicKey::from_pem(pkcs1.as_bytes()).unwrap();
        assert_eq!(key.algorithm(), Algorithm::RS256);
        let token = rsa.sign(None, &claims(json!({})));
        assert!(TokenVerifier::with_public_key(key).verify(&token).is_ok());
    }

    #[test]
    fn algorithm_names() {
        use crate::public_key_algorithm;
        assert_eq!(public_key_algorithm("ES256"), Ok(Algorithm::ES256));
        assert_eq!(public_key_algorithm("EdDSA"), Ok(Algorithm::EdDSA));
        for bad in ["HS256", "HS512", "none", "es256", "ES512", ""] {
            assert!(public_key_algorithm(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exactly_one_key_source() {
        let key = PublicKey::from_pem(test_keys::ed25519().public_pem.as_bytes()).unwrap();
        let jwks = crate::Jwks::new("http://127.0.0.1:9/jwks.json", Default::default()).unwrap();
        let mut config = GatewayConfig::new(SECRET);
        config.jwt_public_key = Some(key.clone());
        assert!(matches!(
            TokenVerifier::from_config(&config),
            Err(GatewayError::InvalidConfig(_))
        ));
        config.jwt_secret.clear();
        assert!(TokenVerifier::from_config(&config).is_ok());
        config.jwt_jwks = Some(jwks.clone());
        assert!(TokenVerifier::from_config(&config).is_err());
        config.jwt_public_key = None;
        assert!(TokenVerifier::from_config(&config).is_ok());
        // Without any, the (empty) secret is too short.
        config.jwt_jwks = None;
        assert!(matches!(
            TokenVerifier::from_config(&config),
            Err(GatewayError::SecretTooShort { len: 0, .. })
        ));
    }

    #[test]
    fn issuer_and_audience_bind_public_key_tokens_too() {
        let key = test_keys::ec(Algorithm::ES256);
        let mut config = GatewayConfig::new(Vec::new());
        config.jwt_public_key = Some(PublicKey::from_pem(key.public_pem.as_bytes()).unwrap());
        config.jwt_issuer = Some("https://id.example/".into());
        config.jwt_audience = Some("pgcast".into());
        let v = TokenVerifier::from_config(&config).unwrap();
        let right = claims(json!({"iss": "https://id.example/", "aud": ["pgcast", "account"]}));
        assert!(v.verify(&key.sign(None, &right)).is_ok());
        for wrong in [
            json!({"iss": "https://evil.example/", "aud": "pgcast"}),
            json!({"iss": "https://id.example/", "aud": "account"}),
            json!({"aud": "pgcast"}),
            json!({"iss": "https://id.example/"}),
        ] {
            assert!(
                v.verify(&key.sign(None, &claims(wrong.clone()))).is_err(),
                "{wrong}"
            );
        }
    }

    /// A Keycloak-shaped access token: roles in `realm_access.roles`, the workshop in a
    /// namespaced claim, an audience.
    fn keycloak_claims(roles: Value, workshop: Value) -> Value {
        json!({
            "sub": SUB,
            "exp": now() + 600,
            "iat": now(),
            "preferred_username": "sam",
            "realm_access": {"roles": roles},
            "https://garage.example/workshop": workshop,
            "scope": "openid profile",
        })
    }

    fn keycloak_mapping(map: &str) -> ClaimMapping {
        ClaimMapping {
            sub: ClaimPointer::parse("/sub").unwrap(),
            role: ClaimPointer::parse("/realm_access/roles").unwrap(),
            workshop: ClaimPointer::parse("/https:~1~1garage.example~1workshop").unwrap(),
            roles: RoleMap::parse(map).unwrap(),
        }
    }

    #[test]
    fn mapped_claims_name_the_user_role_and_workshop() {
        let workshop = Uuid::from_u128(7);
        let map = "garage-mechanic=mechanic, garage-customer=customer,backend=service";
        let v = verifier().with_claims(keycloak_mapping(map));
        let token = hs256(&keycloak_claims(
            json!(["offline_access", "garage-mechanic", "uma_authorization"]),
            json!(workshop.to_string()),
        ));
        let verified = v.verify(&token).unwrap();
        assert_eq!(
            verified.principal,
            Principal {
                user_id: Uuid::parse_str(SUB).unwrap(),
                role: Role::Mechanic,
                workshop_id: Some(workshop),
            }
        );
        // A role given as a string, and no workshop (absent or null).
        for workshop in [Value::Null, json!(null)] {
            let mut c = keycloak_claims(json!("backend"), workshop);
            c.as_object_mut()
                .unwrap()
                .remove("https://garage.example/workshop");
            let p = v.verify(&hs256(&c)).unwrap().principal;
            assert_eq!((p.role, p.workshop_id), (Role::Service, None));
        }
        let p = v
            .verify(&hs256(&keycloak_claims(
                json!(["garage-customer"]),
                Value::Null,
            )))
            .unwrap()
            .principal;
        assert_eq!((p.role, p.workshop_id), (Role::Customer, None));
    }

    #[test]
    fn mapped_claims_that_do_not_fit_are_refused() {
        let v = verifier().with_claims(keycloak_mapping(
            "garage-mechanic=mechanic,admin=service,ops=service",
        ));
        let ok_workshop = json!(Uuid::from_u128(7).to_string());
        for (roles, workshop, why) in [
            (
                json!(["offline_access"]),
                ok_workshop.clone(),
                "no mapped role",
            ),
            (json!([]), ok_workshop.clone(), "empty roles"),
            // pgcast's own names count only when mapped.
            (
                json!(["service"]),
                ok_workshop.clone(),
                "unmapped pgcast name",
            ),
            (
                json!(["garage-mechanic", "admin"]),
                ok_workshop.clone(),
                "two pgcast roles",
            ),
            (
                json!({"role": "admin"}),
                ok_workshop.clone(),
                "roles not a list",
            ),
            (json!(7), ok_workshop.clone(), "roles a number"),
            (
                json!(["garage-mechanic"]),
                json!("garage-7"),
                "workshop not a uuid",
            ),
            (json!(["garage-mechanic"]), json!(7), "workshop a number"),
        ] {
            let err = v
                .verify(&hs256(&keycloak_claims(roles, workshop)))
                .unwrap_err();
            assert!(matches!(err, GatewayError::Claims(_)), "{why}: {err}");
        }
        // Two provider roles standing for the same pgcast role are one role.
        let same = keycloak_claims(json!(["admin", "ops"]), Value::Null);
        assert_eq!(
            v.verify(&hs256(&same)).unwrap().principal.role,
            Role::Service
        );
        // The user must be a uuid where the mapping says.
        let auth0 = verifier().with_claims(ClaimMapping {
            sub: ClaimPointer::parse("/https:~1~1garage.example~1user_id").unwrap(),
            ..ClaimMapping::default()
        });
        let provider_sub = claims(json!({"sub": "auth0|5f7c8ec7c33c6c004bbafe82"}));
        assert!(
            auth0.verify(&hs256(&provider_sub)).is_err(),
            "claim missing"
        );
        let mut mapped = provider_sub.clone();
        mapped["https://garage.example/user_id"] = json!(SUB);
        assert_eq!(
            auth0.verify(&hs256(&mapped)).unwrap().principal.user_id,
            Uuid::parse_str(SUB).unwrap()
        );
        assert!(
            verifier().verify(&hs256(&provider_sub)).is_err(),
            "sub not a uuid"
        );
        // Errors name the claim, never its value.
        let err = verifier()
            .verify(&hs256(&provider_sub))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/sub") && !err.contains("auth0|"), "{err}");
    }

    #[test]
    fn pointers_and_role_maps_are_validated() {
        for good in [
            "/sub",
            "/realm_access/roles",
            "/a~0b",
            "/https:~1~1x~1y",
            "/cognito:groups",
        ] {
            assert_eq!(ClaimPointer::parse(good).unwrap().as_str(), good);
        }
        for bad in ["", "/", "sub", "/a~2", "/a~", "#/sub", "/a\nb"] {
            assert!(ClaimPointer::parse(bad).is_err(), "{bad:?}");
        }
        let map = RoleMap::parse("a=mechanic, b = service,x=y=customer").unwrap();
        assert_eq!(map.to_string(), "a=mechanic,b=service,x=y=customer");
        assert_eq!(RoleMap::default().to_string(), "none");
        for bad in [
            "",
            "a",
            "a=admin",
            "=mechanic",
            "a=mechanic,a=service",
            "a=mechanic,",
        ] {
            assert!(RoleMap::parse(bad).is_err(), "{bad:?}");
        }
    }
}
