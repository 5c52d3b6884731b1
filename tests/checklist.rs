//! The marketplace's own checklist, walked end to end in headless Chromium as a person would,
//! against `pgcast demo` (its pages and its action API) running in this process:
//!
//! 1. A customer opens a FREE request → a general (freelancer) mechanic's and a workshop
//!    mechanic's queue pages show it within 1 s.
//! 2. They end it: the active-session banner disappears within 1 s, the card leaves both queues.
//! 3. Without a reload they open a PAID request → both queues show it within 1 s, urgent.
//! 4. The workshop mechanic clicks Accept → the customer sees "Mechanic assigned" within 1 s and
//!    the card leaves every queue (the freelancer's within 1 s).
//! 5. The mechanic clicks Complete → the customer sees "Session ended" within 1 s, the banner
//!    goes.
//! 6. The customer opens another request, then clicks "End session" → the banner disappears
//!    within 1 s; it has not come back 30 s later (the page is watched the whole time, through
//!    a reconnect of its WebSocket and other customers' traffic).
//! 7. Desktop alerts: with permission granted (DevTools `Browser.grantPermissions`) and the
//!    mechanic's window minimized (the page is `hidden`), a new card raises exactly one
//!    notification — none while the page is visible, none for cards that leave or change —
//!    and clicking it focuses the tab.
//! 8. No page logged an error (no 404 favicon).
//!
//! Every timing is measured inside the pages (a capture-phase click listener and mutation
//! observers record `Date.now()`; all windows share the machine's clock), so WebDriver's polling
//! does not count against the 1 s. Each check, its timing and its limit are printed and written
//! to `target/screenshots/checklist/timings.txt`, with a screenshot of each step next to it.

// Shared with crates/pgcast/tests/demo_api.rs, which uses other parts of it.
#[allow(dead_code)]
#[path = "support/demo_server.rs"]
mod demo_server;
// Each test binary uses part of the shared helpers.
#[allow(dead_code)]
#[path = "support/webdriver.rs"]
mod webdriver;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fantoccini::wd::WindowHandle;
use pgcast_events::Role;
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

use demo_server::{link_user, DemoServer};
use webdriver::{screenshot_dir, Browser, DESKTOP, PHONE};

/// What the checklist allows between a click and what the other pages show.
const ONE_SECOND: u64 = 1000;
/// Bound of every wait; reached only when something is wrong (the timings are checked
/// separately, against [`ONE_SECOND`]).
const LIMIT: Duration = Duration::from_secs(10);
/// How long the ended session's banner is watched for a comeback.
const WATCH: Duration = Duration::from_secs(30);

/// Installed in each mechanic page: when each card appeared in and left the queue (`#cards`)
/// and the "in progress" list (`#mine`), and every click, by `Date.now()`.
const MECHANIC_WITNESS: &str = r#"
if (!window.__w) {
  const w = window.__w = { seen: {}, gone: {}, mine: {}, mineGone: {}, clicks: [] };
  const watch = (list, seen, gone) => {
    const scan = () => {
      const now = Date.now();
      const present = new Set([...list.children].map((li) => li.dataset.id));
      for (const id of present) if (!(id in seen)) seen[id] = now;
      for (const id of Object.keys(seen)) if (!present.has(id) && !(id in gone)) gone[id] = now;
    };
    new MutationObserver(scan).observe(list, { childList: true });
    scan();
  };
  watch(document.getElementById('cards'), w.seen, w.gone);
  watch(document.getElementById('mine'), w.mine, w.mineGone);
  document.addEventListener('click', (e) => {
    const el = e.target.closest('[data-action], [data-testid]');
    w.clicks.push([Date.now(), el ? (el.dataset.action || el.dataset.testid) : '?']);
  }, true);
}
return true;"#;

/// Installed in the customer page: every change of the active-session banner and the status
/// card, and every click, by `Date.now()`.
const CUSTOMER_WITNESS: &str = r#"
if (!window.__w) {
  const w = window.__w = { trace: [], clicks: [] };
  const active = document.getElementById('active');
  const banner = document.getElementById('banner');
  const title = document.getElementById('banner-title');
  const activeTitle = document.getElementById('active-title');
  const snap = () => {
    const s = [Date.now(), active.hidden ? 'hidden' : active.dataset.state,
      active.hidden ? '' : activeTitle.textContent, banner.dataset.state, title.textContent];
    const last = w.trace[w.trace.length - 1];
    if (!last || last.slice(1).join('|') !== s.slice(1).join('|')) w.trace.push(s);
  };
  new MutationObserver(snap).observe(document.querySelector('main'),
    { attributes: true, childList: true, subtree: true, characterData: true });
  snap();
  document.addEventListener('click', (e) => {
    const el = e.target.closest('[data-testid]');
    w.clicks.push([Date.now(), el ? el.dataset.testid : '?']);
  }, true);
}
return true;"#;

/// Wraps `window.Notification` so the test sees every notification the page raises (they are
/// still shown through the real one), and `window.focus` so it sees a click bring the tab up.
const NOTIFICATION_SPY: &str = r#"
if (!window.__notes) {
  const Real = window.Notification;
  window.__notes = [];
  window.__focused = 0;
  const realFocus = window.focus.bind(window);
  window.focus = () => { window.__focused += 1; realFocus(); };
  window.Notification = class extends Real {
    constructor(title, options) {
      super(title, options);
      window.__notes.push({ at: Date.now(), title, body: options?.body ?? '', tag: options?.tag ?? '',
        hidden: document.visibilityState === 'hidden', note: this });
    }
  };
}
return true;"#;

const NOTES_VIEW: &str = r#"
return {
  notes: window.__notes.map((n) => ({ at: n.at, title: n.title, body: n.body, tag: n.tag, hidden: n.hidden })),
  focused: window.__focused,
  visibility: document.visibilityState,
  permission: Notification.permission,
  alerts: document.getElementById('alerts').getAttribute('aria-pressed'),
  cards: [...document.querySelectorAll('#cards > li')].map((li) => li.dataset.id),
};"#;

const MECHANIC_VIEW: &str = r#"
return {
  state: document.getElementById('status').dataset.state,
  cards: [...document.querySelectorAll('#cards > li')].map((li) => [li.dataset.id, li.dataset.urgent]),
  mine: [...document.querySelectorAll('#mine > li')].map((li) => li.dataset.id),
  w: window.__w,
};"#;

const CUSTOMER_VIEW: &str = r#"
const active = document.getElementById('active');
return {
  state: document.getElementById('status').dataset.state,
  active: active.hidden ? null : active.dataset.state,
  activeTitle: document.getElementById('active-title').textContent,
  activeSession: active.dataset.session,
  banner: document.getElementById('banner').dataset.state,
  title: document.getElementById('banner-title').textContent,
  form: !document.getElementById('new-request').hidden,
  marker: window.__testMarker ?? null,
  states: window.pgcast.states,
  w: window.__w,
};"#;

/// The checks with their timings, written out after every one (a failing run keeps what passed).
struct Record {
    lines: Vec<String>,
    dir: PathBuf,
    started: Instant,
}

impl Record {
    fn new() -> Record {
        let dir = screenshot_dir().join("checklist");
        std::fs::create_dir_all(&dir).expect("output folder");
        Record {
            lines: Vec::new(),
            dir,
            started: Instant::now(),
        }
    }

    /// One check: `took` ms against `limit` ms (0: no timing limit).
    fn check(&mut self, what: &str, took: u64, limit: u64) {
        let ok = limit == 0 || took <= limit;
        let line = if limit == 0 {
            format!(
                "{:>7.1}s  ok    {what}",
                self.started.elapsed().as_secs_f64()
            )
        } else {
            format!(
                "{:>7.1}s  {}  {what}: {took} ms (limit {limit} ms)",
                self.started.elapsed().as_secs_f64(),
                if ok { "ok  " } else { "FAIL" }
            )
        };
        eprintln!("checklist {line}");
        self.lines.push(line);
        self.write();
        assert!(ok, "{what}: took {took} ms, more than {limit} ms");
    }

    fn write(&self) {
        let mut text =
            String::from("pgcast checklist (tests/checklist.rs): elapsed, result, check\n");
        for line in &self.lines {
            let _ = writeln!(text, "{line}");
        }
        std::fs::write(self.dir.join("timings.txt"), text).expect("write timings.txt");
    }
}

/// The page windows of the test, each its own browser window (all visible at once).
struct Windows {
    customer: WindowHandle,
    freelancer: WindowHandle,
    workshop: WindowHandle,
}

fn num(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_f64().map(|f| f as u64))
        .unwrap_or_else(|| panic!("not a time: {v}"))
}

/// The time of the last click on `label` recorded in the page's witness.
fn click_time(view: &Value, label: &str) -> u64 {
    view["w"]["clicks"]
        .as_array()
        .and_then(|c| c.iter().rev().find(|c| c[1] == label))
        .map(|c| num(&c[0]))
        .unwrap_or_else(|| panic!("no click on {label} recorded: {view:#}"))
}

/// The first trace entry of the customer page at or after `since` that `ok` accepts: its time.
fn trace_time(view: &Value, since: u64, ok: impl Fn(&Value) -> bool) -> Option<u64> {
    view["w"]["trace"]
        .as_array()?
        .iter()
        .find(|s| num(&s[0]) >= since && ok(s))
        .map(|s| num(&s[0]))
}

/// Milliseconds from `from` to `to`, both page clock readings.
fn elapsed(from: u64, to: u64) -> u64 {
    to.saturating_sub(from)
}

/// The id of the customer's newest assignment and its session.
async fn newest_assignment(db: &Client, customer: Uuid) -> (Uuid, Uuid) {
    let row = db
        .query_one(
            "SELECT a.id, a.session_id FROM session_assignments a \
             JOIN sessions s ON s.id = a.session_id WHERE s.customer_id = $1 \
             ORDER BY a.created_at DESC, a.id LIMIT 1",
            &[&customer],
        )
        .await
        .expect("the customer's newest assignment");
    (row.get(0), row.get(1))
}

async fn open(browser: &Browser, url: &str, witness: &str) {
    browser.goto(url).await;
    browser
        .eval("window.__testMarker = 'loaded once'; return true;")
        .await;
    browser
        .wait_for(
            "the page to be live",
            LIMIT,
            "return document.getElementById('status').dataset.state;",
            |v| v == "live",
        )
        .await;
    browser.eval(witness).await;
}

/// Types a request into the customer page and clicks `button` (open-free or open-paid).
async fn open_request(browser: &Browser, vehicle: &str, concern: &str, button: &str) {
    browser
        .wait_for(
            "the new-request form",
            LIMIT,
            "return !document.getElementById('new-request').hidden && \
             !document.querySelector('[data-testid=open-free]').disabled;",
            |v| v == true,
        )
        .await;
    browser.type_into("#vehicle-input", vehicle).await;
    browser.type_into("#concern-input", concern).await;
    browser.click(&format!("[data-testid={button}]")).await;
}

/// Waits until a mechanic page shows card `id` in its queue; returns the view.
async fn wait_card(browser: &Browser, who: &str, id: Uuid) -> Value {
    let id = id.to_string();
    browser
        .wait_for(&format!("{who}: card {id}"), LIMIT, MECHANIC_VIEW, |v| {
            v["w"]["seen"].get(&id).is_some()
        })
        .await
}

/// Waits until a mechanic page's queue no longer shows card `id`; returns the view.
async fn wait_card_gone(browser: &Browser, who: &str, id: Uuid) -> Value {
    let id = id.to_string();
    browser
        .wait_for(
            &format!("{who}: card {id} gone"),
            LIMIT,
            MECHANIC_VIEW,
            |v| v["w"]["gone"].get(&id).is_some(),
        )
        .await
}

fn card_time(view: &Value, key: &str, id: Uuid) -> u64 {
    num(&view["w"][key][id.to_string()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checklist_end_to_end() {
    let mut record = Record::new();
    let (server, db) = DemoServer::start().await;
    let customer_link = server.link("Customer");
    let customer = link_user(&customer_link);
    let browser = Browser::start().await;
    browser.set_viewport(DESKTOP).await;

    // Three windows side by side, as three people would have them: all visible at once.
    let windows = Windows {
        customer: browser.current_tab().await,
        freelancer: browser.new_tab(false).await,
        workshop: browser.new_tab(false).await,
    };
    browser.switch_to(&windows.freelancer).await;
    open(
        &browser,
        &server.url(&server.link("freelancer")),
        MECHANIC_WITNESS,
    )
    .await;
    browser.switch_to(&windows.workshop).await;
    open(
        &browser,
        &server.url(&server.link("Northside")),
        MECHANIC_WITNESS,
    )
    .await;
    browser.switch_to(&windows.customer).await;
    open(&browser, &server.url(&customer_link), CUSTOMER_WITNESS).await;
    let view = browser
        .wait_for(
            "the customer page with no open session",
            LIMIT,
            CUSTOMER_VIEW,
            |v| v["form"] == true,
        )
        .await;
    assert_eq!(view["active"], Value::Null, "no banner yet: {view:#}");
    assert_eq!(view["banner"], "none", "{view:#}");
    browser.screenshot("checklist/00-customer-start").await;
    record.check("pages open live; the customer has no open session", 0, 0);

    // 1. A FREE request reaches a general and a workshop mechanic within 1 s.
    open_request(
        &browser,
        "2014 VW Golf 1.6 TDI",
        "Grinding noise when braking.",
        "open-free",
    )
    .await;
    let view = browser
        .wait_for("the banner: waiting", LIMIT, CUSTOMER_VIEW, |v| {
            v["active"] == "waiting"
        })
        .await;
    let clicked = click_time(&view, "open-free");
    let shown = trace_time(&view, clicked, |s| s[1] == "waiting").expect("banner shown");
    record.check(
        "free request: the customer's banner shows it",
        elapsed(clicked, shown),
        ONE_SECOND,
    );
    let (free, free_session) = newest_assignment(&db, customer).await;
    for (window, who, name) in [
        (&windows.freelancer, "freelancer", "freelancer"),
        (&windows.workshop, "workshop mechanic", "workshop"),
    ] {
        browser.switch_to(window).await;
        let view = wait_card(&browser, who, free).await;
        record.check(
            &format!("free request: in the {who}'s queue"),
            elapsed(clicked, card_time(&view, "seen", free)),
            ONE_SECOND,
        );
        let urgent = view["cards"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c[0] == free.to_string()))
            .map(|c| c[1].clone());
        assert_eq!(urgent, Some(json!("false")), "a free request is not urgent");
        browser
            .screenshot(&format!("checklist/01-free-{name}"))
            .await;
    }
    browser.switch_to(&windows.customer).await;
    browser.screenshot("checklist/01-free-customer").await;

    // 2. The customer ends it: the banner goes within 1 s, the card leaves both queues.
    browser.click("[data-testid=end-session]").await;
    let view = browser
        .wait_for("the banner to go", LIMIT, CUSTOMER_VIEW, |v| {
            v["active"].is_null() && v["form"] == true
        })
        .await;
    let clicked = click_time(&view, "end-session");
    let gone = trace_time(&view, clicked, |s| s[1] == "hidden").expect("banner hidden");
    record.check(
        "end session: the banner disappears",
        elapsed(clicked, gone),
        ONE_SECOND,
    );
    assert_eq!(view["banner"], "ended", "{view:#}");
    for (window, who) in [
        (&windows.freelancer, "freelancer"),
        (&windows.workshop, "workshop mechanic"),
    ] {
        browser.switch_to(window).await;
        let view = wait_card_gone(&browser, who, free).await;
        record.check(
            &format!("end session: the card leaves the {who}'s queue"),
            elapsed(clicked, card_time(&view, "gone", free)),
            ONE_SECOND,
        );
    }
    browser.switch_to(&windows.customer).await;
    browser.screenshot("checklist/02-ended-customer").await;

    // 3. A PAID request, without a reload.
    open_request(
        &browser,
        "2019 Toyota Corolla Hybrid",
        "Engine warning light after refuelling.",
        "open-paid",
    )
    .await;
    let view = browser
        .wait_for("the banner: waiting (paid)", LIMIT, CUSTOMER_VIEW, |v| {
            v["active"] == "waiting"
        })
        .await;
    assert_eq!(view["marker"], "loaded once", "no reload");
    let clicked = click_time(&view, "open-paid");
    let (paid, paid_session) = newest_assignment(&db, customer).await;
    assert_ne!(paid_session, free_session, "a new session");
    assert_eq!(view["activeSession"], paid_session.to_string());
    for (window, who, name) in [
        (&windows.freelancer, "freelancer", "freelancer"),
        (&windows.workshop, "workshop mechanic", "workshop"),
    ] {
        browser.switch_to(window).await;
        let view = wait_card(&browser, who, paid).await;
        record.check(
            &format!("paid request: in the {who}'s queue"),
            elapsed(clicked, card_time(&view, "seen", paid)),
            ONE_SECOND,
        );
        // Urgent: before every card that is not.
        let cards = view["cards"].as_array().cloned().unwrap_or_default();
        let at = cards
            .iter()
            .position(|c| c[0] == paid.to_string())
            .expect("the paid card");
        assert_eq!(cards[at][1], "true", "a paid request is urgent");
        assert!(
            cards[..at].iter().all(|c| c[1] == "true"),
            "urgent cards go first: {cards:?}"
        );
        browser
            .screenshot(&format!("checklist/03-paid-{name}"))
            .await;
    }

    // 4. The workshop mechanic accepts: the customer sees "Mechanic assigned" within 1 s and
    //    the card leaves every queue.
    browser.switch_to(&windows.workshop).await;
    browser
        .click(&format!(
            "#cards li[data-id='{paid}'] button[data-action=accept]"
        ))
        .await;
    let view = wait_card_gone(&browser, "workshop mechanic", paid).await;
    let accepted = click_time(&view, "accept");
    record.check(
        "accept: the card leaves the accepting mechanic's queue",
        elapsed(accepted, card_time(&view, "gone", paid)),
        ONE_SECOND,
    );
    let view = browser
        .wait_for("the accepted card in progress", LIMIT, MECHANIC_VIEW, |v| {
            v["mine"] == json!([paid.to_string()])
        })
        .await;
    record.check(
        "accept: the card is in the mechanic's \"in progress\" list",
        elapsed(accepted, card_time(&view, "mine", paid)),
        ONE_SECOND,
    );
    browser.screenshot("checklist/04-accepted-workshop").await;
    browser.switch_to(&windows.customer).await;
    let view = browser
        .wait_for("mechanic assigned", LIMIT, CUSTOMER_VIEW, |v| {
            v["active"] == "assigned"
        })
        .await;
    assert_eq!(view["activeTitle"], "Mechanic assigned");
    assert_eq!(view["title"], "Mechanic assigned");
    let assigned = trace_time(&view, accepted, |s| s[1] == "assigned").expect("assigned");
    record.check(
        "accept: the customer sees \"mechanic assigned\"",
        elapsed(accepted, assigned),
        ONE_SECOND,
    );
    browser.screenshot("checklist/04-assigned-customer").await;
    browser.set_viewport(PHONE).await;
    browser
        .screenshot("checklist/04-assigned-customer-phone")
        .await;
    browser.set_viewport(DESKTOP).await;
    browser.switch_to(&windows.freelancer).await;
    let view = wait_card_gone(&browser, "freelancer", paid).await;
    record.check(
        "accept: the card leaves the other mechanic's queue",
        elapsed(accepted, card_time(&view, "gone", paid)),
        ONE_SECOND,
    );
    browser.screenshot("checklist/04-accepted-freelancer").await;

    // 5. Complete: the customer sees "Session ended"; the banner goes.
    browser.switch_to(&windows.workshop).await;
    browser
        .click(&format!(
            "#mine li[data-id='{paid}'] button[data-action=complete]"
        ))
        .await;
    let view = browser
        .wait_for("the completed card to leave", LIMIT, MECHANIC_VIEW, |v| {
            v["w"]["mineGone"].get(paid.to_string()).is_some()
        })
        .await;
    let completed = click_time(&view, "complete");
    browser.switch_to(&windows.customer).await;
    let view = browser
        .wait_for("session ended", LIMIT, CUSTOMER_VIEW, |v| {
            v["banner"] == "ended" && v["active"].is_null()
        })
        .await;
    assert_eq!(view["title"], "Session ended");
    let ended = trace_time(&view, completed, |s| {
        s[3] == "ended" && s[4] == "Session ended"
    })
    .expect("ended");
    record.check(
        "complete: the customer sees \"session ended\"",
        elapsed(completed, ended),
        ONE_SECOND,
    );
    let hidden = trace_time(&view, completed, |s| s[1] == "hidden").expect("banner hidden");
    record.check(
        "complete: the banner disappears",
        elapsed(completed, hidden),
        ONE_SECOND,
    );
    browser.screenshot("checklist/05-completed-customer").await;

    // 6. Another request, then "End session": the banner goes within 1 s and stays gone.
    open_request(
        &browser,
        "2011 Ford Focus 1.0 EcoBoost",
        "Battery is flat every other morning.",
        "open-free",
    )
    .await;
    let view = browser
        .wait_for("the banner again (no reload)", LIMIT, CUSTOMER_VIEW, |v| {
            v["active"] == "waiting"
        })
        .await;
    assert_eq!(view["marker"], "loaded once", "no reload");
    let clicked = click_time(&view, "open-free");
    let shown = trace_time(&view, clicked, |s| s[1] == "waiting").expect("banner shown");
    record.check(
        "a new request opens without a reload",
        elapsed(clicked, shown),
        ONE_SECOND,
    );
    let (last, _) = newest_assignment(&db, customer).await;
    browser.screenshot("checklist/06-open-again-customer").await;
    browser.click("[data-testid=end-session]").await;
    let view = browser
        .wait_for("the banner to go for good", LIMIT, CUSTOMER_VIEW, |v| {
            v["active"].is_null() && v["form"] == true
        })
        .await;
    let end_clicked = click_time(&view, "end-session");
    let gone = trace_time(&view, end_clicked, |s| s[1] == "hidden").expect("banner hidden");
    record.check(
        "end session: the banner disappears",
        elapsed(end_clicked, gone),
        ONE_SECOND,
    );
    let status: String = db
        .query_one(
            "SELECT status FROM session_assignments WHERE id = $1",
            &[&last],
        )
        .await
        .expect("status")
        .get(0);
    assert_eq!(status, "cancelled");
    browser.screenshot("checklist/06-ended-customer").await;
    let watch_until = Instant::now() + WATCH;
    // The page's connection drops and comes back while it is watched: resuming must not bring
    // an old state back.
    browser
        .eval("window.pgcast.client.ws.close(4000, 'checklist: reconnect'); return true;")
        .await;

    // 7. Desktop alerts, while the customer's banner is being watched.
    browser.switch_to(&windows.freelancer).await;
    browser.eval(NOTIFICATION_SPY).await;
    let origin = server.url("");
    browser
        .devtools(
            "Browser.grantPermissions",
            json!({ "permissions": ["notifications"], "origin": origin }),
        )
        .await;
    browser.click("[data-testid=alerts]").await;
    let view = browser
        .wait_for("alerts on", LIMIT, NOTES_VIEW, |v| v["alerts"] == "true")
        .await;
    assert_eq!(view["permission"], "granted");
    assert_eq!(view["visibility"], "visible");
    browser
        .screenshot("checklist/07-alerts-on-freelancer")
        .await;
    // Other customers open requests (another service's page, through the same API).
    let other_request = |vehicle: &str, kind: &str| {
        json!({ "kind": kind, "vehicle": vehicle, "concern": "Clunk over speed bumps." })
            .to_string()
    };
    let (first_other, first_token) = {
        let (who, link) = server.page_for(Role::Customer, None);
        (who, link.split_once("#token=").expect("token").1.to_owned())
    };
    // Visible page: a new card, no notification.
    let (status, body) = server
        .request(
            "POST",
            "/demo/api/requests",
            Some(&first_token),
            Some(&other_request("2008 Honda Civic 1.8", "free")),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let (visible_card, _) = newest_assignment(&db, first_other.user_id).await;
    wait_card(&browser, "freelancer", visible_card).await;
    // Hidden page: minimize its window.
    browser.minimize().await;
    browser
        .wait_for(
            "the page to be hidden",
            LIMIT,
            "return document.visibilityState;",
            |v| v == "hidden",
        )
        .await;
    let (second_other, second_token) = {
        let (who, link) = server.page_for(Role::Customer, None);
        (who, link.split_once("#token=").expect("token").1.to_owned())
    };
    let sent = browser.eval("return Date.now();").await;
    let (status, body) = server
        .request(
            "POST",
            "/demo/api/requests",
            Some(&second_token),
            Some(&other_request("2017 BMW 320d", "paid")),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let (hidden_card, _) = newest_assignment(&db, second_other.user_id).await;
    let view = browser
        .wait_for("one notification", LIMIT, NOTES_VIEW, |v| {
            v["notes"].as_array().is_some_and(|n| !n.is_empty())
        })
        .await;
    record.check(
        "desktop alert: a new card in a hidden tab raises a notification",
        elapsed(num(&sent), num(&view["notes"][0]["at"])),
        ONE_SECOND,
    );
    let note = &view["notes"][0];
    assert_eq!(note["title"], "Urgent request", "{view:#}");
    assert!(
        note["body"]
            .as_str()
            .is_some_and(|b| b.contains("2017 BMW 320d") && b.contains("Urgent")),
        "title, vehicle, urgency: {view:#}"
    );
    assert_eq!(note["tag"], format!("pgcast-{hidden_card}"));
    assert_eq!(note["hidden"], true);
    // Cards that leave the queue or change raise nothing: the workshop mechanic takes the first
    // one, the second one's concern is edited.
    let (_, taker_link) = server.page_for(Role::Mechanic, None);
    let taker_token = taker_link.split_once("#token=").expect("token").1;
    let (status, body) = server
        .request(
            "POST",
            &format!("/demo/api/assignments/{visible_card}/accept"),
            Some(taker_token),
            None,
        )
        .await;
    assert_eq!(status, 204, "{body}");
    db.execute(
        "UPDATE session_assignments SET concern = 'Clunk, and now a rattle.', \
         updated_at = now() WHERE id = $1",
        &[&hidden_card],
    )
    .await
    .expect("edit the concern");
    browser
        .wait_for("the taken card to leave", LIMIT, NOTES_VIEW, |v| {
            v["cards"]
                .as_array()
                .is_some_and(|c| !c.contains(&json!(visible_card.to_string())))
        })
        .await;
    browser
        .wait_for(
            "the edited card to update",
            LIMIT,
            &format!("return window.pgcast.queue.get('{hidden_card}')?.concern ?? null;"),
            |v| v == "Clunk, and now a rattle.",
        )
        .await;
    let view = browser.eval(NOTES_VIEW).await;
    assert_eq!(
        view["notes"].as_array().map(Vec::len),
        Some(1),
        "exactly one notification: {view:#}"
    );
    assert_eq!(view["visibility"], "hidden");
    record.check(
        "desktop alert: exactly one; none while visible, none for cards that leave or change",
        0,
        0,
    );
    // Clicking it brings the tab to the front.
    browser
        .eval("window.__notes[0].note.onclick(new Event('click')); return true;")
        .await;
    let view = browser.eval(NOTES_VIEW).await;
    assert_eq!(view["focused"], 1, "the click focuses the tab: {view:#}");
    record.check("desktop alert: clicking it focuses the tab", 0, 0);
    browser.restore().await;
    browser.screenshot("checklist/07-alerted-freelancer").await;

    // 6, continued: the banner has not come back, watched until 30 s after "End session".
    browser.switch_to(&windows.customer).await;
    let came_back = |v: &Value| {
        v["active"] != Value::Null || trace_time(v, end_clicked + 1, |s| s[1] != "hidden").is_some()
    };
    loop {
        let view = browser.eval(CUSTOMER_VIEW).await;
        assert!(!came_back(&view), "the banner came back: {view:#}");
        if Instant::now() >= watch_until {
            let states: Vec<&str> = view["states"]
                .as_array()
                .map(|s| s.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            assert!(
                states.windows(2).any(|w| w == ["reconnecting", "live"]),
                "the page reconnected during the watch: {states:?}"
            );
            assert_eq!(view["state"], "live");
            assert_eq!(view["form"], true, "a new request can be opened");
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let now = num(&browser.eval("return Date.now();").await);
    record.check(
        &format!(
            "the banner has not come back {} s after \"End session\" (through a reconnect)",
            elapsed(end_clicked, now) / 1000
        ),
        0,
        0,
    );
    browser
        .screenshot("checklist/08-still-ended-customer")
        .await;

    // 8. No page logged an error (no 404 for a favicon, no failed request).
    for window in [&windows.customer, &windows.freelancer, &windows.workshop] {
        browser.switch_to(window).await;
        let errors: Vec<Value> = browser
            .console()
            .await
            .into_iter()
            .filter(|m| m["level"] == "SEVERE")
            .collect();
        assert!(errors.is_empty(), "console errors: {errors:#?}");
    }
    record.check("no console errors (no favicon 404)", 0, 0);

    browser.close().await;
    server.stop().await;
}
