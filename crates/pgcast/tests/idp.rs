//! Tokens of an identity provider against the built `pgcast serve`: RS256 and ES256 keys
//! published by a local JWKS endpoint (rotated while serve runs), a PEM public key, issuer and
//! audience binding, claim mapping of a provider-shaped (Keycloak-like) token, and the flags'
//! refusals. Every check is a real WebSocket: `auth`, then `ready` or `unauthorized` and close
//! 1008.

mod common;
mod running;

use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::{fresh_db, pgcast, run};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pgcast_testkit::http::Scripted;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use running::{Next, Process, Server, Ws, WAIT};
use serde_json::{json, Value};
use tokio::process::Command;
use tokio::time::Instant;
use uuid::Uuid;

const ISSUER: &str = "https://id.garage.example/realms/garage";
const AUDIENCE: &str = "pgcast";
/// Where this realm's tokens keep the workshop (a `/` in a claim name is `~1` in a pointer).
const WORKSHOP_CLAIM: &str = "https://garage.example/workshop";
const ROLE_MAP: &str = "garage-mechanic=mechanic,garage-customer=customer,garage-backend=service";
/// `--jwt-jwks-min-refresh` of these tests: short, so that a rotation is seen within a test.
const MIN_REFRESH: Duration = Duration::from_secs(1);

/// Variables of the identity-provider flags, removed so the machine's environment cannot
/// change what a test sees (`common` removes the older ones).
const IDP_ENV: [&str; 10] = [
    "PGCAST_JWT_PUBLIC_KEY",
    "PGCAST_JWT_JWKS_URL",
    "PGCAST_JWT_ALGORITHM",
    "PGCAST_JWT_JWKS_MAX_AGE",
    "PGCAST_JWT_JWKS_MIN_REFRESH",
    "PGCAST_CLAIM_SUB",
    "PGCAST_CLAIM_ROLE",
    "PGCAST_CLAIM_WORKSHOP",
    "PGCAST_ROLE_MAP",
    "PGCAST_JWT_SECRET",
];

/// The built binary with `args` and none of the identity-provider variables.
fn pgcast_idp(args: &[&str]) -> Command {
    let mut cmd = pgcast([]);
    for var in IDP_ENV {
        cmd.env_remove(var);
    }
    // The JWKS client honours proxy variables; the test provider is on loopback.
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.args(args);
    cmd
}

/// `pgcast serve` on a port of its own against `url`, with `extra` (its key source and token
/// settings); per-address limits lifted as for every process test.
async fn serve(url: &str, extra: &[&str]) -> Server {
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        url,
        "--migrate",
    ];
    args.extend(extra);
    let mut cmd = pgcast_idp(&args);
    cmd.env("PGCAST_MAX_CONNECTIONS_PER_IP", "0")
        .env("PGCAST_CONNECTION_RATE_PER_IP", "0");
    Server::ready(Process::spawn(cmd)).await
}

// Keys.

/// A key pair of the provider: signs tokens, publishes its public half.
struct Key {
    algorithm: Algorithm,
    signing: EncodingKey,
    /// The public key as a JWK (without `kid`).
    jwk: Value,
    /// The public key as a PEM file.
    public_pem: String,
}

impl Key {
    fn rsa() -> Key {
        let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key");
        let pem = private.to_pkcs8_pem(LineEnding::LF).expect("PKCS#8");
        let public = private.to_public_key();
        Key {
            algorithm: Algorithm::RS256,
            signing: EncodingKey::from_rsa_pem(pem.as_bytes()).expect("signing key"),
            jwk: json!({
                "kty": "RSA",
                "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
            }),
            public_pem: public.to_public_key_pem(LineEnding::LF).expect("SPKI"),
        }
    }

    fn p256() -> Key {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = pair.public_key().as_ref();
        // SubjectPublicKeyInfo of a P-256 key: a fixed prefix, then the 65-byte point.
        let mut spki = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        spki.extend_from_slice(point);
        Key {
            algorithm: Algorithm::ES256,
            signing: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk: json!({
                "kty": "EC",
                "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&point[33..]),
            }),
            public_pem: format!(
                "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
                STANDARD.encode(&spki)
            ),
        }
    }

    /// The JWK as a provider publishes it: `kid`, `use`, and `alg` when `with_alg`.
    fn published(&self, kid: &str, with_alg: bool) -> Value {
        let mut jwk = self.jwk.clone();
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        if with_alg {
            jwk["alg"] = json!(format!("{:?}", self.algorithm));
        }
        jwk
    }

    fn sign(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.signing).expect("sign")
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An access token as a Keycloak realm issues it: roles in `realm_access.roles`, the
/// workshop in a namespaced claim, two audiences.
fn provider_claims(sub: Uuid, roles: &[&str], workshop: Option<Uuid>) -> Value {
    let mut claims = json!({
        "exp": now() + 600,
        "iat": now(),
        "jti": Uuid::new_v4().to_string(),
        "iss": ISSUER,
        "aud": [AUDIENCE, "account"],
        "sub": sub.to_string(),
        "typ": "Bearer",
        "azp": "garage-web",
        "realm_access": {"roles": roles},
        "scope": "openid profile email",
        "preferred_username": "sam",
    });
    if let Some(workshop) = workshop {
        claims[WORKSHOP_CLAIM] = json!(workshop.to_string());
    }
    claims
}

// A JWKS endpoint.

/// The provider's JWKS endpoint on 127.0.0.1: serves the current document, counts requests.
struct Provider {
    server: Scripted,
}

impl Provider {
    async fn start(keys: &[Value]) -> Provider {
        let server = Scripted::start(200, json!({ "keys": keys }).to_string())
            .await
            .unwrap();
        Provider { server }
    }

    fn url(&self) -> String {
        format!(
            "http://{}/realms/garage/protocol/openid-connect/certs",
            self.server.addr()
        )
    }

    fn publish(&self, keys: &[Value]) {
        self.server.answer(200, json!({ "keys": keys }).to_string());
    }

    fn fail(&self) {
        self.server.answer(503, "unavailable");
    }

    fn delay(&self, delay: Duration) {
        self.server.delay(delay);
    }

    fn requests(&self) -> usize {
        self.server.requests()
    }

    /// Waits until `MIN_REFRESH` has passed since serve last read the keys, so that the next
    /// unknown `kid` makes it read them again.
    async fn wait_until_refresh_allowed(&self) {
        let last = self.server.last_request().expect("keys were read");
        let ready = last + MIN_REFRESH + Duration::from_millis(200);
        tokio::time::sleep_until(ready).await;
    }
}

// WebSocket outcomes.

/// Authenticates with `token` and expects `ready`; returns the socket and the frame.
async fn accepted(server: &Server, token: &str) -> (Ws, Value) {
    let mut ws = Ws::open(server.addr).await.expect("connect");
    ws.send(json!({"type": "auth", "token": token})).await;
    let ready = ws.recv().await;
    assert_eq!(
        ready["type"],
        "ready",
        "{ready}; stderr:\n{}",
        server.process.stderr()
    );
    (ws, ready)
}

/// Authenticates with `token` and expects `unauthorized`, then close 1008.
async fn refused(server: &Server, token: &str, why: &str) {
    let mut ws = Ws::open(server.addr).await.expect("connect");
    ws.send(json!({"type": "auth", "token": token})).await;
    match ws.next(WAIT).await {
        Next::Json(v) if v["type"] == "error" && v["code"] == "unauthorized" => {}
        other => panic!("{why}: expected unauthorized, got {other:?}"),
    }
    ws.expect_close(1008).await;
}

fn jwks_flags(provider: &Provider) -> Vec<String> {
    [
        "--jwt-jwks-url",
        &provider.url(),
        "--jwt-issuer",
        ISSUER,
        "--jwt-audience",
        AUDIENCE,
        "--jwt-jwks-min-refresh",
        "1s",
        "--claim-role",
        "/realm_access/roles",
        "--claim-workshop",
        "/https:~1~1garage.example~1workshop",
        "--role-map",
        ROLE_MAP,
    ]
    .map(str::to_owned)
    .to_vec()
}

#[tokio::test]
async fn jwks_tokens_rs256_and_es256_with_rotation_binding_and_mapped_claims() {
    let (rsa_1, rsa_2) = tokio::task::spawn_blocking(|| (Key::rsa(), Key::rsa()))
        .await
        .unwrap();
    let (ec_1, ec_2, stranger) = (Key::p256(), Key::p256(), Key::p256());
    // One key with `alg`, one without (its type says ES256), as providers publish them.
    let provider = Provider::start(&[
        rsa_1.published("rsa-1", true),
        ec_1.published("ec-1", false),
    ])
    .await;
    let (db, admin) = fresh_db().await;
    let flags = jwks_flags(&provider);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = serve(db.url(), &flags).await;

    // The summary names the key source and the mapping; the keys were read at start.
    let stderr = server.process.stderr();
    assert!(
        stderr.contains(&format!(
            "jwt_jwks_url={} jwt_issuer={ISSUER} jwt_audience={AUDIENCE} jwt_algorithm=per-key \
             jwt_jwks_max_age=10m jwt_jwks_min_refresh=1s claim_sub=/sub \
             claim_role=/realm_access/roles claim_workshop=/https:~1~1garage.example~1workshop \
             role_map={ROLE_MAP} retention=",
            provider.url()
        )),
        "{stderr}"
    );
    assert_eq!(provider.requests(), 1, "one read at start");

    // RS256: a workshop mechanic, mapped from the realm's roles and the workshop claim.
    let (mechanic, workshop, other_workshop) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let token = rsa_1.sign(
        Some("rsa-1"),
        &provider_claims(
            mechanic,
            &["offline_access", "garage-mechanic"],
            Some(workshop),
        ),
    );
    let (mut ws, ready) = accepted(&server, &token).await;
    assert_eq!(ready["user_id"], mechanic.to_string());
    assert_eq!(ready["role"], "mechanic");
    ws.subscribe(&format!("workshop:{workshop}"), json!({}))
        .await;
    ws.send(json!({"type": "subscribe", "id": "x", "topic": format!("workshop:{other_workshop}")}))
        .await;
    let reply = ws.recv().await;
    assert_eq!(reply["code"], "forbidden", "{reply}");
    // And the workshop's events reach it.
    admin
        .execute(
            "INSERT INTO session_assignments (session_id, workshop_id, status, customer_name) \
             VALUES (gen_random_uuid(), $1, 'queued', 'Ana')",
            &[&workshop],
        )
        .await
        .expect("insert");
    let event = ws.events(1).await.remove(0);
    assert_eq!(event["assignment"]["workshop_id"], workshop.to_string());

    // ES256: a customer (no workshop), and a backend service.
    let customer = Uuid::new_v4();
    let token = ec_1.sign(
        Some("ec-1"),
        &provider_claims(customer, &["garage-customer"], None),
    );
    let (_customer_ws, ready) = accepted(&server, &token).await;
    assert_eq!(
        (ready["user_id"].as_str(), ready["role"].as_str()),
        (Some(customer.to_string().as_str()), Some("customer"))
    );
    let token = ec_1.sign(
        Some("ec-1"),
        &provider_claims(Uuid::new_v4(), &["garage-backend"], None),
    );
    let (mut service, ready) = accepted(&server, &token).await;
    assert_eq!(ready["role"], "service");
    service.subscribe("assignments", json!({})).await;

    // Refused: wrong kid, a known kid with another key's signature, wrong iss or aud, no
    // mapped role, two mapped roles, and an HS256 token "signed" with the public key.
    let claims = || provider_claims(Uuid::new_v4(), &["garage-mechanic"], Some(workshop));
    refused(
        &server,
        &stranger.sign(Some("stranger"), &claims()),
        "unknown kid",
    )
    .await;
    refused(
        &server,
        &stranger.sign(Some("ec-1"), &claims()),
        "kid of another key",
    )
    .await;
    refused(
        &server,
        &rsa_2.sign(Some("rsa-1"), &claims()),
        "kid of another RSA key",
    )
    .await;
    refused(
        &server,
        &ec_1.sign(Some("rsa-1"), &claims()),
        "ES256 with an RS256 kid",
    )
    .await;
    let mut wrong_iss = claims();
    wrong_iss["iss"] = json!("https://id.garage.example/realms/other");
    refused(&server, &rsa_1.sign(Some("rsa-1"), &wrong_iss), "wrong iss").await;
    let mut wrong_aud = claims();
    wrong_aud["aud"] = json!(["account", "billing"]);
    refused(&server, &rsa_1.sign(Some("rsa-1"), &wrong_aud), "wrong aud").await;
    let mut no_aud = claims();
    no_aud.as_object_mut().unwrap().remove("aud");
    refused(&server, &ec_1.sign(Some("ec-1"), &no_aud), "no aud").await;
    let unmapped = provider_claims(Uuid::new_v4(), &["offline_access", "mechanic"], None);
    refused(
        &server,
        &rsa_1.sign(Some("rsa-1"), &unmapped),
        "no mapped role",
    )
    .await;
    let two = provider_claims(Uuid::new_v4(), &["garage-mechanic", "garage-backend"], None);
    refused(&server, &rsa_1.sign(Some("rsa-1"), &two), "two roles").await;
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".to_owned());
    let confused = jsonwebtoken::encode(
        &header,
        &claims(),
        &EncodingKey::from_secret(rsa_1.public_pem.as_bytes()),
    )
    .unwrap();
    refused(&server, &confused, "HS256 with the public key as secret").await;
    let reads_before_rotation = provider.requests();
    assert!(
        reads_before_rotation <= 2,
        "{reads_before_rotation} reads: unknown kids within min_refresh read at most once"
    );

    // Rotation: rsa-2 appears, rsa-1 is removed. A token of the new key is accepted once
    // min_refresh has passed since the last read; then the old key is refused.
    provider.publish(&[
        rsa_2.published("rsa-2", true),
        ec_1.published("ec-1", false),
    ]);
    provider.wait_until_refresh_allowed().await;
    let token = rsa_2.sign(Some("rsa-2"), &claims());
    let (_rotated, ready) = accepted(&server, &token).await;
    assert_eq!(ready["role"], "mechanic");
    assert_eq!(provider.requests(), reads_before_rotation + 1);
    refused(
        &server,
        &rsa_1.sign(Some("rsa-1"), &claims()),
        "a removed key",
    )
    .await;
    // Sockets authenticated before the rotation stay (a token is checked when presented).
    ws.ping().await;

    // Many connections with a new kid at once: one read, every one accepted; many with kids
    // nobody published: at most one more read, every one refused.
    provider.publish(&[
        rsa_2.published("rsa-2", true),
        ec_1.published("ec-1", false),
        ec_2.published("ec-2", true),
    ]);
    provider.wait_until_refresh_allowed().await;
    provider.delay(Duration::from_millis(500));
    let before = provider.requests();
    let connects: Vec<_> = (0..20)
        .map(|_| {
            let token = ec_2.sign(Some("ec-2"), &claims());
            let addr = server.addr;
            tokio::spawn(async move { Ws::try_connect(addr, &token).await })
        })
        .collect();
    for connect in connects {
        connect
            .await
            .unwrap()
            .expect("a token of the new key is accepted");
    }
    assert_eq!(
        provider.requests(),
        before + 1,
        "one read for 20 connections"
    );
    provider.wait_until_refresh_allowed().await;
    let probing = Instant::now();
    let probes: Vec<_> = (0..20)
        .map(|i| {
            let token = stranger.sign(Some(&format!("probe-{i}")), &claims());
            let addr = server.addr;
            tokio::spawn(async move { Ws::try_connect(addr, &token).await })
        })
        .collect();
    for probe in probes {
        assert!(probe.await.unwrap().is_err(), "an unknown kid is refused");
    }
    // At most one read per min_refresh while they came in (one, unless the machine is slow).
    let allowed = 1 + (probing.elapsed().as_secs_f64() / MIN_REFRESH.as_secs_f64()).ceil() as usize;
    let probe_reads = provider.requests() - before - 1;
    assert!(
        probe_reads <= allowed,
        "{probe_reads} reads for 20 unknown kids in {:?}",
        probing.elapsed()
    );

    // The provider fails: the last good keys stay in use.
    provider.delay(Duration::ZERO);
    provider.fail();
    provider.wait_until_refresh_allowed().await;
    let failed_before = provider.requests();
    refused(
        &server,
        &stranger.sign(Some("new-kid"), &claims()),
        "unknown kid, provider down",
    )
    .await;
    assert_eq!(provider.requests(), failed_before + 1, "it tried");
    accepted(&server, &rsa_2.sign(Some("rsa-2"), &claims())).await;
    accepted(&server, &ec_2.sign(Some("ec-2"), &claims())).await;
    let stderr = server.process.stderr();
    assert!(stderr.contains("keeping the last good keys"), "{stderr}");
    // The log says why tokens were refused, never the token itself.
    assert!(!stderr.contains(&token), "a token was logged");
}

#[tokio::test]
async fn a_pem_public_key_verifies_its_own_algorithm_only() {
    let key = Key::p256();
    let other = Key::p256();
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("idp.pem");
    std::fs::write(&pem, &key.public_pem).unwrap();
    let (db, _admin) = fresh_db().await;
    let server = serve(
        db.url(),
        &[
            "--jwt-public-key",
            pem.to_str().unwrap(),
            "--jwt-audience",
            AUDIENCE,
        ],
    )
    .await;
    let stderr = server.process.stderr();
    assert!(
        stderr.contains(&format!(
            "jwt_public_key={} jwt_audience={AUDIENCE} jwt_algorithm=ES256 claim_sub=/sub \
             claim_role=/role claim_workshop=/workshop_id role_map=none",
            pem.display()
        )),
        "{stderr}"
    );
    let (mechanic, workshop) = (Uuid::new_v4(), Uuid::new_v4());
    // pgcast's own claim names, signed by the provider's key; any kid.
    let claims = json!({
        "sub": mechanic.to_string(),
        "role": "mechanic",
        "workshop_id": workshop.to_string(),
        "aud": AUDIENCE,
        "exp": now() + 600,
    });
    let (mut ws, ready) = accepted(&server, &key.sign(Some("whatever"), &claims)).await;
    assert_eq!(ready["user_id"], mechanic.to_string());
    ws.subscribe(&format!("workshop:{workshop}"), json!({}))
        .await;
    accepted(&server, &key.sign(None, &claims)).await;
    refused(&server, &other.sign(None, &claims), "another key").await;
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(key.public_pem.as_bytes()),
    )
    .unwrap();
    refused(&server, &confused, "HS256 with the public key as secret").await;
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    refused(&server, &none, "alg none").await;
    let mut wrong_aud = claims.clone();
    wrong_aud["aud"] = json!("billing");
    refused(&server, &key.sign(None, &wrong_aud), "wrong aud").await;
}

/// The identity-provider flags of `serve`: in `--help` with their variables, and every bad
/// value or combination refused with one line and exit status 2 before anything starts.
#[tokio::test]
async fn identity_flags_are_documented_and_bad_values_exit_2() {
    let out = run(pgcast_idp(&["serve", "--help"])).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    for (flag, env) in [
        ("--jwt-secret", "PGCAST_JWT_SECRET"),
        ("--jwt-public-key", "PGCAST_JWT_PUBLIC_KEY"),
        ("--jwt-jwks-url", "PGCAST_JWT_JWKS_URL"),
        ("--jwt-algorithm", "PGCAST_JWT_ALGORITHM"),
        ("--jwt-jwks-max-age", "PGCAST_JWT_JWKS_MAX_AGE"),
        ("--jwt-jwks-min-refresh", "PGCAST_JWT_JWKS_MIN_REFRESH"),
        ("--claim-sub", "PGCAST_CLAIM_SUB"),
        ("--claim-role", "PGCAST_CLAIM_ROLE"),
        ("--claim-workshop", "PGCAST_CLAIM_WORKSHOP"),
        ("--role-map", "PGCAST_ROLE_MAP"),
    ] {
        assert!(out.stdout.contains(flag), "{flag} missing from --help");
        assert!(out.stdout.contains(env), "{env} missing from --help");
    }

    let dir = tempfile::tempdir().unwrap();
    let ec_pem = dir.path().join("ec.pem");
    std::fs::write(&ec_pem, Key::p256().public_pem).unwrap();
    let ec_pem = ec_pem.to_str().unwrap();
    let private_pem = dir.path().join("private.pem");
    std::fs::write(
        &private_pem,
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
         -----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let private_pem = private_pem.to_str().unwrap();
    let secret = running::SECRET;
    let jwks = "http://127.0.0.1:9/jwks.json";
    for (args, expected) in [
        (&[][..], "--jwt-secret"),
        (
            &["--jwt-secret", secret, "--jwt-public-key", ec_pem][..],
            "cannot be used with",
        ),
        (
            &["--jwt-public-key", ec_pem, "--jwt-jwks-url", jwks][..],
            "cannot be used with",
        ),
        (
            &["--jwt-public-key", "/nonexistent/idp.pem"][..],
            "--jwt-public-key",
        ),
        (&["--jwt-public-key", private_pem][..], "private key"),
        (
            &["--jwt-jwks-url", "ftp://id.example/jwks"][..],
            "--jwt-jwks-url",
        ),
        (
            &["--jwt-jwks-url", jwks, "--jwt-algorithm", "HS256"][..],
            "--jwt-algorithm",
        ),
        (
            &["--jwt-jwks-url", jwks, "--jwt-jwks-min-refresh", "0s"][..],
            "--jwt-jwks-min-refresh",
        ),
        (
            &["--jwt-jwks-url", jwks, "--jwt-jwks-max-age", "1y"][..],
            "--jwt-jwks-max-age",
        ),
        (
            &["--jwt-secret", secret, "--claim-sub", "sub"][..],
            "--claim-sub",
        ),
        (
            &["--jwt-secret", secret, "--claim-role", "/a~2"][..],
            "--claim-role",
        ),
        (
            &["--jwt-secret", secret, "--claim-workshop", ""][..],
            "--claim-workshop",
        ),
        (
            &["--jwt-secret", secret, "--role-map", "admin=root"][..],
            "--role-map",
        ),
        // Values that parse but do not go together.
        (
            &["--jwt-secret", secret, "--jwt-algorithm", "RS256"][..],
            "--jwt-algorithm",
        ),
        (
            &["--jwt-public-key", ec_pem, "--jwt-algorithm", "RS256"][..],
            "does not fit",
        ),
    ] {
        let mut full = vec!["serve", "--database-url", "postgres://app@127.0.0.1:1/shop"];
        full.extend(args);
        let out = run(pgcast_idp(&full)).await;
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.stderr);
        let stderr = out.stderr.trim_end();
        assert!(
            !stderr.contains('\n'),
            "{args:?}: more than one line: {stderr}"
        );
        assert!(stderr.starts_with("error:"), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains(secret), "{args:?}: the secret was shown");
        assert!(out.stdout.is_empty(), "{args:?}: {}", out.stdout);
    }
}
