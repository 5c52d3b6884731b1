//! How tokens are verified: the HS256 secret, a PEM public key or an identity provider's JWKS,
//! and how claims map to pgcast's user, role and workshop.

use std::fmt;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::config::{format_duration, parse_duration, parse_timeout, Secret};

use pgcast_gateway::GatewayConfig;
use pgcast_gateway::{
    parse_jwks_url, public_key_algorithm, Algorithm, ClaimMapping, ClaimPointer, Jwks,
    JwksSettings, PublicKey, RoleMap,
};

/// Where `serve` gets the keys that verify client tokens: exactly one of a secret, a public key
/// file or a JWKS URL.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct KeyArgs {
    /// HS256 secret that verifies client tokens (and signs them, for `pgcast token`), at least
    /// 32 bytes (e.g. the output of `openssl rand -hex 32`). Exactly one of --jwt-secret,
    /// --jwt-public-key and --jwt-jwks-url is required.
    #[arg(
        long = "jwt-secret",
        env = "PGCAST_JWT_SECRET",
        hide_env_values = true,
        value_name = "SECRET",
        value_parser = Secret::parse
    )]
    pub jwt_secret: Option<Secret>,
    /// PEM file with the identity provider's public key (RSA, EC P-256 or P-384, Ed25519),
    /// instead of a secret. Tokens must be signed with the key's algorithm: RS256, ES256, ES384
    /// or EdDSA by its type, or --jwt-algorithm.
    #[arg(
        long = "jwt-public-key",
        env = "PGCAST_JWT_PUBLIC_KEY",
        value_name = "FILE",
        value_parser = PublicKeyFile::parse
    )]
    pub jwt_public_key: Option<PublicKeyFile>,
    /// The identity provider's JWKS URL (http or https, e.g.
    /// https://id.example/.well-known/jwks.json), instead of a secret. Its keys are read at
    /// start, cached, and read again for a token with an unknown `kid`; each verifies only its
    /// own algorithm (`alg`, or RS256, ES256, ES384 or EdDSA by its type).
    #[arg(
        long = "jwt-jwks-url",
        env = "PGCAST_JWT_JWKS_URL",
        value_name = "URL",
        value_parser = parse_jwks_url_text
    )]
    pub jwt_jwks_url: Option<String>,
}

impl KeyArgs {
    /// The HS256 secret's bytes; empty when a public key or a JWKS URL verifies tokens.
    pub fn secret_bytes(&self) -> Vec<u8> {
        self.jwt_secret
            .as_ref()
            .map(|s| s.expose().to_vec())
            .unwrap_or_default()
    }
}

/// `jwt_secret=<redacted>`, `jwt_public_key=<file>` or `jwt_jwks_url=<url>`.
impl fmt::Display for KeyArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.jwt_secret, &self.jwt_public_key, &self.jwt_jwks_url) {
            (Some(secret), _, _) => write!(f, "jwt_secret={secret}"),
            (_, Some(file), _) => write!(f, "jwt_public_key={}", file.path.display()),
            (_, _, Some(url)) => write!(f, "jwt_jwks_url={url}"),
            _ => f.write_str("jwt_key=none"),
        }
    }
}

/// Largest `--jwt-public-key` file read: a 4096-bit RSA public key in PEM is under 1 KiB.
const MAX_PUBLIC_KEY_FILE: u64 = 64 << 10;

/// A `--jwt-public-key` file, read and checked when the command line is parsed.
#[derive(Debug, Clone)]
pub struct PublicKeyFile {
    /// The file as given.
    pub path: PathBuf,
    /// Its key.
    pub key: PublicKey,
}

impl PublicKeyFile {
    /// Reads `path` (at most 64 KiB) as one PEM public key.
    pub fn parse(path: &str) -> Result<PublicKeyFile, String> {
        use std::io::Read;
        let mut pem = Vec::new();
        std::fs::File::open(path)
            .and_then(|file| file.take(MAX_PUBLIC_KEY_FILE + 1).read_to_end(&mut pem))
            .map_err(|e| format!("cannot read the file ({e})"))?;
        if pem.len() as u64 > MAX_PUBLIC_KEY_FILE {
            return Err("larger than 64 KiB: not a PEM public key".to_owned());
        }
        let key = PublicKey::from_pem(&pem).map_err(|e| e.to_string())?;
        Ok(PublicKeyFile {
            path: PathBuf::from(path),
            key,
        })
    }
}

fn parse_jwks_url_text(text: &str) -> Result<String, String> {
    parse_jwks_url(text).map(|url| url.to_string())
}

/// Longest `--jwt-jwks-max-age`.
const MAX_JWKS_MAX_AGE: Duration = Duration::from_secs(7 * 86_400);

fn parse_jwks_max_age(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d > MAX_JWKS_MAX_AGE {
        return Err("must be at most 7d".to_owned());
    }
    Ok(d)
}

/// How `serve` reads an identity provider's tokens: the algorithm of its keys, how its JWKS is
/// cached, and where the user, role and workshop are in its claims.
#[derive(Debug, Clone, Args)]
pub struct IdentityArgs {
    /// The one algorithm tokens are signed with: RS256, RS384, RS512, PS256, PS384, PS512, ES256,
    /// ES384 or EdDSA. With --jwt-public-key it must fit the key (default: RS256, ES256, ES384
    /// or EdDSA by the key's type); with --jwt-jwks-url only keys of this algorithm are used
    /// (default: each key's own).
    #[arg(
        long = "jwt-algorithm",
        env = "PGCAST_JWT_ALGORITHM",
        value_name = "ALGORITHM",
        value_parser = public_key_algorithm
    )]
    pub jwt_algorithm: Option<Algorithm>,
    /// With --jwt-jwks-url: the cached keys are read again in the background once they are this
    /// old, so keys the provider removed stop being accepted. At most 7d.
    #[arg(
        long = "jwt-jwks-max-age",
        env = "PGCAST_JWT_JWKS_MAX_AGE",
        default_value = "10m",
        value_name = "DURATION",
        value_parser = parse_jwks_max_age
    )]
    pub jwt_jwks_max_age: Duration,
    /// With --jwt-jwks-url: shortest time between two reads of the keys. A token whose `kid`
    /// is not cached causes a read only when the last one is older (one read at a time,
    /// however many connections ask); otherwise it is refused. At most 1h.
    #[arg(
        long = "jwt-jwks-min-refresh",
        env = "PGCAST_JWT_JWKS_MIN_REFRESH",
        default_value = "30s",
        value_name = "DURATION",
        value_parser = parse_timeout
    )]
    pub jwt_jwks_min_refresh: Duration,
    /// JSON pointer to the user's id (a uuid) in the token's claims, e.g. `/sub` or
    /// `/https:~1~1app.example~1user_id` (a `/` in a claim name is written `~1`).
    #[arg(
        long = "claim-sub",
        env = "PGCAST_CLAIM_SUB",
        default_value = "/sub",
        value_name = "POINTER",
        value_parser = ClaimPointer::parse
    )]
    pub claim_sub: ClaimPointer,
    /// JSON pointer to the role: a string, or an array of strings of which exactly one names a
    /// pgcast role (e.g. Keycloak's `/realm_access/roles`).
    #[arg(
        long = "claim-role",
        env = "PGCAST_CLAIM_ROLE",
        default_value = "/role",
        value_name = "POINTER",
        value_parser = ClaimPointer::parse
    )]
    pub claim_role: ClaimPointer,
    /// JSON pointer to a mechanic's workshop id (a uuid; absent or null: none).
    #[arg(
        long = "claim-workshop",
        env = "PGCAST_CLAIM_WORKSHOP",
        default_value = "/workshop_id",
        value_name = "POINTER",
        value_parser = ClaimPointer::parse
    )]
    pub claim_workshop: ClaimPointer,
    /// The provider's role values and the pgcast role each stands for, comma-separated (e.g.
    /// `garage-mechanic=mechanic,backend=service`); only mapped values count. Default: the role
    /// claim holds mechanic, customer or service.
    #[arg(
        long = "role-map",
        env = "PGCAST_ROLE_MAP",
        value_name = "VALUE=ROLE,...",
        value_parser = RoleMap::parse
    )]
    pub role_map: Option<RoleMap>,
}

impl IdentityArgs {
    /// Sets the gateway's key source (other than the secret, which `serve` sets) and claim
    /// mapping, or says why the flags do not go together (one line).
    pub(super) fn configure(
        &self,
        keys: &KeyArgs,
        gateway: &mut GatewayConfig,
    ) -> Result<(), String> {
        if let Some(file) = &keys.jwt_public_key {
            let key = match self.jwt_algorithm {
                Some(algorithm) => file.key.clone().with_algorithm(algorithm).map_err(|e| {
                    format!(
                        "--jwt-algorithm {algorithm:?} does not fit --jwt-public-key {}: {e}",
                        file.path.display()
                    )
                })?,
                None => file.key.clone(),
            };
            gateway.jwt_public_key = Some(key);
        } else if let Some(url) = &keys.jwt_jwks_url {
            let settings = JwksSettings {
                min_refresh: self.jwt_jwks_min_refresh,
                max_age: self.jwt_jwks_max_age,
                algorithm: self.jwt_algorithm,
                ..JwksSettings::default()
            };
            let jwks = Jwks::new(url, settings).map_err(|e| format!("--jwt-jwks-url: {e}"))?;
            gateway.jwt_jwks = Some(jwks);
        } else if self.jwt_algorithm.is_some() {
            return Err(
                "--jwt-algorithm applies to --jwt-public-key and --jwt-jwks-url; --jwt-secret \
                 verifies HS256 only"
                    .to_owned(),
            );
        }
        gateway.jwt_claims = ClaimMapping {
            sub: self.claim_sub.clone(),
            role: self.claim_role.clone(),
            workshop: self.claim_workshop.clone(),
            roles: self.role_map.clone().unwrap_or_default(),
        };
        Ok(())
    }

    /// ` jwt_algorithm=… [jwt_jwks_max_age=… jwt_jwks_min_refresh=…] claim_sub=… claim_role=…
    /// claim_workshop=… role_map=…` for the summary, when an identity provider's key or a claim
    /// mapping is configured (a plain secret with pgcast's own claims adds nothing).
    pub(super) fn write_summary(&self, f: &mut fmt::Formatter<'_>, keys: &KeyArgs) -> fmt::Result {
        let defaults = ClaimMapping::default();
        let provider = keys.jwt_public_key.is_some() || keys.jwt_jwks_url.is_some();
        let mapped = self.claim_sub != defaults.sub
            || self.claim_role != defaults.role
            || self.claim_workshop != defaults.workshop
            || self.role_map.is_some();
        if !provider && !mapped {
            return Ok(());
        }
        let algorithm = match (&keys.jwt_public_key, &self.jwt_algorithm) {
            (_, Some(algorithm)) => format!("{algorithm:?}"),
            (Some(file), None) => format!("{:?}", file.key.algorithm()),
            (None, None) if keys.jwt_jwks_url.is_some() => "per-key".to_owned(),
            (None, None) => "HS256".to_owned(),
        };
        write!(f, " jwt_algorithm={algorithm}")?;
        if keys.jwt_jwks_url.is_some() {
            write!(
                f,
                " jwt_jwks_max_age={} jwt_jwks_min_refresh={}",
                format_duration(self.jwt_jwks_max_age),
                format_duration(self.jwt_jwks_min_refresh)
            )?;
        }
        write!(
            f,
            " claim_sub={} claim_role={} claim_workshop={} role_map={}",
            self.claim_sub,
            self.claim_role,
            self.claim_workshop,
            self.role_map.clone().unwrap_or_default()
        )
    }
}
