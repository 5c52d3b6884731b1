// pgcast.js — client for pgcast's WebSocket protocol v1, for browsers and Node.js. No
// dependencies, no build step. `pgcast serve` serves this very file at /client.js; it is also
// the package in clients/js/ (`npm install <repo>/clients/js`, then `from "pgcast-client"`).
//
//   import { PgcastClient } from "/client.js";
//   const client = new PgcastClient({
//     url: "wss://host/ws",
//     // Your app mints pgcast tokens (say, an endpoint behind its own login); pgcast asks again
//     // before every connection and ahead of each token's expiry.
//     token: async () => (await fetch("/api/pgcast-token", { method: "POST" })).text(),
//     onRevoked(topic, reason) { /* the user lost the right to `topic` */ },
//   });
//   client.subscribe("queue", { snapshot: true, onSnapshot, onEvent });
//
// What it does for you: authenticates, subscribes, keeps the last position of every topic,
// reconnects with exponential backoff and jitter, resumes each topic with `since` so nothing is
// missed, drops duplicates by position, answers `resync` by taking a fresh snapshot, refreshes
// the token on the live connection ahead of its expiry, reconnects with a fresh token when the
// server closes an expired connection (4001), and drops a topic the server revoked.

/**
 * @typedef {"connecting"|"live"|"reconnecting"|"expired"|"resyncing"|"closed"} ConnectionState
 * @typedef {"connect"|"reconnect"|"refresh"|"expired"|"rejected"} TokenReason
 */

/** Authentication refused (bad token, or a refresh that named another user or role). */
const CLOSE_AUTH = 1008;
/** The token expired without a refresh: get a fresh one and reconnect with `since`. */
const CLOSE_TOKEN_EXPIRED = 4001;
/** The client pings the server this often… */
const PING_EVERY_MS = 25000;
/** …and closes the socket (4000, then reconnects with `since`) when no frame at all follows a
 * ping within this time. */
const PONG_WITHIN_MS = 10000;
/** A token is refreshed when this share of its remaining lifetime has passed… */
const REFRESH_AT_SHARE = 0.8;
/** …or this long before it expires, whichever comes first… */
const REFRESH_LEAD_MS = 60000;
/** …but never before half of the remaining lifetime, nor sooner than this after the last one,
 * so that short-lived tokens cannot make the client refresh in a tight loop. */
const MIN_REFRESH_GAP_MS = 1000;
/** First retry of a failed refresh; doubles up to `maxBackoffMs`. */
const REFRESH_RETRY_MS = 1000;
/** A refresh the server has not answered in this time is retried. */
const REFRESH_REPLY_MS = 10000;
/** After a 4001 the client reconnects at once, but not more often than this. */
const EXPIRED_RETRY_GAP_MS = 10000;
/** setTimeout's limit is 2^31-1 ms; longer waits are taken in steps. */
const MAX_TIMER_MS = 24 * 3600 * 1000;
/** Subscription errors after which sending the same request again cannot succeed. */
const FINAL_SUBSCRIBE_ERRORS = new Set(["forbidden", "unknown_topic", "snapshot_too_large"]);
/** A subscribe the server could not answer this time (`unavailable`: a snapshot, replay or
 * access check that failed or timed out) is sent again after a jittered backoff, starting here
 * and doubling up to `maxBackoffMs`. */
const SUBSCRIBE_RETRY_MS = 500;
/** The reconnect backoff starts over only once a connection has stayed up this long: a server
 * that accepts and then closes at once (a slow consumer's 4008 on every resume, say) is not
 * reconnected to four times a second. */
const STABLE_AFTER_MS = 10000;
/** `WebSocket.OPEN`: the same in every implementation, and no global to read it from in some. */
const OPEN = 1;
/**
 * A connection attempt that has not opened in this time is given up and retried. Some WebSocket
 * implementations never report a handshake that fails (Node.js 20's fires `error` at most, never
 * `close`), and a proxy can hold one forever. Longer than a restarted server holds new
 * connections while it catches up (up to 10 s). Once open, the server's own deadline for `auth`
 * and its heartbeat take over.
 */
const OPEN_WITHIN_MS = 15000;

export class PgcastClient {
  /**
   * @param {object} options
   * @param {string} options.url WebSocket URL of pgcast, e.g. "wss://host/ws".
   * @param {((ctx: {reason: TokenReason}) => string|Promise<string>)|string} options.token A
   *   function returning a JWT (the documented way: called before every connection and ahead of
   *   the token's expiry), or a fixed JWT (no refresh: the client stops when it expires).
   * @param {(state: ConnectionState) => void} [options.onState]
   * @param {(error: {code: string, message: string, id?: string}) => void} [options.onError]
   * @param {(topic: string, reason: string) => void} [options.onRevoked]
   * @param {number} [options.initialBackoffMs] default 250
   * @param {number} [options.maxBackoffMs] default 10000
   * @param {new (url: string) => WebSocket} [options.WebSocket] the WebSocket class to connect
   *   with, for runtimes without a global one (Node.js before 22: e.g. `WebSocket` of the `ws`
   *   package); default `globalThis.WebSocket`.
   */
  constructor(options) {
    /** Where sockets come from: the option, or the runtime's own. */
    this.webSocketClass = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.webSocketClass !== "function") {
      throw new TypeError(
        "pgcast: this runtime has no WebSocket; pass one as the `WebSocket` option " +
          "(e.g. `WebSocket` from the ws package on Node.js before 22)",
      );
    }
    this.url = options.url;
    this.tokenSource = options.token;
    this.onState = options.onState || (() => {});
    this.onError = options.onError || (() => {});
    this.onRevoked = options.onRevoked || (() => {});
    this.initialBackoffMs = options.initialBackoffMs ?? 250;
    this.maxBackoffMs = options.maxBackoffMs ?? 10000;
    /** @type {ConnectionState} */
    this.state = "connecting";
    /** `exp` (unix seconds) of the token of the live connection, from `ready`. */
    this.expiresAt = null;
    /** @type {Map<string, object>} */
    this.subs = new Map();
    this.ws = null;
    /** The current socket has been accepted ("ready"): subscriptions can be sent. */
    this.authenticated = false;
    /** The token the current socket is authenticated with, and one sent to replace it. */
    this.liveToken = null;
    this.pendingToken = null;
    this.attempt = 0;
    this.retryTimer = null;
    /** Why the next connection attempt happens (passed to `token()`). @type {TokenReason} */
    this.retryReason = "reconnect";
    this.refreshTimer = null;
    this.refreshReply = null;
    this.refreshAttempt = 0;
    /** Refreshes in a row that were due at once (see `#planRefresh`). */
    this.hurried = 0;
    this.lastExpiredAt = -Infinity;
    this.stopped = false;
    this.timers = new Set();
    this.pingSeq = 0;
    // Back online after a network loss: try now instead of waiting out the backoff.
    this.onOnline = () => {
      if (this.retryTimer !== null) this.#retryNow();
    };
    if (typeof globalThis.addEventListener === "function") globalThis.addEventListener("online", this.onOnline);
    this.#connect("connect");
  }

  /**
   * Follows a topic. `onSnapshot` receives the full current state (after connecting, and again
   * after a resync); `onEvent` receives every later event exactly once, in order. If the server
   * revokes the topic, `onRevoked` is called and the topic is never subscribed again by itself.
   * @param {string} topic e.g. "queue", "session:<uuid>"
   * @param {object} [handlers]
   * @param {boolean} [handlers.snapshot] ask for the current state first (default true)
   * @param {number} [handlers.since] resume after this position instead
   * @param {(assignments: object[], position: number) => void} [handlers.onSnapshot]
   * @param {(event: object) => void} [handlers.onEvent]
   * @param {(topic: string, reason: string) => void} [handlers.onRevoked]
   * @returns {{ unsubscribe(): void, readonly position: number|null, readonly revoked: string|null }}
   */
  subscribe(topic, handlers = {}) {
    const sub = {
      topic,
      snapshot: handlers.snapshot ?? true,
      position: handlers.since ?? null,
      onSnapshot: handlers.onSnapshot || (() => {}),
      onEvent: handlers.onEvent || (() => {}),
      onRevoked: handlers.onRevoked || (() => {}),
      /** The server accepted it once: a later `forbidden` means the right was lost. */
      confirmed: false,
      /** Why the server revoked it, once it did. */
      revoked: null,
      /** Subscribes the server could not answer in a row, and the timer of the next try. */
      retries: 0,
      retryTimer: null,
    };
    this.subs.set(topic, sub);
    if (this.authenticated) this.#sendSubscribe(sub);
    const client = this;
    return {
      unsubscribe() {
        // Only this subscription: the topic may have been subscribed again since.
        if (client.subs.get(topic) !== sub) return;
        client.subs.delete(topic);
        client.#cancel(sub.retryTimer);
        client.#send({ type: "unsubscribe", id: `unsubscribe:${topic}`, topic });
      },
      get position() {
        return sub.position;
      },
      get revoked() {
        return sub.revoked;
      },
    };
  }

  /**
   * Gets a fresh token from `token()` now instead of waiting: a live connection re-authenticates
   * in place (subscriptions stay); a client waiting to reconnect tries at once. For when the app
   * knows its token changed (the user signed in again, a new link was opened).
   */
  refresh() {
    if (this.stopped) return;
    if (this.ws && this.authenticated) {
      this.refreshAttempt = 0;
      this.#refresh(this.ws);
    } else if (this.retryTimer !== null) {
      this.#retryNow();
    }
  }

  /** Closes the connection for good. */
  close() {
    this.stopped = true;
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    if (typeof globalThis.removeEventListener === "function") globalThis.removeEventListener("online", this.onOnline);
    if (this.ws) this.ws.close(1000, "client closed");
    this.#setState("closed");
  }

  #setState(state) {
    if (this.state !== state) {
      this.state = state;
      this.onState(state);
    }
  }

  #later(ms, fn) {
    if (this.stopped) return null; // closed: nothing more is scheduled (a late frame included)
    const t = setTimeout(() => {
      this.timers.delete(t);
      fn();
    }, ms);
    this.timers.add(t);
    return t;
  }

  #cancel(t) {
    if (t === null) return;
    clearTimeout(t);
    this.timers.delete(t);
  }

  #send(msg) {
    if (this.ws && this.ws.readyState === OPEN) this.ws.send(JSON.stringify(msg));
  }

  #sendSubscribe(sub) {
    const msg = { type: "subscribe", id: sub.topic, topic: sub.topic };
    if (sub.position !== null) msg.since = sub.position;
    else if (sub.snapshot) msg.snapshot = true;
    this.#send(msg);
  }

  /** A token from the app: the function's answer, or the fixed string. */
  async #fetchToken(reason) {
    if (typeof this.tokenSource !== "function") return this.tokenSource;
    const token = await this.tokenSource({ reason });
    if (typeof token !== "string" || token === "") throw new Error("token() gave no token");
    return token;
  }

  /** @param {TokenReason} reason */
  async #connect(reason) {
    if (this.stopped) return;
    let token;
    try {
      token = await this.#fetchToken(reason);
    } catch (e) {
      this.onError({ code: "token", message: e instanceof Error ? e.message : String(e) });
      this.#scheduleReconnect(reason);
      return;
    }
    if (this.stopped) return; // closed while the token was being fetched
    const ws = new this.webSocketClass(this.url);
    this.ws = ws;
    let pingTimer = null;
    let pongDeadline = null;
    /** Starts the backoff over once this socket has been live for a while. */
    let stableTimer = null;
    /** This socket heard `ready` (later ones answer refreshes). */
    let ready = false;
    /** The server said `token_expired`: whatever close follows, a fresh token is needed. */
    let expired = false;
    const keepAlive = () => {
      pingTimer = this.#later(PING_EVERY_MS, () => {
        const id = `ka${++this.pingSeq}`;
        this.#send({ type: "ping", id });
        // A half-open socket may take its implementation's closing handshake (30–60 s) to
        // report `close`: the attempt ends now, and the next one starts.
        pongDeadline = this.#later(PONG_WITHIN_MS, () => abandon(false, "no pong"));
        keepAlive();
      });
    };
    /**
     * Ends this attempt as if the socket had closed without a close frame (1006); `close()`s it
     * (with 4000 and `why`, if given) unless it already failed (closing a failed one can make it
     * report errors again).
     */
    const abandon = (failed, why) => {
      if (!failed) {
        try {
          if (why) ws.close(4000, why);
          else ws.close();
        } catch {
          // An implementation that refuses close() while connecting.
        }
      }
      onClose({ code: 1006, reason: "" });
    };
    let openDeadline = this.#later(OPEN_WITHIN_MS, () => abandon(false));
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.#cancel(openDeadline);
      openDeadline = null;
      if (this.ws !== ws) {
        ws.close(1000, "given up"); // opened after all, too late
        return;
      }
      ws.send(JSON.stringify({ type: "auth", token }));
    };
    // Before `open`, an error is the end of the attempt: do not wait for a `close` that some
    // implementations never fire. After it, `close` follows.
    ws.onerror = () => {
      if (!opened && this.ws === ws) abandon(true);
    };
    ws.onmessage = (e) => {
      if (this.ws !== ws) return;
      // Any frame proves the connection alive, not only the pong: one queued behind a backlog
      // of events, or behind a long replay, may come late while the frames before it flow.
      if (pongDeadline) {
        this.#cancel(pongDeadline);
        pongDeadline = null;
      }
      let msg;
      try {
        msg = JSON.parse(e.data);
      } catch {
        return;
      }
      switch (msg.type) {
        case "ready":
          if (!ready) {
            ready = true;
            stableTimer = this.#later(STABLE_AFTER_MS, () => {
              this.attempt = 0;
            });
            this.authenticated = true;
            this.liveToken = token;
            this.#setState("live");
            for (const sub of this.subs.values()) {
              this.#cancel(sub.retryTimer); // sent now
              sub.retryTimer = null;
              this.#sendSubscribe(sub);
            }
            keepAlive();
          } else if (this.pendingToken !== null) {
            // The answer to a refresh: the connection now runs on the new token.
            this.liveToken = this.pendingToken;
            this.pendingToken = null;
            this.refreshAttempt = 0;
            this.#cancel(this.refreshReply);
            this.refreshReply = null;
          }
          this.expiresAt = typeof msg.expires_at === "number" ? msg.expires_at : claimedExpiry(this.liveToken);
          this.#planRefresh(ws);
          break;
        case "subscribed": {
          const sub = this.subs.get(msg.topic);
          if (!sub) break;
          sub.confirmed = true;
          sub.retries = 0;
          if (sub.position === null && !sub.snapshot) sub.position = msg.position;
          break;
        }
        case "snapshot": {
          const sub = this.subs.get(msg.topic);
          if (!sub) break;
          sub.position = msg.position;
          if (this.state === "resyncing") this.#setState("live");
          sub.onSnapshot(msg.assignments, msg.position);
          break;
        }
        case "event": {
          const sub = this.subs.get(msg.topic);
          if (!sub) break;
          if (sub.position !== null && msg.position <= sub.position) break; // duplicate
          sub.position = msg.position;
          sub.onEvent(msg);
          break;
        }
        case "resync": {
          const sub = this.subs.get(msg.topic);
          if (!sub) break;
          this.#setState("resyncing");
          sub.position = null;
          sub.snapshot = true;
          this.#sendSubscribe(sub);
          break;
        }
        case "revoked":
          this.#revoke(msg.topic, msg.reason || "revoked");
          break;
        case "pong":
          break; // its deadline ended with any frame, above
        case "error":
          if (msg.code === "token_expired") {
            // The close (4001) follows; the client reconnects with a fresh token.
            expired = true;
            if (typeof this.tokenSource === "function") this.#setState("expired");
            break;
          }
          this.#subscribeFailed(msg);
          break;
      }
    };
    const onClose = (e) => {
      this.#cancel(pingTimer);
      this.#cancel(pongDeadline);
      this.#cancel(openDeadline);
      this.#cancel(stableTimer);
      if (this.ws !== ws) return; // an older socket (or one given up); its successor is in charge
      this.ws = null;
      this.authenticated = false;
      this.liveToken = null;
      this.pendingToken = null;
      this.#cancel(this.refreshTimer);
      this.#cancel(this.refreshReply);
      this.refreshTimer = null;
      this.refreshReply = null;
      this.expiresAt = null;
      if (this.stopped) return;
      const fixed = typeof this.tokenSource !== "function";
      if (expired || e.code === CLOSE_TOKEN_EXPIRED) {
        if (fixed) {
          // A fixed token cannot be renewed: reconnecting would only be refused.
          this.onError({ code: "token_expired", message: "the token expired; pass a token() function to renew it" });
          this.#setState("closed");
          return;
        }
        this.#setState("expired");
        const now = Date.now();
        const immediate = now - this.lastExpiredAt >= EXPIRED_RETRY_GAP_MS;
        this.lastExpiredAt = now;
        if (immediate) {
          this.attempt = 1; // a failure from here on backs off
          this.#connect("expired");
        } else {
          this.#scheduleReconnect("expired");
        }
        return;
      }
      if (e.code === CLOSE_AUTH) {
        if (fixed) {
          // A fixed token that the server refused will be refused again.
          this.onError({ code: "unauthorized", message: e.reason || "token refused" });
          this.#setState("closed");
          return;
        }
        this.#scheduleReconnect("rejected");
        return;
      }
      this.#scheduleReconnect("reconnect");
    };
    ws.onclose = onClose;
  }

  /** Drops a topic the server no longer lets this user see, for good, and tells the app. */
  #revoke(topic, reason) {
    const sub = this.subs.get(topic);
    if (sub) {
      this.subs.delete(topic);
      this.#cancel(sub.retryTimer);
      sub.revoked = reason;
      sub.onRevoked(topic, reason);
    }
    this.onRevoked(topic, reason);
  }

  /** An `error` frame; a subscription the server will never accept is dropped. */
  #subscribeFailed(msg) {
    const sub = typeof msg.id === "string" ? this.subs.get(msg.id) : undefined;
    if (sub && FINAL_SUBSCRIBE_ERRORS.has(msg.code)) {
      if (sub.confirmed && msg.code === "forbidden") {
        // Accepted before, refused now (say, on a resume after a reconnect): the right was
        // lost while the `revoked` frame could not reach us.
        this.#revoke(sub.topic, msg.message || "forbidden");
        return;
      }
      this.subs.delete(sub.topic);
      this.#cancel(sub.retryTimer);
      // Dropped while it resynced (its snapshot is now too large): nothing more to wait for.
      if (this.state === "resyncing" && this.authenticated) this.#setState("live");
    } else if (sub && msg.code === "unavailable") {
      // Not subscribed this time (the server dropped the request): again, after a backoff.
      this.#retrySubscribe(sub);
    }
    this.onError(msg);
  }

  /** Sends `sub`'s subscribe again after a jittered backoff, if it is still wanted then. */
  #retrySubscribe(sub) {
    const ceiling = Math.min(this.maxBackoffMs, SUBSCRIBE_RETRY_MS * 2 ** sub.retries);
    sub.retries += 1;
    this.#cancel(sub.retryTimer);
    sub.retryTimer = this.#later(ceiling / 2 + Math.random() * (ceiling / 2), () => {
      sub.retryTimer = null;
      if (this.subs.get(sub.topic) === sub && this.authenticated) this.#sendSubscribe(sub);
    });
  }

  /** Schedules the next refresh of the live connection's token from `expiresAt`. */
  #planRefresh(ws) {
    this.#cancel(this.refreshTimer);
    this.refreshTimer = null;
    if (typeof this.tokenSource !== "function" || typeof this.expiresAt !== "number") return;
    let delay = refreshDelay(this.expiresAt * 1000 - Date.now());
    if (delay <= MIN_REFRESH_GAP_MS) {
      // Token after token arrives (nearly) expired by this machine's clock — a clock far ahead
      // of the server's, or tokens minted for seconds: refresh ever less often, not every second.
      delay = Math.min(this.maxBackoffMs, MIN_REFRESH_GAP_MS * 2 ** this.hurried);
      this.hurried += 1;
    } else {
      this.hurried = 0;
    }
    const due = Date.now() + delay;
    const wait = () => {
      const left = due - Date.now();
      if (left > 0) {
        this.refreshTimer = this.#later(Math.min(left, MAX_TIMER_MS), wait);
      } else {
        this.refreshTimer = null;
        this.#refresh(ws);
      }
    };
    wait();
  }

  /** Asks `token()` for a fresh token and sends it on the live connection. */
  async #refresh(ws) {
    if (ws !== this.ws || !this.authenticated || this.stopped || this.pendingToken !== null) return;
    this.#cancel(this.refreshTimer);
    this.refreshTimer = null;
    let token;
    try {
      token = await this.#fetchToken("refresh");
    } catch (e) {
      if (ws !== this.ws || !this.authenticated) return;
      this.onError({ code: "token", message: e instanceof Error ? e.message : String(e) });
      this.#retryRefresh(ws);
      return;
    }
    if (ws !== this.ws || !this.authenticated || this.stopped || this.pendingToken !== null) return;
    // The same token, or one that expires no later, renews nothing: ask again later.
    const exp = claimedExpiry(token);
    if (token === this.liveToken || (exp !== null && this.expiresAt !== null && exp <= this.expiresAt)) {
      this.#retryRefresh(ws);
      return;
    }
    this.pendingToken = token;
    this.#send({ type: "auth", token });
    // Answered by `ready` (or refused: `unauthorized` and close 1008).
    this.refreshReply = this.#later(REFRESH_REPLY_MS, () => {
      this.refreshReply = null;
      this.pendingToken = null;
      this.#retryRefresh(ws);
    });
  }

  /** A refresh failed: again with backoff. If the token runs out first, 4001 takes over. */
  #retryRefresh(ws) {
    const ceiling = Math.min(this.maxBackoffMs, REFRESH_RETRY_MS * 2 ** this.refreshAttempt);
    this.refreshAttempt += 1;
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this.#cancel(this.refreshTimer);
    this.refreshTimer = this.#later(delay, () => {
      this.refreshTimer = null;
      this.#refresh(ws);
    });
  }

  /** @param {TokenReason} reason */
  #scheduleReconnect(reason) {
    this.#setState(reason === "expired" ? "expired" : "reconnecting");
    const ceiling = Math.min(this.maxBackoffMs, this.initialBackoffMs * 2 ** this.attempt);
    this.attempt += 1;
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this.retryReason = reason;
    this.#cancel(this.retryTimer);
    this.retryTimer = this.#later(delay, () => {
      this.retryTimer = null;
      this.#connect(reason);
    });
  }

  #retryNow() {
    this.#cancel(this.retryTimer);
    this.retryTimer = null;
    this.#connect(this.retryReason);
  }
}

/**
 * When to refresh a token with `leftMs` to live: at 80% of it or 60 s before expiry, whichever
 * is earlier — but not before half of it, and not within a second, so that short-lived tokens
 * cannot cause a refresh storm.
 */
function refreshDelay(leftMs) {
  const wanted = Math.min(leftMs * REFRESH_AT_SHARE, leftMs - REFRESH_LEAD_MS);
  return Math.max(wanted, leftMs / 2, MIN_REFRESH_GAP_MS);
}

/** The `exp` claim of a token (unix seconds), or null. */
function claimedExpiry(token) {
  const exp = typeof token === "string" ? tokenClaims(token).exp : undefined;
  return typeof exp === "number" ? exp : null;
}

/**
 * Is `a` in the open queue of mechanic `me` ({ id, workshopId })? The same rule the server
 * applies (docs/architecture.md §5), used by pages to decide whether a card shows.
 */
export function inQueue(a, me) {
  if (a.mechanic_id) return a.mechanic_id === me.id && (a.status === "queued" || a.status === "offered");
  if (a.status !== "queued") return false;
  return a.workshop_id === null || a.workshop_id === me.workshopId;
}

/** Reads the claims of a JWT without verifying it (the server verifies). */
export function tokenClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
  } catch {
    return {};
  }
}

/**
 * For pages opened from a link that carries their token in the fragment (`/page#token=…`; a
 * fragment is never sent to a server, so it stays out of access logs and `Referer`): takes the
 * token out of the address bar with `history.replaceState` (so it is not in history, bookmarks
 * or a shared URL) and keeps it in this tab's `sessionStorage` under `key`, so that a reload
 * still works while other tabs and later visits do not get it. A `token` in the query string is
 * removed as well but never used: it has already been sent to the server and any proxy.
 * Returns the newest token this tab was given, or null.
 * @param {string} [key] storage key; default one per page path
 * @returns {string|null}
 */
export function linkToken(key = `pgcast.token:${location.pathname}`) {
  const hash = new URLSearchParams(location.hash.slice(1));
  const query = new URLSearchParams(location.search);
  const fresh = hash.get("token");
  if (fresh !== null || query.has("token")) {
    hash.delete("token");
    query.delete("token");
    const q = query.toString();
    const h = hash.toString();
    history.replaceState(history.state, "", `${location.pathname}${q ? `?${q}` : ""}${h ? `#${h}` : ""}`);
  }
  if (fresh) {
    linkTokens.set(key, fresh);
    try {
      sessionStorage.setItem(key, fresh);
    } catch {
      // Storage disabled: the token lives in memory; a reload then needs the link again.
    }
  }
  if (linkTokens.has(key)) return linkTokens.get(key);
  try {
    return sessionStorage.getItem(key);
  } catch {
    return null;
  }
}

/** Tokens taken by `linkToken`, by key: what it returns when storage is unavailable. */
const linkTokens = new Map();
