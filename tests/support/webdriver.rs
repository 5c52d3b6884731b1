//! Headless Chromium for the browser tests, driven over WebDriver: Debian's `chromedriver`
//! (started on a free port of 127.0.0.1) and the `fantoccini` client over plain HTTP.
//!
//! ```text
//!   test ──fantoccini (HTTP)──▶ chromedriver ──DevTools──▶ chromium (headless, fresh profile)
//!     └─ stdin pipe ──▶ watchdog (sh): on EOF, SIGKILL chromedriver's process group, rm profile
//! ```
//!
//! Cleanup does not depend on the test ending well: chromedriver runs in a process group of its
//! own (Chromium's processes stay in it), and a small watchdog process kills that group and
//! removes the temporary profile as soon as its stdin closes — when the [`Browser`] is dropped,
//! or when the kernel closes the pipe because the test process died.

use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use pgcast_testkit::Watchdog;
use serde_json::{json, Value};

/// Chromium as Debian installs it (`apt-get install chromium chromium-driver`).
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How long chromedriver may take to listen, and Chromium to open a session.
const START_LIMIT: Duration = Duration::from_secs(30);
/// Poll interval of [`Browser::wait_for`]: the condition is re-read, never assumed.
const POLL: Duration = Duration::from_millis(50);

/// True once fonts are loaded and no finite animation runs (an endless one, like the blinking
/// dot of "Reconnecting…", does not count).
const SETTLED: &str = r#"
return document.fonts.status === 'loaded' && document.getAnimations().every((a) =>
  a.playState !== 'running' || a.effect.getComputedTiming().iterations === Infinity);"#;

/// The viewport of a desktop screenshot.
pub(crate) const DESKTOP: Viewport = Viewport {
    width: 1280,
    height: 860,
    scale: 1.0,
    mobile: false,
};
/// The viewport of a phone screenshot (an iPhone 12–15 sized screen, at 2× pixels).
pub(crate) const PHONE: Viewport = Viewport {
    width: 390,
    height: 844,
    scale: 2.0,
    mobile: true,
};

/// A screen size to emulate, through the DevTools `Emulation` domain.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Viewport {
    pub(crate) width: u32,
    pub(crate) height: u32,
    pub(crate) scale: f64,
    pub(crate) mobile: bool,
}

/// One headless Chromium with its chromedriver; everything is killed and removed on drop.
pub(crate) struct Browser {
    client: Client,
    driver: Driver,
}

struct Driver {
    chromedriver: Child,
    /// The test kit's kill-on-parent-exit watchdog: kills chromedriver's process group and
    /// removes the profile when dropped or when the test process dies.
    watchdog: Watchdog,
    dir: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Closing the pipe lets the watchdog kill the process group and remove the directory.
        self.watchdog.fire();
        // Already killed by the watchdog; this reaps it (and covers a watchdog that failed).
        let _ = self.chromedriver.kill();
        let _ = self.chromedriver.wait();
    }
}

impl Driver {
    /// Starts chromedriver on a free port and waits until it listens.
    fn start() -> (Driver, u16) {
        for path in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: the browser tests need Debian's Chromium \
                 (apt-get install -y chromium chromium-driver; .ci/run installs them)"
            );
        }
        let mut last_error = String::new();
        // A free port can be taken by someone else between our check and chromedriver's bind;
        // then chromedriver exits and we try another one.
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("pgcast-chromium-")
                .tempdir()
                .expect("temporary directory for Chromium")
                .keep();
            let port = free_port();
            let log = std::fs::File::create(dir.join("chromedriver.log")).expect("log file");
            let chromedriver = Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                // Its own process group: the watchdog kills chromedriver and Chromium with one
                // signal, and Ctrl-C in a terminal reaches only the test (then the watchdog).
                .process_group(0)
                .spawn()
                .expect("start chromedriver");
            let watchdog = Watchdog::plan()
                .kill_group(chromedriver.id())
                .remove(&dir)
                .arm("pgcast-browser-watchdog")
                .expect("start the browser cleanup watchdog");
            let mut driver = Driver {
                chromedriver,
                watchdog,
                dir,
            };
            match driver.wait_listening(port) {
                Ok(()) => return (driver, port),
                Err(e) => last_error = e,
            }
        }
        panic!("chromedriver did not start: {last_error}");
    }

    fn wait_listening(&mut self, port: u16) -> Result<(), String> {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.chromedriver.try_wait() {
                return Err(format!("chromedriver exited with {status}: {}", self.log()));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "chromedriver not listening on port {port} after {START_LIMIT:?}: {}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("chromedriver.log")).unwrap_or_default()
    }
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    StdTcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile.
    pub(crate) async fn start() -> Browser {
        let (driver, port) = tokio::task::spawn_blocking(Driver::start)
            .await
            .expect("chromedriver start task");
        let profile = driver.dir.join("profile");
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            // This machine's network is closed; without these, Chromium's own background
            // connections make it refuse connections.
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--no-default-browser-check".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-extensions".to_owned(),
            "--disable-default-apps".to_owned(),
            "--password-store=basic".to_owned(),
            "--mute-audio".to_owned(),
            "--hide-scrollbars".to_owned(),
            "--force-color-profile=srgb".to_owned(),
            "--lang=en-US".to_owned(),
            format!("--window-size={},{}", DESKTOP.width, DESKTOP.height),
            format!("--user-data-dir={}", profile.display()),
        ];
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": CHROMIUM, "args": args }),
        );
        // Console messages (and failed loads) are kept for `Browser::console`.
        capabilities.insert("goog:loggingPrefs".into(), json!({ "browser": "ALL" }));
        let connect = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await;
        let client = match connect {
            Ok(c) => c,
            Err(e) => panic!("could not open a Chromium session: {e}\n{}", driver.log()),
        };
        Browser { client, driver }
    }

    /// Navigates to `url` and waits for the page to load.
    pub(crate) async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// Reloads the page and waits for it to load.
    pub(crate) async fn reload(&self) {
        self.client
            .refresh()
            .await
            .unwrap_or_else(|e| panic!("reload: {e}"));
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub(crate) async fn eval(&self, script: &str) -> Value {
        self.eval_with(script, Vec::new()).await
    }

    /// Runs `script` with `args` (its `arguments`); a returned promise is awaited.
    pub(crate) async fn eval_with(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Re-evaluates `script` until `ok` accepts its value, and returns that value; panics with
    /// `what` and the last value after `limit`.
    pub(crate) async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        script: &str,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let value = match self.client.execute(script, vec![]).await {
                Ok(v) => v,
                Err(e) => json!({ "script error": e.to_string() }),
            };
            if ok(&value) {
                return value;
            }
            if Instant::now() >= deadline {
                panic!("timed out after {limit:?} waiting for {what}; last value: {value:#}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Emulates `viewport` (size, pixel ratio, phone or desktop) for the current tab.
    pub(crate) async fn set_viewport(&self, viewport: Viewport) {
        self.devtools(
            "Emulation.setDeviceMetricsOverride",
            json!({
                "width": viewport.width,
                "height": viewport.height,
                "deviceScaleFactor": viewport.scale,
                "mobile": viewport.mobile,
            }),
        )
        .await;
        self.devtools(
            "Emulation.setTouchEmulationEnabled",
            json!({ "enabled": viewport.mobile }),
        )
        .await;
    }

    /// Saves a PNG of the viewport as `target/screenshots/<name>.png` of the workspace and
    /// returns its path.
    pub(crate) async fn screenshot(&self, name: &str) -> PathBuf {
        // A picture of the page at rest: fonts loaded, entry animations over.
        self.wait_for(
            "the page to settle before a screenshot",
            Duration::from_secs(5),
            SETTLED,
            |v| v == true,
        )
        .await;
        let png = self.client.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is a PNG");
        let path = screenshot_dir().join(format!("{name}.png"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("create the screenshot directory");
        }
        std::fs::write(&path, png).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
        path
    }

    /// Ends the WebDriver session (Chromium quits cleanly); dropping kills what is left.
    pub(crate) async fn close(self) {
        let Browser { client, driver } = self;
        let _ = tokio::time::timeout(Duration::from_secs(5), client.close()).await;
        drop(driver);
    }

    /// Opens a new tab (or window) and returns its handle; the current one stays current.
    pub(crate) async fn new_tab(&self, as_tab: bool) -> fantoccini::wd::WindowHandle {
        self.client
            .new_window(as_tab)
            .await
            .unwrap_or_else(|e| panic!("new window: {e}"))
            .handle
    }

    /// Clicks the element `css` selects (waiting up to the start limit for it to exist), as a
    /// person would: WebDriver scrolls it into view and clicks its centre.
    pub(crate) async fn click(&self, css: &str) {
        let element = self.element(css).await;
        element
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Types `text` into the field `css` selects, after clearing it.
    pub(crate) async fn type_into(&self, css: &str, text: &str) {
        let element = self.element(css).await;
        element
            .clear()
            .await
            .unwrap_or_else(|e| panic!("clear {css}: {e}"));
        element
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    async fn element(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(START_LIMIT)
            .every(POLL)
            .for_element(fantoccini::Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
    }

    /// Minimizes the current window: its pages become hidden (`visibilityState` "hidden").
    pub(crate) async fn minimize(&self) {
        self.client
            .minimize_window()
            .await
            .unwrap_or_else(|e| panic!("minimize window: {e}"))
    }

    /// Restores the current window (after [`Browser::minimize`]) to the desktop size.
    pub(crate) async fn restore(&self) {
        self.client
            .set_window_size(DESKTOP.width, DESKTOP.height)
            .await
            .unwrap_or_else(|e| panic!("restore window: {e}"))
    }

    /// The current tab's handle.
    pub(crate) async fn current_tab(&self) -> fantoccini::wd::WindowHandle {
        self.client
            .window()
            .await
            .unwrap_or_else(|e| panic!("window handle: {e}"))
    }

    /// Makes `tab` the one commands go to.
    pub(crate) async fn switch_to(&self, tab: &fantoccini::wd::WindowHandle) {
        self.client
            .switch_to_window(tab.clone())
            .await
            .unwrap_or_else(|e| panic!("switch to window: {e}"))
    }

    /// The browser's console messages since the last call (chromedriver's `browser` log; needs
    /// the `goog:loggingPrefs` capability set by [`Browser::start`]).
    pub(crate) async fn console(&self) -> Vec<Value> {
        let log = self
            .client
            .issue_cmd(BrowserLog)
            .await
            .unwrap_or_else(|e| panic!("browser log: {e}"));
        log.as_array().cloned().unwrap_or_default()
    }

    /// Sends a Chrome DevTools Protocol command through chromedriver (to the current tab).
    pub(crate) async fn devtools(&self, method: &'static str, params: Value) -> Value {
        self.client
            .issue_cmd(DevTools { method, params })
            .await
            .unwrap_or_else(|e| panic!("DevTools {method}: {e}"))
    }
}

/// Where screenshots (and other output of the browser tests) go: `target/screenshots/`.
pub(crate) fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots")
}

/// chromedriver's `POST /session/{id}/se/log` for the `browser` log (console messages and
/// failed loads, such as a 404 favicon).
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        let session = session_id.ok_or(url::ParseError::EmptyHost)?;
        base_url.join(&format!("session/{session}/se/log"))
    }

    fn method_and_body(&self, _request_url: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({ "type": "browser" }).to_string()),
        )
    }
}

/// chromedriver's `POST /session/{id}/goog/cdp/execute`.
#[derive(Debug)]
struct DevTools {
    method: &'static str,
    params: Value,
}

impl WebDriverCompatibleCommand for DevTools {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        let session = session_id.ok_or(url::ParseError::EmptyHost)?;
        base_url.join(&format!("session/{session}/goog/cdp/execute"))
    }

    fn method_and_body(&self, _request_url: &url::Url) -> (http::Method, Option<String>) {
        let body = json!({ "cmd": self.method, "params": self.params });
        (http::Method::POST, Some(body.to_string()))
    }
}
