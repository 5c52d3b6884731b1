//! The demo's action API: what "another service" of the marketplace would do when a person
//! clicks a button on a demo page. Served by `pgcast demo` only — `serve` has no such routes.
//!
//! ```text
//!   page button ──POST /demo/api/… (Bearer JWT)──▶ handler ──plain SQL (sql/demo_*.sql)──▶ tables
//!        ▲                     204 / error, never row data                                  │ trigger
//!        └──────────── WebSocket event ◀── gateway ◀── listener ◀── pgcast.assignment_events ┘
//! ```
//!
//! The answer of a successful action is `204 No Content`: it carries no assignment or session
//! data, so a page cannot render from it. What the page shows arrives on its subscription, the
//! one path every other client uses. A refused action answers with a status and
//! `{"error": "<code>", "message": "<what to do>"}`.
//!
//! Routes (all `POST`, authenticated with the page's own token, checked like the gateway does):
//! - `/demo/api/requests` (customer) — body `{"kind": "free"|"paid", "vehicle": "…",
//!   "concern": "…"}`: opens a session of that kind with one `queued` assignment in the
//!   general queue, so that every mechanic, freelancer or workshop, can take it. A paid request
//!   is marked urgent (it goes first in every queue). One open session per customer at a time:
//!   another request while one is open is `409`.
//! - `/demo/api/sessions/{id}/end` (that session's customer): its accepted assignment is
//!   completed, the waiting ones cancelled, the session ended.
//! - `/demo/api/assignments/{id}/accept` (a mechanic who has it in their queue): `accepted`
//!   with their id, only while it is still `queued` or `offered` — a second accept is `409`.
//! - `/demo/api/assignments/{id}/decline` (the mechanic it was offered to): `declined`, and the
//!   request goes back to the queue it came from as a new `queued` assignment.
//! - `/demo/api/assignments/{id}/complete` (the mechanic who accepted it): `completed`, and the
//!   session ends.
//!
//! Why about 680 lines: one small handler per demo button, sharing authorization and the error
//! shape, and their unit tests; none of it is part of `serve`.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use deadpool_postgres::Pool;
use pgcast_events::{Principal, Role};
use pgcast_gateway::TokenVerifier;
use serde::Deserialize;
use uuid::Uuid;

use crate::demo::{DEMO_CUSTOMER, DEMO_CUSTOMER_NAME, INSERT_ASSIGNMENT_SQL, INSERT_SESSION_SQL};
use crate::PgcastError;

const LOCK_CUSTOMER_SQL: &str = include_str!("../../../sql/demo_lock_customer.sql");
const CUSTOMER_OPEN_SESSION_SQL: &str = include_str!("../../../sql/demo_customer_open_session.sql");
const LOCK_SESSION_SQL: &str = include_str!("../../../sql/demo_lock_session.sql");
const END_ASSIGNMENTS_SQL: &str = include_str!("../../../sql/demo_end_assignments.sql");
const END_SESSION_SQL: &str = include_str!("../../../sql/demo_end_session.sql");
const LOCK_ASSIGNMENT_SQL: &str = include_str!("../../../sql/demo_lock_assignment.sql");
const SET_ASSIGNMENT_STATUS_SQL: &str = include_str!("../../../sql/demo_set_assignment_status.sql");
const REQUEUE_SQL: &str = include_str!("../../../sql/demo_requeue.sql");

/// The `<head>` line that tells the demo pages where the API is; pages without it (those of
/// `serve`) show no buttons.
pub(crate) const PAGE_HEAD: &str = r#"<meta name="pgcast-demo-api" content="/demo/api">"#;

/// Connections of the API's pool: a person clicks, nothing more.
const POOL_SIZE: usize = 4;
/// Longest vehicle description accepted, in characters.
const MAX_VEHICLE: usize = 120;
/// Longest concern accepted, in characters.
const MAX_CONCERN: usize = 1000;
/// Bound of one action's database work: a stuck database answers 503 instead of hanging the
/// button.
const ACTION_LIMIT: Duration = Duration::from_secs(10);

/// Why an action was refused. Clients get the code and the message; the database's own error
/// goes to the log only.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DemoApiError {
    /// The request is malformed (body, id); the message says what to fix.
    #[error("{0}")]
    BadRequest(String),
    /// No token, or one that does not verify.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The token's user may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// No such session or assignment.
    #[error("{0}")]
    NotFound(&'static str),
    /// Not possible in the row's current state (taken, ended, one already open).
    #[error("{0}")]
    Conflict(String),
    /// The database failed or did not answer in time.
    #[error("the database is unavailable; try again")]
    Unavailable,
}

impl DemoApiError {
    fn status(&self) -> (StatusCode, &'static str) {
        match self {
            DemoApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            DemoApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            DemoApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            DemoApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            DemoApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            DemoApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }
}

impl IntoResponse for DemoApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status();
        let body = serde_json::json!({ "error": code, "message": self.to_string() });
        (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

/// A database error: logged with its detail, answered with `unavailable`.
fn db(what: &'static str) -> impl Fn(tokio_postgres::Error) -> DemoApiError {
    move |error| {
        tracing::warn!(%error, what, "demo action failed in the database");
        DemoApiError::Unavailable
    }
}

#[derive(Clone)]
struct Api {
    pool: Pool,
    verifier: TokenVerifier,
}

/// The API's routes, with their own pool on `pg` and a verifier for tokens signed with
/// `secret` (the demo's gateway secret).
pub(crate) fn router(pg: &crate::DatabaseUrl, secret: &[u8]) -> Result<Router, PgcastError> {
    let verifier = TokenVerifier::new(secret).map_err(PgcastError::Gateway)?;
    let pool = crate::db::pool(pg, POOL_SIZE)?;
    Ok(Router::new()
        .route("/demo/api/requests", post(open_request))
        .route("/demo/api/sessions/{id}/end", post(end_session))
        .route("/demo/api/assignments/{id}/accept", post(accept))
        .route("/demo/api/assignments/{id}/decline", post(decline))
        .route("/demo/api/assignments/{id}/complete", post(complete))
        .with_state(Api { pool, verifier }))
}

impl Api {
    /// The user of the request's `Authorization: Bearer <token>`, who must have `role`.
    fn user(&self, headers: &HeaderMap, role: Role) -> Result<Principal, DemoApiError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(DemoApiError::Unauthorized(
                "send the page's token as Authorization: Bearer <token>",
            ))?;
        let who = self
            .verifier
            .verify(token)
            .map_err(|_| DemoApiError::Unauthorized("the token is invalid or has expired"))?
            .principal;
        if who.role != role {
            return Err(DemoApiError::Forbidden(format!(
                "only a {} can do this",
                role.as_str()
            )));
        }
        Ok(who)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, DemoApiError> {
        self.pool.get().await.map_err(|error| {
            tracing::warn!(%error, "demo action: no database connection");
            DemoApiError::Unavailable
        })
    }
}

/// Runs one action with a time limit.
async fn bounded(
    action: impl std::future::Future<Output = Result<(), DemoApiError>>,
) -> Result<StatusCode, DemoApiError> {
    match tokio::time::timeout(ACTION_LIMIT, action).await {
        Ok(Ok(())) => Ok(StatusCode::NO_CONTENT),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(DemoApiError::Unavailable),
    }
}

/// A path segment that must be a UUID.
fn parse_id(text: &str, what: &str) -> Result<Uuid, DemoApiError> {
    text.parse().map_err(|_| {
        DemoApiError::BadRequest(format!(
            "`{text}` is not a valid {what} id (expected a UUID)"
        ))
    })
}

/// Kinds of request a customer can open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Free,
    Paid,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Free => "free",
            Kind::Paid => "paid",
        }
    }
}

/// A customer's new request, validated.
#[derive(Debug, PartialEq, Eq)]
struct NewRequest {
    kind: Kind,
    vehicle: String,
    concern: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRequestBody {
    kind: String,
    vehicle: String,
    concern: String,
}

impl NewRequest {
    fn parse(body: &[u8]) -> Result<NewRequest, DemoApiError> {
        let raw: NewRequestBody = serde_json::from_slice(body).map_err(|e| {
            DemoApiError::BadRequest(format!(
                "the body must be JSON {{\"kind\": \"free\"|\"paid\", \"vehicle\": \"…\", \
                 \"concern\": \"…\"}}: {e}"
            ))
        })?;
        let kind = match raw.kind.as_str() {
            "free" => Kind::Free,
            "paid" => Kind::Paid,
            other => {
                return Err(DemoApiError::BadRequest(format!(
                    "kind must be \"free\" or \"paid\", not {other:?}"
                )))
            }
        };
        let vehicle = field("vehicle", &raw.vehicle, MAX_VEHICLE)?;
        let concern = field("concern", &raw.concern, MAX_CONCERN)?;
        Ok(NewRequest {
            kind,
            vehicle,
            concern,
        })
    }
}

/// A required text field, trimmed, at most `max` characters.
fn field(name: &str, value: &str, max: usize) -> Result<String, DemoApiError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(DemoApiError::BadRequest(format!("{name} is required")));
    }
    if value.chars().count() > max {
        return Err(DemoApiError::BadRequest(format!(
            "{name} is too long (at most {max} characters)"
        )));
    }
    Ok(value.to_owned())
}

/// Opens a session with one queued assignment in the general queue.
async fn open_request(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, DemoApiError> {
    let who = api.user(&headers, Role::Customer)?;
    let request = NewRequest::parse(&body)?;
    let name = if who.user_id == DEMO_CUSTOMER {
        DEMO_CUSTOMER_NAME
    } else {
        "Customer"
    };
    bounded(async {
        let mut client = api.client().await?;
        let tx = client.transaction().await.map_err(db("begin"))?;
        tx.execute(LOCK_CUSTOMER_SQL, &[&who.user_id])
            .await
            .map_err(db("lock the customer"))?;
        let open: bool = tx
            .query_one(CUSTOMER_OPEN_SESSION_SQL, &[&who.user_id])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(db("look for an open session"))?;
        if open {
            return Err(DemoApiError::Conflict(
                "you already have an open session: end it before opening a new request".into(),
            ));
        }
        let session: Uuid = tx
            .query_one(INSERT_SESSION_SQL, &[&who.user_id, &request.kind.as_str()])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(db("insert the session"))?;
        let (mechanic, workshop, status): (Option<Uuid>, Option<Uuid>, &str) =
            (None, None, "queued");
        let urgent = request.kind == Kind::Paid;
        tx.execute(
            INSERT_ASSIGNMENT_SQL,
            &[
                &session,
                &mechanic,
                &workshop,
                &status,
                &urgent,
                &name,
                &request.vehicle,
                &request.concern,
            ],
        )
        .await
        .map_err(db("insert the assignment"))?;
        tx.commit().await.map_err(db("commit"))
    })
    .await
}

/// Ends a session of the token's customer.
async fn end_session(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, DemoApiError> {
    let who = api.user(&headers, Role::Customer)?;
    let session = parse_id(&id, "session")?;
    bounded(async {
        let mut client = api.client().await?;
        let tx = client.transaction().await.map_err(db("begin"))?;
        let row = tx
            .query_opt(LOCK_SESSION_SQL, &[&session])
            .await
            .map_err(db("lock the session"))?
            .ok_or(DemoApiError::NotFound("no such session"))?;
        let owner: Uuid = row.try_get(0).map_err(db("read the session"))?;
        if owner != who.user_id {
            return Err(DemoApiError::Forbidden(
                "this session belongs to another customer".into(),
            ));
        }
        let ended = tx
            .execute(END_ASSIGNMENTS_SQL, &[&session])
            .await
            .map_err(db("end the assignments"))?;
        let closed = tx
            .execute(END_SESSION_SQL, &[&session])
            .await
            .map_err(db("end the session"))?;
        if ended == 0 && closed == 0 {
            return Err(DemoApiError::Conflict(
                "this session has already ended".into(),
            ));
        }
        tx.commit().await.map_err(db("commit"))
    })
    .await
}

/// An assignment as a mechanic's action sees it.
#[derive(Debug, Clone)]
struct Assignment {
    session: Uuid,
    status: String,
    mechanic: Option<Uuid>,
    workshop: Option<Uuid>,
}

/// What a mechanic wants to do with an assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Accept,
    Decline,
    Complete,
}

/// Whether `who` may do `action` to `a` now: the rules of topic `queue` (`README.md#protocol-v1`,
/// "Topics") for accept, the offer's mechanic for decline, the accepting mechanic for complete.
/// Refusals that depend only on who is asking (another workshop's request, another mechanic's
/// offer) are `403`; those that depend on the moment (already taken, no longer open) are `409`.
fn judge(action: Action, a: &Assignment, who: &Principal) -> Result<(), DemoApiError> {
    let me = who.user_id;
    let open = a.status == "queued" || a.status == "offered";
    // The workshop does not change when a request is taken: mechanics of other workshops never
    // had it in their queue, whatever its status now (unless it was offered to them directly).
    let other_workshop = a.workshop.is_some_and(|w| who.workshop_id != Some(w));
    if action == Action::Accept && other_workshop && a.mechanic != Some(me) {
        return Err(DemoApiError::Forbidden(
            "this request is for another workshop".into(),
        ));
    }
    match action {
        Action::Accept => {
            if !open {
                return Err(DemoApiError::Conflict(match a.status.as_str() {
                    "accepted" if a.mechanic == Some(me) => {
                        "you have already accepted this request".into()
                    }
                    "accepted" | "completed" => {
                        "another mechanic has already accepted this request".into()
                    }
                    other => format!("this request is no longer open (it is {other})"),
                }));
            }
            match a.mechanic {
                Some(m) if m != me => Err(DemoApiError::Forbidden(
                    "this request was offered to another mechanic".into(),
                )),
                None if a.status != "queued" => Err(DemoApiError::Forbidden(
                    "this request is not in your queue".into(),
                )),
                _ => Ok(()),
            }
        }
        Action::Decline => match a.mechanic {
            Some(m) if m != me => Err(DemoApiError::Forbidden(
                "this request was offered to another mechanic".into(),
            )),
            None => Err(DemoApiError::Conflict(
                "only a request offered to you can be declined; leave a queued one for others"
                    .into(),
            )),
            Some(_) if !open => Err(DemoApiError::Conflict(format!(
                "this offer is no longer open (it is {})",
                a.status
            ))),
            Some(_) => Ok(()),
        },
        Action::Complete => {
            if a.mechanic != Some(me) {
                return Err(DemoApiError::Forbidden(
                    "only the mechanic who accepted this request can complete it".into(),
                ));
            }
            if a.status != "accepted" {
                return Err(DemoApiError::Conflict(format!(
                    "only an accepted request can be completed (it is {})",
                    a.status
                )));
            }
            Ok(())
        }
    }
}

async fn accept(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, DemoApiError> {
    mechanic_action(api, id, headers, Action::Accept).await
}

async fn decline(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, DemoApiError> {
    mechanic_action(api, id, headers, Action::Decline).await
}

async fn complete(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, DemoApiError> {
    mechanic_action(api, id, headers, Action::Complete).await
}

/// Locks the assignment, judges the action, writes it: one transaction, so a second mechanic
/// acting at the same moment waits for the first and is then judged on what the first did.
async fn mechanic_action(
    api: Api,
    id: String,
    headers: HeaderMap,
    action: Action,
) -> Result<StatusCode, DemoApiError> {
    let who = api.user(&headers, Role::Mechanic)?;
    let id = parse_id(&id, "assignment")?;
    bounded(async {
        let mut client = api.client().await?;
        let tx = client.transaction().await.map_err(db("begin"))?;
        let row = tx
            .query_opt(LOCK_ASSIGNMENT_SQL, &[&id])
            .await
            .map_err(db("lock the assignment"))?
            .ok_or(DemoApiError::NotFound("no such assignment"))?;
        let read = db("read the assignment");
        let assignment = Assignment {
            session: row.try_get(0).map_err(&read)?,
            status: row.try_get(1).map_err(&read)?,
            mechanic: row.try_get(2).map_err(&read)?,
            workshop: row.try_get(3).map_err(&read)?,
        };
        judge(action, &assignment, &who)?;
        let keep: Option<Uuid> = None;
        match action {
            Action::Accept => {
                tx.execute(
                    SET_ASSIGNMENT_STATUS_SQL,
                    &[&id, &"accepted", &Some(who.user_id)],
                )
                .await
                .map_err(db("accept"))?;
            }
            Action::Decline => {
                tx.execute(SET_ASSIGNMENT_STATUS_SQL, &[&id, &"declined", &keep])
                    .await
                    .map_err(db("decline"))?;
                tx.execute(REQUEUE_SQL, &[&id])
                    .await
                    .map_err(db("queue the request again"))?;
            }
            Action::Complete => {
                // The accepted assignment completes; anything else of the session still
                // waiting is cancelled; the session ends.
                tx.execute(END_ASSIGNMENTS_SQL, &[&assignment.session])
                    .await
                    .map_err(db("complete"))?;
                tx.execute(END_SESSION_SQL, &[&assignment.session])
                    .await
                    .map_err(db("end the session"))?;
            }
        }
        tx.commit().await.map_err(db("commit"))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Uuid = Uuid::from_u128(1);
    const OTHER: Uuid = Uuid::from_u128(2);
    const MY_SHOP: Uuid = Uuid::from_u128(10);
    const THEIR_SHOP: Uuid = Uuid::from_u128(11);

    fn mechanic(workshop: Option<Uuid>) -> Principal {
        Principal {
            user_id: ME,
            role: Role::Mechanic,
            workshop_id: workshop,
        }
    }

    fn row(status: &str, mechanic: Option<Uuid>, workshop: Option<Uuid>) -> Assignment {
        Assignment {
            session: Uuid::from_u128(99),
            status: status.to_owned(),
            mechanic,
            workshop,
        }
    }

    fn code(r: Result<(), DemoApiError>) -> u16 {
        match r {
            Ok(()) => 204,
            Err(e) => e.status().0.as_u16(),
        }
    }

    #[test]
    fn accept_follows_the_queue_rules() {
        let me = mechanic(Some(MY_SHOP));
        let freelancer = mechanic(None);
        let accept = |a: &Assignment, who: &Principal| code(judge(Action::Accept, a, who));
        assert_eq!(accept(&row("queued", None, None), &me), 204, "general");
        assert_eq!(accept(&row("queued", None, None), &freelancer), 204);
        assert_eq!(accept(&row("queued", None, Some(MY_SHOP)), &me), 204);
        assert_eq!(accept(&row("queued", None, Some(THEIR_SHOP)), &me), 403);
        assert_eq!(
            accept(&row("queued", None, Some(MY_SHOP)), &freelancer),
            403
        );
        assert_eq!(accept(&row("offered", Some(ME), None), &me), 204);
        assert_eq!(
            accept(&row("offered", Some(ME), Some(THEIR_SHOP)), &me),
            204
        );
        assert_eq!(accept(&row("offered", Some(OTHER), None), &me), 403);
        assert_eq!(accept(&row("offered", None, None), &me), 403);
        // Taken or over: a conflict of the moment, not of who asks.
        assert_eq!(accept(&row("accepted", Some(OTHER), None), &me), 409);
        assert_eq!(accept(&row("accepted", Some(ME), None), &me), 409);
        assert_eq!(accept(&row("cancelled", None, None), &me), 409);
        assert_eq!(
            accept(&row("completed", Some(OTHER), Some(MY_SHOP)), &me),
            409
        );
        // Another workshop's request stays forbidden whatever became of it.
        assert_eq!(
            accept(&row("accepted", Some(OTHER), Some(THEIR_SHOP)), &me),
            403
        );
    }

    #[test]
    fn decline_is_for_offers_to_me_and_complete_for_what_i_accepted() {
        let me = mechanic(Some(MY_SHOP));
        let decline = |a: &Assignment| code(judge(Action::Decline, a, &me));
        assert_eq!(decline(&row("offered", Some(ME), None)), 204);
        assert_eq!(decline(&row("offered", Some(OTHER), None)), 403);
        assert_eq!(decline(&row("queued", None, None)), 409);
        assert_eq!(decline(&row("accepted", Some(ME), None)), 409);
        let complete = |a: &Assignment| code(judge(Action::Complete, a, &me));
        assert_eq!(complete(&row("accepted", Some(ME), None)), 204);
        assert_eq!(complete(&row("accepted", Some(OTHER), None)), 403);
        assert_eq!(complete(&row("queued", None, None)), 403);
        assert_eq!(complete(&row("completed", Some(ME), None)), 409);
        assert_eq!(complete(&row("offered", Some(ME), None)), 409);
    }

    #[test]
    fn new_requests_are_validated_with_clear_messages() {
        let ok = NewRequest::parse(
            br#"{"kind":"paid","vehicle":"  2014 VW Golf ","concern":"Brakes squeal."}"#,
        )
        .unwrap();
        assert_eq!(
            ok,
            NewRequest {
                kind: Kind::Paid,
                vehicle: "2014 VW Golf".into(),
                concern: "Brakes squeal.".into(),
            }
        );
        let refused = |body: &str| match NewRequest::parse(body.as_bytes()) {
            Err(DemoApiError::BadRequest(m)) => m,
            other => panic!("{body}: {other:?}"),
        };
        assert!(refused("not json").contains("must be JSON"));
        assert!(refused(r#"{"kind":"free","vehicle":"Car"}"#).contains("missing field `concern`"));
        assert!(refused(r#"{"kind":"gold","vehicle":"Car","concern":"x"}"#)
            .contains("kind must be \"free\" or \"paid\""));
        assert_eq!(
            refused(r#"{"kind":"free","vehicle":"   ","concern":"x"}"#),
            "vehicle is required"
        );
        let long = "x".repeat(MAX_CONCERN + 1);
        assert!(refused(&format!(
            r#"{{"kind":"free","vehicle":"Car","concern":"{long}"}}"#
        ))
        .contains("concern is too long"));
        assert!(
            refused(r#"{"kind":"free","vehicle":"Car","concern":"x","mechanic_id":"1"}"#)
                .contains("unknown field `mechanic_id`")
        );
    }

    #[test]
    fn errors_answer_a_code_and_a_message() {
        let e = DemoApiError::Conflict("taken".into());
        assert_eq!(e.status(), (StatusCode::CONFLICT, "conflict"));
        assert_eq!(e.to_string(), "taken");
        assert_eq!(
            DemoApiError::Unavailable.status().0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(matches!(
            parse_id("nope", "session"),
            Err(DemoApiError::BadRequest(m)) if m == "`nope` is not a valid session id (expected a UUID)"
        ));
    }
}
