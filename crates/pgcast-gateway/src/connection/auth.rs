//! The connection's identity: the first `auth` frame (within the auth deadline), refreshes
//! by later `auth` frames, and the token's expiry.

use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::ws::Message;
use pgcast_events::{Access, ClientMessage, ErrorCode, Role, ServerMessage, Topic};

use super::{
    close, next_frame, read_error, unix_micros, Connection, End, SocketSink, SocketStream,
};
use crate::Verified;

impl<Si: SocketSink, St: SocketStream> Connection<Si, St> {
    pub(super) fn ready(&self) -> ServerMessage {
        let (user_id, role) = self
            .principal
            .map_or((uuid::Uuid::nil(), Role::Customer), |p| (p.user_id, p.role));
        ServerMessage::Ready {
            user_id,
            role,
            expires_at: self.exp(),
        }
    }

    /// `exp` of the current token (unix seconds).
    pub(super) fn exp(&self) -> u64 {
        self.expires_at.load(Ordering::Relaxed)
    }

    /// Commit times after this (unix microseconds) are past the token's `exp`.
    pub(super) fn expires_micros(&self) -> i64 {
        unix_micros(self.exp())
    }

    /// Has the token's `exp` passed (by this machine's clock)?
    pub(super) fn past_expiry(&self) -> bool {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            >= self.exp()
    }

    /// Waits for the `auth` frame; anything else first is refused with 1008.
    pub(super) async fn authenticate(&mut self) -> Result<Verified, End> {
        let deadline = tokio::time::Instant::now() + self.shared.config.auth_timeout;
        loop {
            let msg = tokio::select! {
                () = self.shutdown.cancelled() => return Err(End::Close(close::GOING_AWAY, "server shutting down")),
                r = tokio::time::timeout_at(deadline, next_frame(&mut self.stream, &mut self.deferred)) => match r {
                    Ok(msg) => msg,
                    Err(_) => return Err(self.refuse("no auth frame in time").await),
                },
            };
            if matches!(msg, Some(Ok(_))) {
                self.admission.frame_received();
            }
            let text = match msg {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Binary(_))) => {
                    return Err(self
                        .refuse("the first frame must be a text auth frame")
                        .await)
                }
                Some(Ok(Message::Close(_))) | None => return Err(End::Gone),
                Some(Err(e)) => return Err(read_error(&e)),
            };
            let token = match ClientMessage::parse(&text) {
                Ok(ClientMessage::Auth { token }) => token,
                Ok(_) => return Err(self.refuse("the first frame must be auth").await),
                Err(_) => {
                    return Err(self
                        .refuse("the first frame must be a valid auth frame")
                        .await)
                }
            };
            let verified = self.verify(&token).await?;
            // The socket stops counting against the unauthenticated caps.
            self.admission.authenticated();
            return Ok(verified);
        }
    }

    /// Verifies a token from an `auth` frame; a bad one is refused with 1008.
    pub(super) async fn verify(&mut self, token: &str) -> Result<Verified, End> {
        if token.len() > self.shared.config.max_token_bytes {
            return Err(self.refuse("token too long").await);
        }
        match self.shared.verifier.verify_async(token).await {
            Ok(v) => Ok(v),
            Err(error) => {
                // The reason goes to the log (never the token itself); the client gets the code.
                tracing::info!(%error, "websocket authentication failed");
                Err(self.refuse("invalid token").await)
            }
        }
    }

    /// A second `auth` frame: the same user and role with a later (or earlier) `exp`, and
    /// possibly another workshop. Subscriptions the new claims no longer allow are revoked.
    pub(super) async fn refresh(&mut self, token: &str) -> Result<(), End> {
        let Some(current) = self.principal else {
            return Err(End::Gone);
        };
        let verified = match self.verify(token).await {
            Ok(v) => v,
            Err(end) => {
                self.shared.metrics.auth_failures.inc();
                return Err(end);
            }
        };
        let new = verified.principal;
        if new.user_id != current.user_id || new.role != current.role {
            tracing::info!("a refreshed token named another user or role");
            self.shared.metrics.auth_failures.inc();
            return Err(self
                .refuse("a refreshed token must name the same user and role")
                .await);
        }
        self.principal = Some(new);
        self.expires_at
            .store(verified.expires_at, Ordering::Relaxed);
        self.send(self.ready()).await?;
        let mut revoked = Vec::new();
        self.subs.retain(|s| {
            let keep = match s.sub.topic {
                // The queue's workshop part comes from the claims it was filed under.
                Topic::Queue => new.workshop_id == current.workshop_id,
                topic => topic.authorize(&new) != Access::Forbidden,
            };
            if !keep {
                revoked.push(s.sub.clone());
            }
            keep
        });
        for sub in revoked {
            self.shared.hub.unsubscribe(&sub);
            self.send(ServerMessage::Revoked {
                topic: sub.topic.to_string(),
                reason: "the refreshed token does not allow this topic".to_owned(),
            })
            .await?;
        }
        Ok(())
    }

    pub(super) async fn refuse(&mut self, message: &str) -> End {
        let reply = ServerMessage::Error {
            id: None,
            code: ErrorCode::Unauthorized,
            message: message.to_owned(),
        };
        match self.send(reply).await {
            Ok(()) => End::Close(close::POLICY, "unauthorized"),
            Err(end) => end,
        }
    }
}
