//! Public keys that verify tokens: one PEM file, or the keys of a JWKS document.
//!
//! Every key is loaded with the one algorithm it verifies, fixed when it is loaded: from
//! `--jwt-algorithm`, the key's own `alg` (JWKS) or its type (RSA → RS256, EC P-256 → ES256,
//! P-384 → ES384, Ed25519 → EdDSA). A token is checked only with a key whose algorithm is the
//! one its header names, so a public key can never serve as an HMAC secret (the classic
//! algorithm-confusion forgery) and `alg: none` names no key at all.

use std::fmt;
use std::sync::Arc;

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use simple_asn1::{oid, ASN1Block};

use crate::GatewayError;

/// A key ready to verify signatures of one algorithm.
pub(crate) struct VerifyingKey {
    /// Its `kid` (JWKS keys that have one).
    pub(crate) kid: Option<String>,
    /// The one algorithm it verifies.
    pub(crate) algorithm: Algorithm,
    pub(crate) key: DecodingKey,
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// What a public key is, as read from the key itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyType {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyType {
    /// The algorithm a key of this type verifies unless told otherwise.
    fn default_algorithm(self) -> Algorithm {
        match self {
            KeyType::Rsa => Algorithm::RS256,
            KeyType::P256 => Algorithm::ES256,
            KeyType::P384 => Algorithm::ES384,
            KeyType::Ed25519 => Algorithm::EdDSA,
        }
    }

    /// Can a key of this type verify `algorithm`?
    fn fits(self, algorithm: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyType::Rsa => matches!(algorithm, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyType::P256 => algorithm == ES256,
            KeyType::P384 => algorithm == ES384,
            KeyType::Ed25519 => algorithm == EdDSA,
        }
    }

    fn name(self) -> &'static str {
        match self {
            KeyType::Rsa => "RSA",
            KeyType::P256 => "EC P-256",
            KeyType::P384 => "EC P-384",
            KeyType::Ed25519 => "Ed25519",
        }
    }
}

/// The public-key algorithms pgcast verifies, by their JOSE names.
pub const PUBLIC_KEY_ALGORITHMS: &str =
    "RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA";

/// A public-key signature algorithm by its JOSE name (`RS256`, `ES256`, `EdDSA`, …). HMAC
/// algorithms and `none` are not public-key algorithms and are refused.
pub fn public_key_algorithm(name: &str) -> Result<Algorithm, String> {
    let algorithm: Algorithm = name
        .parse()
        .map_err(|_| format!("expected one of {PUBLIC_KEY_ALGORITHMS}"))?;
    if matches!(
        algorithm,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    ) {
        return Err(format!(
            "{name} is an HMAC algorithm (use --jwt-secret); expected one of \
             {PUBLIC_KEY_ALGORITHMS}"
        ));
    }
    Ok(algorithm)
}

/// A public key read from a PEM file (`-----BEGIN PUBLIC KEY-----`, or `RSA PUBLIC KEY`): RSA
/// (at least 2048 bits when verifying), EC P-256 or P-384, or Ed25519. Cheap to clone.
#[derive(Clone)]
pub struct PublicKey {
    key: Arc<VerifyingKey>,
    key_type: KeyType,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PublicKey({}, {:?})",
            self.key_type.name(),
            self.algorithm()
        )
    }
}

impl PublicKey {
    /// Reads one public key in PEM form. Its algorithm is the default of its type (RS256,
    /// ES256, ES384 or EdDSA); [`with_algorithm`](Self::with_algorithm) picks another an RSA
    /// key can verify. Private keys and certificates are refused with a hint.
    pub fn from_pem(pem: &[u8]) -> Result<PublicKey, GatewayError> {
        let bad = |why: &str| GatewayError::KeyConfig(why.to_owned());
        let blocks = pem::parse_many(pem).map_err(|e| bad(&format!("not a PEM file ({e})")))?;
        let block = match blocks.as_slice() {
            [] => return Err(bad("no PEM block (-----BEGIN PUBLIC KEY-----) in the file")),
            [block] => block,
            _ => {
                return Err(bad(
                    "the file has several PEM blocks; give exactly one public key",
                ))
            }
        };
        let key_type =
            match block.tag() {
                "RSA PUBLIC KEY" => KeyType::Rsa,
                "PUBLIC KEY" => spki_key_type(block.contents())?,
                "CERTIFICATE" => return Err(bad(
                    "this is a certificate; give its public key (openssl x509 -pubkey -noout -in \
                     cert.pem)",
                )),
                tag if tag.contains("PRIVATE KEY") => return Err(bad(
                    "this is a private key; give the public key (openssl pkey -pubout -in key.pem)",
                )),
                tag => {
                    return Err(bad(&format!(
                        "a PEM block of type {tag:?} is not a public key"
                    )))
                }
            };
        let key = match key_type {
            KeyType::Rsa => DecodingKey::from_rsa_pem(pem),
            KeyType::P256 | KeyType::P384 => DecodingKey::from_ec_pem(pem),
            KeyType::Ed25519 => DecodingKey::from_ed_pem(pem),
        }
        .map_err(|e| bad(&format!("unreadable {} public key ({e})", key_type.name())))?;
        Ok(PublicKey {
            key: Arc::new(VerifyingKey {
                kid: None,
                algorithm: key_type.default_algorithm(),
                key,
            }),
            key_type,
        })
    }

    /// The same key verifying `algorithm` instead, if a key of its type can (an RSA key:
    /// RS256/384/512 or PS256/384/512; an EC or Ed25519 key has exactly one).
    pub fn with_algorithm(self, algorithm: Algorithm) -> Result<PublicKey, GatewayError> {
        if !self.key_type.fits(algorithm) {
            return Err(GatewayError::KeyConfig(format!(
                "an {} key cannot verify {algorithm:?}",
                self.key_type.name()
            )));
        }
        Ok(PublicKey {
            key: Arc::new(VerifyingKey {
                kid: None,
                algorithm,
                key: self.key.key.clone(),
            }),
            key_type: self.key_type,
        })
    }

    /// The one algorithm this key verifies.
    pub fn algorithm(&self) -> Algorithm {
        self.key.algorithm
    }

    pub(crate) fn verifying_key(&self) -> &Arc<VerifyingKey> {
        &self.key
    }
}

/// The key type of a DER SubjectPublicKeyInfo (RFC 5280 §4.1.2.7): its algorithm identifier
/// and, for EC keys, the named curve.
fn spki_key_type(der: &[u8]) -> Result<KeyType, GatewayError> {
    let unsupported = || {
        GatewayError::KeyConfig("not an RSA, EC P-256, EC P-384 or Ed25519 public key".to_owned())
    };
    let blocks = simple_asn1::from_der(der).map_err(|_| unsupported())?;
    let Some(ASN1Block::Sequence(_, spki)) = blocks.first() else {
        return Err(unsupported());
    };
    let Some(ASN1Block::Sequence(_, algorithm)) = spki.first() else {
        return Err(unsupported());
    };
    let oid_at = |i: usize| match algorithm.get(i) {
        Some(ASN1Block::ObjectIdentifier(_, oid)) => Some(oid),
        _ => None,
    };
    let Some(kind) = oid_at(0) else {
        return Err(unsupported());
    };
    if *kind == oid!(1, 2, 840, 113549, 1, 1, 1) {
        Ok(KeyType::Rsa)
    } else if *kind == oid!(1, 3, 101, 112) {
        Ok(KeyType::Ed25519)
    } else if *kind == oid!(1, 2, 840, 10045, 2, 1) {
        match oid_at(1) {
            Some(curve) if *curve == oid!(1, 2, 840, 10045, 3, 1, 7) => Ok(KeyType::P256),
            Some(curve) if *curve == oid!(1, 3, 132, 0, 34) => Ok(KeyType::P384),
            _ => Err(GatewayError::KeyConfig(
                "an EC key on a curve other than P-256 or P-384".to_owned(),
            )),
        }
    } else {
        Err(unsupported())
    }
}

/// A signing key of a JWKS document, with its algorithm: the key's `alg` when it has one, else
/// the default of its type (`only`, when given, for an RSA key without `alg`). With `only`,
/// keys of other algorithms are skipped. Encryption keys (`use: enc`), symmetric keys
/// (`kty: oct`: a published HMAC secret is no secret) and curves ring cannot verify are
/// skipped too; the error says why.
pub(crate) fn from_jwk(
    value: serde_json::Value,
    only: Option<Algorithm>,
) -> Result<VerifyingKey, String> {
    let jwk: Jwk = serde_json::from_value(value).map_err(|e| format!("not a usable JWK ({e})"))?;
    if matches!(
        jwk.common.public_key_use,
        Some(ref u) if *u != PublicKeyUse::Signature
    ) {
        return Err("not a signature key (use)".to_owned());
    }
    if let Some(ops) = &jwk.common.key_operations {
        if !ops.contains(&KeyOperations::Verify) {
            return Err("not a verification key (key_ops)".to_owned());
        }
    }
    let key_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyType::Rsa,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => KeyType::P256,
            EllipticCurve::P384 => KeyType::P384,
            _ => return Err("an EC curve other than P-256 or P-384".to_owned()),
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => KeyType::Ed25519,
            _ => return Err("an OKP curve other than Ed25519".to_owned()),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err("a symmetric key (kty oct) is never used".to_owned())
        }
    };
    let algorithm = match jwk.common.key_algorithm {
        Some(alg) => signature_algorithm(alg)
            .ok_or_else(|| format!("{alg} is not a signature algorithm pgcast verifies"))?,
        None => match only {
            Some(alg) if key_type.fits(alg) => alg,
            _ => key_type.default_algorithm(),
        },
    };
    if !key_type.fits(algorithm) {
        return Err(format!(
            "an {} key cannot verify {algorithm:?}",
            key_type.name()
        ));
    }
    if only.is_some_and(|only| only != algorithm) {
        return Err(format!("{algorithm:?} is not the configured algorithm"));
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unreadable key ({e})"))?;
    Ok(VerifyingKey {
        kid: jwk.common.key_id,
        algorithm,
        key,
    })
}

/// The signature algorithm a JWK's `alg` names; `None` for HMAC and encryption algorithms.
fn signature_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// Key pairs for tests: private keys as jsonwebtoken signs with, public keys as PEM files and
/// JWKs.
#[cfg(test)]
pub(crate) mod test_keys {
    use std::sync::OnceLock;

    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use base64::Engine;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use ring::signature::{
        EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING,
        ECDSA_P384_SHA384_FIXED_SIGNING,
    };
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    use rsa::traits::PublicKeyParts;
    use serde_json::{json, Value};

    /// A key pair: signs tokens, and shows its public half as PEM and as a JWK.
    pub(crate) struct TestKey {
        pub(crate) algorithm: Algorithm,
        signing: EncodingKey,
        /// The public key as a PEM file (SubjectPublicKeyInfo).
        pub(crate) public_pem: String,
        /// The private key as a PEM file (PKCS#8), to check it is refused as a public key.
        pub(crate) private_pem: String,
        jwk: Value,
    }

    impl TestKey {
        /// A token with `claims`, signed with this key, its header naming `kid` (if any).
        pub(crate) fn sign(&self, kid: Option<&str>, claims: &Value) -> String {
            let mut header = Header::new(self.algorithm);
            header.kid = kid.map(str::to_owned);
            jsonwebtoken::encode(&header, claims, &self.signing).unwrap()
        }

        /// The public key as a JWK with `kid` and, when `with_alg`, its `alg`.
        pub(crate) fn jwk(&self, kid: &str, with_alg: bool) -> Value {
            let mut jwk = self.jwk.clone();
            jwk["kid"] = json!(kid);
            jwk["use"] = json!("sig");
            if with_alg {
                jwk["alg"] = json!(format!("{:?}", self.algorithm));
            }
            jwk
        }
    }

    fn pem(label: &str, der: &[u8]) -> String {
        let body = STANDARD.encode(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A new RSA-2048 key verifying `algorithm` (RS* or PS*). Generating one takes a while
    /// in a debug build, so tests share [`rsa`].
    pub(crate) fn new_rsa(algorithm: Algorithm) -> TestKey {
        let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        let private_pem = private.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
        let public = private.to_public_key();
        TestKey {
            algorithm,
            signing: EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap(),
            public_pem: public.to_public_key_pem(LineEnding::LF).unwrap(),
            private_pem,
            jwk: json!({
                "kty": "RSA",
                "n": b64(&public.n().to_bytes_be()),
                "e": b64(&public.e().to_bytes_be()),
            }),
        }
    }

    /// The test process's RSA key (RS256).
    pub(crate) fn rsa() -> &'static TestKey {
        static KEY: OnceLock<TestKey> = OnceLock::new();
        KEY.get_or_init(|| new_rsa(Algorithm::RS256))
    }

    /// A new EC key: P-256 for ES256, P-384 for ES384.
    pub(crate) fn ec(algorithm: Algorithm) -> TestKey {
        let rng = ring::rand::SystemRandom::new();
        let (signing_alg, curve_oid, curve, size): (_, &[u8], _, _) = match algorithm {
            Algorithm::ES256 => (
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
                "P-256",
                32,
            ),
            Algorithm::ES384 => (
                &ECDSA_P384_SHA384_FIXED_SIGNING,
                &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
                "P-384",
                48,
            ),
            other => panic!("not an EC algorithm: {other:?}"),
        };
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(signing_alg, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(signing_alg, pkcs8.as_ref(), &rng).unwrap();
        let point = pair.public_key().as_ref().to_vec();
        // SubjectPublicKeyInfo: SEQUENCE { SEQUENCE { id-ecPublicKey, curve }, BIT STRING }.
        let ec_public_key = [0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
        let alg_id = der(0x30, &[&ec_public_key[..], curve_oid].concat());
        let bits = der(0x03, &[&[0u8][..], &point].concat());
        let spki = der(0x30, &[alg_id, bits].concat());
        TestKey {
            algorithm,
            signing: EncodingKey::from_ec_der(pkcs8.as_ref()),
            public_pem: pem("PUBLIC KEY", &spki),
            private_pem: pem("PRIVATE KEY", pkcs8.as_ref()),
            jwk: json!({
                "kty": "EC",
                "crv": curve,
                "x": b64(&point[1..1 + size]),
                "y": b64(&point[1 + size..]),
            }),
        }
    }

    /// A new Ed25519 key (EdDSA).
    pub(crate) fn ed25519() -> TestKey {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let public = pair.public_key().as_ref().to_vec();
        let alg_id = der(0x30, &[0x06, 0x03, 0x2b, 0x65, 0x70]);
        let bits = der(0x03, &[&[0u8][..], &public].concat());
        let spki = der(0x30, &[alg_id, bits].concat());
        TestKey {
            algorithm: Algorithm::EdDSA,
            signing: EncodingKey::from_ed_der(pkcs8.as_ref()),
            public_pem: pem("PUBLIC KEY", &spki),
            private_pem: pem("PRIVATE KEY", pkcs8.as_ref()),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": b64(&public)}),
        }
    }

    /// One DER element (short lengths only: test keys are small).
    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        assert!(content.len() < 128);
        [&[tag, content.len() as u8][..], content].concat()
    }
}
