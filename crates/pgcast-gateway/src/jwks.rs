//! The identity provider's keys, read from its JWKS URL and cached.
//!
//! ```text
//!  token (kid, alg) ──▶ cached set ── found ──▶ verify   (set older than max_age: re-read in
//!                           │                             the background, the token does not wait)
//!                           └─ unknown kid ──▶ one read at a time ──▶ found? verify : refuse
//!                                              (at most one per min_refresh; others wait for
//!                                               it, then look again; a failed read keeps the
//!                                               last good set)
//! ```
//!
//! A read is bounded: [`JwksSettings::timeout`] for the whole exchange, at most
//! [`JwksSettings::max_bytes`] of body and [`JwksSettings::max_keys`] keys, no redirects. Many
//! connections presenting tokens with unknown `kid`s (a rotation, or someone probing) cause at
//! most one read per `min_refresh`, so neither the provider nor the gateway can be flooded.
//!
//! About half of this file is its unit tests (rotation, single-flight reads, size and time
//! bounds, failed reads keeping the last good set).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, Header};
use serde::Deserialize;

use crate::keys::{from_jwk, VerifyingKey};
use crate::GatewayError;

/// How the key set is read and cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksSettings {
    /// Shortest time between two reads: a token whose `kid` is not in the cached set causes a
    /// read only when the last one is at least this old (and is refused otherwise). Default 30 s.
    pub min_refresh: Duration,
    /// The cached set is read again, in the background, once it is this old; keys the provider
    /// removed stop being accepted then. Default 10 minutes.
    pub max_age: Duration,
    /// Longest a read may take, connection and body included. Default 5 s.
    pub timeout: Duration,
    /// Largest document accepted. Default 1 MiB.
    pub max_bytes: usize,
    /// Most keys a document may hold; a larger one is refused as a whole. Default 100.
    pub max_keys: usize,
    /// When set, only keys of this algorithm are used (and an RSA key without `alg` verifies
    /// it). Default `None`: each key's own `alg`, or the default of its type.
    pub algorithm: Option<Algorithm>,
}

impl Default for JwksSettings {
    fn default() -> Self {
        JwksSettings {
            min_refresh: Duration::from_secs(30),
            max_age: Duration::from_secs(600),
            timeout: Duration::from_secs(5),
            max_bytes: 1 << 20,
            max_keys: 100,
            algorithm: None,
        }
    }
}

/// The keys of one JWKS URL, cached and shared by every clone (and every verifier holding
/// one).
#[derive(Clone)]
pub struct Jwks {
    inner: Arc<Inner>,
}

struct Inner {
    url: reqwest::Url,
    client: reqwest::Client,
    settings: JwksSettings,
    /// The last good set.
    keys: RwLock<Arc<KeySet>>,
    /// When the last read started; held for the whole of a read, so reads are one at a time.
    reading: tokio::sync::Mutex<Option<Instant>>,
    /// A background read is scheduled or running.
    background: AtomicBool,
}

#[derive(Default)]
struct KeySet {
    keys: Vec<Arc<VerifyingKey>>,
    read_at: Option<Instant>,
}

/// What the cached set says about a token's header.
pub(crate) enum Lookup {
    Found(Arc<VerifyingKey>),
    /// No key fits: the set may be out of date.
    Unknown,
    /// A key fits the `kid` but not the algorithm, or several keys fit a token without `kid`:
    /// reading the set again would not help.
    Refused(String),
}

impl KeySet {
    fn lookup(&self, header: &Header) -> Lookup {
        match &header.kid {
            Some(kid) => {
                let mut named = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                    .peekable();
                if named.peek().is_none() {
                    return Lookup::Unknown;
                }
                match named.find(|k| k.algorithm == header.alg) {
                    Some(key) => Lookup::Found(key.clone()),
                    None => {
                        Lookup::Refused(format!("the key {kid:?} does not verify {:?}", header.alg))
                    }
                }
            }
            None => {
                let mut fitting = self.keys.iter().filter(|k| k.algorithm == header.alg);
                match (fitting.next(), fitting.next()) {
                    (None, _) => Lookup::Unknown,
                    (Some(key), None) => Lookup::Found(key.clone()),
                    (Some(_), Some(_)) => Lookup::Refused(format!(
                        "the token names no kid and several {:?} keys could verify it",
                        header.alg
                    )),
                }
            }
        }
    }
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &self.inner.url.as_str())
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// The keys at `url` (http or https, without credentials), read on first use or with
    /// [`refresh`](Self::refresh).
    pub fn new(url: &str, settings: JwksSettings) -> Result<Jwks, GatewayError> {
        let url = parse_url(url).map_err(GatewayError::KeyConfig)?;
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("pgcast/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| GatewayError::KeyConfig(format!("JWKS client: {}", chain(&e))))?;
        Ok(Jwks {
            inner: Arc::new(Inner {
                url,
                client,
                settings,
                keys: RwLock::default(),
                reading: tokio::sync::Mutex::new(None),
                background: AtomicBool::new(false),
            }),
        })
    }

    /// The URL the keys are read from.
    pub fn url(&self) -> &str {
        self.inner.url.as_str()
    }

    /// How the keys are read and cached.
    pub fn settings(&self) -> &JwksSettings {
        &self.inner.settings
    }

    /// Reads the key set now (after any read in progress), replacing the cached set; returns
    /// the number of usable keys. A failure keeps the cached set.
    pub async fn refresh(&self) -> Result<usize, GatewayError> {
        let mut reading = self.inner.reading.lock().await;
        self.inner.read(&mut reading).await
    }

    /// The key for `header` from the cached set, without waiting. A set older than
    /// `max_age` is re-read in the background.
    pub(crate) fn cached(&self, header: &Header) -> Lookup {
        let set = self.inner.current();
        if set
            .read_at
            .is_some_and(|at| at.elapsed() >= self.inner.settings.max_age)
        {
            self.refresh_in_background();
        }
        set.lookup(header)
    }

    /// The key for `header`, reading the set again when it names a key not in the cached one
    /// (one read at a time, at most one per `min_refresh`).
    pub(crate) async fn key(&self, header: &Header) -> Result<Arc<VerifyingKey>, GatewayError> {
        match self.cached(header) {
            Lookup::Found(key) => return Ok(key),
            Lookup::Refused(why) => return Err(GatewayError::KeyNotFound(why)),
            Lookup::Unknown => {}
        }
        // One read at a time: whoever waited here looks at the set the read before it left.
        let mut reading = self.inner.reading.lock().await;
        match self.inner.current().lookup(header) {
            Lookup::Found(key) => return Ok(key),
            Lookup::Refused(why) => return Err(GatewayError::KeyNotFound(why)),
            Lookup::Unknown => {}
        }
        if reading.is_some_and(|at| at.elapsed() < self.inner.settings.min_refresh) {
            return Err(GatewayError::KeyNotFound(unknown(header)));
        }
        if let Err(error) = self.inner.read(&mut reading).await {
            tracing::warn!(%error, url = %self.inner.url, "reading the JWKS failed; keeping the last good keys");
        }
        match self.inner.current().lookup(header) {
            Lookup::Found(key) => Ok(key),
            Lookup::Refused(why) => Err(GatewayError::KeyNotFound(why)),
            Lookup::Unknown => Err(GatewayError::KeyNotFound(unknown(header))),
        }
    }

    /// Starts a background read unless one is running or the last read is younger than
    /// `min_refresh`. Needs a tokio runtime; without one nothing happens.
    fn refresh_in_background(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.inner.background.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.inner.clone();
        runtime.spawn(async move {
            {
                let mut reading = inner.reading.lock().await;
                let due = reading.is_none_or(|at| at.elapsed() >= inner.settings.min_refresh);
                let stale = inner
                    .current()
                    .read_at
                    .is_none_or(|at| at.elapsed() >= inner.settings.max_age);
                if due && stale {
                    if let Err(error) = inner.read(&mut reading).await {
                        tracing::warn!(%error, url = %inner.url, "re-reading the JWKS failed; keeping the last good keys");
                    }
                }
            }
            inner.background.store(false, Ordering::Release);
        });
    }
}

impl Inner {
    fn current(&self) -> Arc<KeySet> {
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// One read, with the read lock held (`reading`); the set is replaced only by a good one.
    async fn read(&self, reading: &mut Option<Instant>) -> Result<usize, GatewayError> {
        *reading = Some(Instant::now());
        let body = tokio::time::timeout(self.settings.timeout, self.download())
            .await
            .map_err(|_| {
                GatewayError::Jwks(format!(
                    "no complete answer within {:?}",
                    self.settings.timeout
                ))
            })??;
        let keys = parse_set(&body, &self.settings)?;
        let n = keys.len();
        tracing::info!(url = %self.url, keys = n, "read the identity provider's keys");
        let set = Arc::new(KeySet {
            keys,
            read_at: Some(Instant::now()),
        });
        *self
            .keys
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = set;
        Ok(n)
    }

    async fn download(&self) -> Result<Vec<u8>, GatewayError> {
        let error = |e: reqwest::Error| GatewayError::Jwks(chain(&e));
        let mut response = self
            .client
            .get(self.url.clone())
            .header(
                reqwest::header::ACCEPT,
                "application/jwk-set+json, application/json",
            )
            .send()
            .await
            .map_err(error)?;
        let status = response.status();
        if !status.is_success() {
            return Err(GatewayError::Jwks(format!("HTTP status {status}")));
        }
        let max = self.settings.max_bytes;
        let too_large = || GatewayError::Jwks(format!("the document is larger than {max} bytes"));
        if response.content_length().is_some_and(|n| n > max as u64) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(error)? {
            if body.len() + chunk.len() > max {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// The usable keys of a JWKS document (RFC 7517 §5); keys pgcast cannot use are skipped (and
/// logged at debug level), a document without any usable key is refused.
fn parse_set(body: &[u8], settings: &JwksSettings) -> Result<Vec<Arc<VerifyingKey>>, GatewayError> {
    #[derive(Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let document: Document = serde_json::from_slice(body)
        .map_err(|e| GatewayError::Jwks(format!("not a JWKS document ({e})")))?;
    if document.keys.len() > settings.max_keys {
        return Err(GatewayError::Jwks(format!(
            "the document has {} keys; at most {} are accepted",
            document.keys.len(),
            settings.max_keys
        )));
    }
    let mut keys = Vec::with_capacity(document.keys.len());
    for value in document.keys {
        let kid = value.get("kid").and_then(|k| k.as_str()).map(str::to_owned);
        match from_jwk(value, settings.algorithm) {
            Ok(key) => keys.push(Arc::new(key)),
            Err(reason) => tracing::debug!(?kid, %reason, "JWKS key skipped"),
        }
    }
    if keys.is_empty() {
        return Err(GatewayError::Jwks(
            "the document has no usable signing key (RSA, EC P-256/P-384 or Ed25519)".to_owned(),
        ));
    }
    Ok(keys)
}

/// Why a token's key was not found.
fn unknown(header: &Header) -> String {
    match &header.kid {
        Some(kid) => format!(
            "no {:?} key {kid:?} in the identity provider's keys",
            header.alg
        ),
        None => format!(
            "the token names no kid and no {:?} key is in the identity provider's keys",
            header.alg
        ),
    }
}

/// A JWKS URL: http or https, a host, no credentials (a key set is public).
pub fn parse_url(text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("the JWKS URL must be http:// or https://".to_owned());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the JWKS URL names no host".to_owned());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("the JWKS URL must not carry credentials (a key set is public)".to_owned());
    }
    Ok(url)
}

/// An error and its causes on one line (reqwest keeps the reason, e.g. "connection refused",
/// in its sources).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use pgcast_testkit::http::Scripted;
    use serde_json::{json, Value};

    use super::*;
    use crate::keys::test_keys::{self, TestKey};
    use crate::{GatewayConfig, TokenVerifier};

    /// A JWKS endpoint on 127.0.0.1 serving whatever the test sets, counting requests.
    struct Provider {
        url: String,
        server: Scripted,
    }

    impl Provider {
        async fn start(document: Value) -> Provider {
            let server = Scripted::start(200, document.to_string()).await.unwrap();
            let url = format!("http://{}/jwks.json", server.addr());
            Provider { url, server }
        }

        fn publish(&self, keys: &[Value]) {
            self.server.answer(200, json!({ "keys": keys }).to_string());
        }

        fn answer(&self, status: u16, body: &str) {
            self.server.answer(status, body);
        }

        fn delay(&self, delay: Duration) {
            self.server.delay(delay);
        }

        fn requests(&self) -> usize {
            self.server.requests()
        }
    }

    fn settings(min_refresh: Duration) -> JwksSettings {
        JwksSettings {
            min_refresh,
            ..JwksSettings::default()
        }
    }

    fn verifier(jwks: &Jwks) -> TokenVerifier {
        let mut config = GatewayConfig::new(Vec::new());
        config.jwt_jwks = Some(jwks.clone());
        TokenVerifier::from_config(&config).unwrap()
    }

    fn token(key: &TestKey, kid: Option<&str>) -> String {
        let sub = uuid::Uuid::new_v4();
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        key.sign(kid, &json!({"sub": sub, "role": "mechanic", "exp": exp}))
    }

    #[tokio::test]
    async fn unknown_kids_read_the_set_again_and_rotation_replaces_it() {
        let (a, b) = (test_keys::rsa(), &test_keys::ec(Algorithm::ES256));
        let provider = Provider::start(json!({"keys": [a.jwk("a", true)]})).await;
        let min_refresh = Duration::from_millis(400);
        let jwks = Jwks::new(&provider.url, settings(min_refresh)).unwrap();
        let v = verifier(&jwks);
        // Nothing is read before a token needs it; then once.
        assert!(
            v.verify(&token(a, Some("a"))).is_err(),
            "nothing cached yet"
        );
        assert_eq!(provider.requests(), 0);
        assert!(v.verify_async(&token(a, Some("a"))).await.is_ok());
        assert!(v.verify_async(&token(a, Some("a"))).await.is_ok());
        assert!(v.verify(&token(a, Some("a"))).is_ok());
        assert_eq!(provider.requests(), 1);
        // Rotation: b appears, a is gone. Within min_refresh the set is not read again.
        let rotated_at = Instant::now();
        provider.publish(&[b.jwk("b", true)]);
        assert!(matches!(
            v.verify_async(&token(b, Some("b"))).await,
            Err(GatewayError::KeyNotFound(_))
        ));
        assert_eq!(provider.requests(), 1);
        tokio::time::sleep(
            min_refresh.saturating_sub(rotated_at.elapsed()) + Duration::from_millis(50),
        )
        .await;
        assert!(v.verify_async(&token(b, Some("b"))).await.is_ok());
        assert_eq!(provider.requests(), 2);
        // a was removed: refused, from the new set, without another read.
        assert!(v.verify_async(&token(a, Some("a"))).await.is_err());
        assert!(v.verify(&token(a, Some("a"))).is_err());
        assert_eq!(provider.requests(), 2);
        // A known kid with a signature of another key is refused (no read either).
        assert!(v
            .verify_async(&token(&test_keys::ec(Algorithm::ES256), Some("b")))
            .await
            .is_err());
        assert_eq!(provider.requests(), 2);
    }

    #[tokio::test]
    async fn many_connections_with_unknown_kids_cause_one_read() {
        let (a, b) = (&test_keys::ec(Algorithm::ES256), &test_keys::ed25519());
        let provider = Provider::start(json!({"keys": [a.jwk("a", false)]})).await;
        let jwks = Jwks::new(&provider.url, settings(Duration::from_secs(60))).unwrap();
        let v = verifier(&jwks);
        jwks.refresh().await.unwrap();
        assert_eq!(provider.requests(), 1);
        // The provider answers slowly, so every verification below waits on one read.
        provider.delay(Duration::from_millis(300));
        provider.publish(&[a.jwk("a", false), b.jwk("b", false)]);
        // min_refresh has not passed since the read above: force the next one to be due.
        *jwks.inner.reading.lock().await = None;
        let started = Instant::now();
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let v = v.clone();
                let t = if i % 2 == 0 {
                    token(b, Some("b"))
                } else {
                    token(b, Some(&format!("probe-{i}")))
                };
                tokio::spawn(async move { (i, v.verify_async(&t).await) })
            })
            .collect();
        for task in tasks {
            let (i, result) = task.await.unwrap();
            assert_eq!(result.is_ok(), i % 2 == 0, "{i}: {result:?}");
        }
        assert_eq!(provider.requests(), 2, "one read for 50 connections");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_failed_or_unusable_read_keeps_the_last_good_keys() {
        let a = &test_keys::ed25519();
        let provider = Provider::start(json!({"keys": [a.jwk("a", true)]})).await;
        let jwks = Jwks::new(
            &provider.url,
            JwksSettings {
                max_bytes: 4096,
                max_keys: 3,
                ..settings(Duration::from_millis(1))
            },
        )
        .unwrap();
        let v = verifier(&jwks);
        assert_eq!(jwks.refresh().await.unwrap(), 1);
        let many: Vec<Value> = (0..4).map(|i| a.jwk(&format!("k{i}"), true)).collect();
        let big = json!({"keys": [a.jwk("a", true)], "padding": "x".repeat(5000)}).to_string();
        for (status, body, why) in [
            (500, "oops".to_owned(), "HTTP status 500"),
            (200, "not json".to_owned(), "not a JWKS document"),
            (200, json!({"keys": many}).to_string(), "at most 3"),
            (200, big, "larger than 4096"),
            (
                200,
                json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "a"}]}).to_string(),
                "no usable",
            ),
            (200, json!({"keys": []}).to_string(), "no usable"),
            (302, String::new(), "302"),
        ] {
            provider.answer(status, &body);
            let err = jwks.refresh().await.unwrap_err();
            assert!(matches!(err, GatewayError::Jwks(_)), "{err}");
            assert!(err.to_string().contains(why), "{why}: {err}");
            assert!(
                v.verify(&token(a, Some("a"))).is_ok(),
                "{why}: a is still trusted"
            );
            // A token with an unknown kid makes the verifier read, fail, and refuse.
            assert!(v.verify_async(&token(a, Some("zz"))).await.is_err());
            assert!(v.verify_async(&token(a, Some("a"))).await.is_ok());
        }
        // Nobody listening: the read fails, the keys stay.
        let closed = Jwks::new(
            "http://127.0.0.1:9/jwks.json",
            settings(Duration::from_millis(1)),
        )
        .unwrap();
        let err = closed.refresh().await.unwrap_err().to_string();
        assert!(err.contains("JWKS"), "{err}");
    }

    #[tokio::test]
    async fn a_slow_provider_costs_at_most_the_timeout() {
        let a = &test_keys::ed25519();
        let provider = Provider::start(json!({"keys": [a.jwk("a", true)]})).await;
        provider.delay(Duration::from_secs(5));
        let jwks = Jwks::new(
            &provider.url,
            JwksSettings {
                timeout: Duration::from_millis(300),
                ..settings(Duration::from_millis(1))
            },
        )
        .unwrap();
        let started = Instant::now();
        let result = verifier(&jwks).verify_async(&token(a, Some("a"))).await;
        assert!(result.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn an_old_set_is_read_again_in_the_background() {
        let (a, b) = (&test_keys::ed25519(), &test_keys::ec(Algorithm::ES384));
        let provider = Provider::start(json!({"keys": [a.jwk("a", true)]})).await;
        let jwks = Jwks::new(
            &provider.url,
            JwksSettings {
                max_age: Duration::from_millis(200),
                ..settings(Duration::from_millis(100))
            },
        )
        .unwrap();
        let v = verifier(&jwks);
        jwks.refresh().await.unwrap();
        provider.publish(&[b.jwk("b", true)]);
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Still accepted (the token does not wait), and a read starts behind it.
        assert!(v.verify(&token(a, Some("a"))).is_ok());
        let deadline = Instant::now() + Duration::from_secs(5);
        while v.verify(&token(b, Some("b"))).is_err() {
            assert!(Instant::now() < deadline, "no background read");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(v.verify(&token(a, Some("a"))).is_err(), "a was removed");
        assert_eq!(provider.requests(), 2);
    }

    #[tokio::test]
    async fn tokens_without_kid_need_exactly_one_fitting_key() {
        let (a, b) = (
            &test_keys::ec(Algorithm::ES256),
            &test_keys::ec(Algorithm::ES256),
        );
        let provider = Provider::start(json!({"keys": [a.jwk("a", true)]})).await;
        let jwks = Jwks::new(&provider.url, settings(Duration::from_secs(60))).unwrap();
        let v = verifier(&jwks);
        assert!(v.verify_async(&token(a, None)).await.is_ok());
        provider.publish(&[a.jwk("a", true), b.jwk("b", true)]);
        jwks.refresh().await.unwrap();
        let err = v.verify_async(&token(a, None)).await.unwrap_err();
        assert!(err.to_string().contains("several"), "{err}");
        assert!(v.verify_async(&token(a, Some("a"))).await.is_ok());
        assert!(v.verify_async(&token(b, Some("b"))).await.is_ok());
        // A kid of the set used with another algorithm: refused without a read.
        let ed = test_keys::ed25519();
        let before = provider.requests();
        assert!(v.verify_async(&token(&ed, Some("a"))).await.is_err());
        assert_eq!(provider.requests(), before);
    }

    #[test]
    fn only_signature_keys_of_supported_types_are_used() {
        let rsa = test_keys::rsa();
        let ec = test_keys::ec(Algorithm::ES256);
        let usable = |jwk: Value, only| from_jwk(jwk, only).map(|k| k.algorithm);
        assert_eq!(usable(rsa.jwk("r", false), None), Ok(Algorithm::RS256));
        assert_eq!(
            usable(rsa.jwk("r", false), Some(Algorithm::PS256)),
            Ok(Algorithm::PS256)
        );
        assert_eq!(usable(ec.jwk("e", false), None), Ok(Algorithm::ES256));
        let mut enc = rsa.jwk("r", false);
        enc["use"] = json!("enc");
        let mut ops = ec.jwk("e", true);
        ops["key_ops"] = json!(["encrypt"]);
        let mut hs = rsa.jwk("r", false);
        hs["alg"] = json!("HS256");
        let mut wrong_curve = ec.jwk("e", false);
        wrong_curve["alg"] = json!("ES384");
        let mut rsa_oaep = rsa.jwk("r", false);
        rsa_oaep["alg"] = json!("RSA-OAEP");
        let mut p521 = ec.jwk("e", false);
        p521["crv"] = json!("P-521");
        for (jwk, only, why) in [
            (
                json!({"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0", "kid": "s"}),
                None,
                "symmetric",
            ),
            (
                json!({"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}),
                None,
                "symmetric",
            ),
            (enc, None, "use"),
            (ops, None, "key_ops"),
            (hs, None, "HS256"),
            (wrong_curve, None, "ES384"),
            (rsa_oaep, None, "RSA_OAEP"),
            (p521, None, "curve"),
            (ec.jwk("e", true), Some(Algorithm::RS256), "configured"),
            (json!({"kty": "AKP", "kid": "pq"}), None, "usable"),
            (json!("not an object"), None, "usable"),
        ] {
            let err = usable(jwk, only).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
        }
    }

    #[test]
    fn jwks_urls() {
        assert!(parse_url("https://id.example/.well-known/jwks.json").is_ok());
        assert!(parse_url("http://127.0.0.1:8081/jwks").is_ok());
        for bad in [
            "",
            "id.example/jwks",
            "ftp://id.example/jwks",
            "https://user:pw@id.example/jwks",
            "file:///etc/jwks",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
