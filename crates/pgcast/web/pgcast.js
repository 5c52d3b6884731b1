// pgcast.js — browser client for pgcast's WebSocket protocol v1. No dependencies, no build step.
//
//   import { PgcastClient } from "/client.js";
//   const client = new PgcastClient({ url: "ws://127.0.0.1:8080/ws", token });
//   client.subscribe("queue", { snapshot: true, onSnapshot, onEvent });
//
// What it does for you: authenticates, subscribes, keeps the last position of every topic,
// reconnects with exponential backoff and jitter, resumes each topic with `since` so nothing is
// missed, drops duplicates by position, and answers `resync` by taking a fresh snapshot.

/** @typedef {"connecting"|"live"|"reconnecting"|"resyncing"|"closed"} ConnectionState */

const CLOSE_AUTH = 1008;
const PING_EVERY_MS = 25000;
const PONG_WITHIN_MS = 10000;

export class PgcastClient {
  /**
   * @param {object} options
   * @param {string} options.url WebSocket URL of pgcast, e.g. "wss://host/ws".
   * @param {string|(() => string|Promise<string>)} options.token JWT, or a function returning a
   *   fresh one (called before every connection attempt).
   * @param {(state: ConnectionState) => void} [options.onState]
   * @param {(error: {code: string, message: string, id?: string}) => void} [options.onError]
   * @param {number} [options.initialBackoffMs] default 250
   * @param {number} [options.maxBackoffMs] default 10000
   */
  constructor(options) {
    this.url = options.url;
    this.token = options.token;
    this.onState = options.onState || (() => {});
    this.onError = options.onError || (() => {});
    this.initialBackoffMs = options.initialBackoffMs ?? 250;
    this.maxBackoffMs = options.maxBackoffMs ?? 10000;
    /** @type {ConnectionState} */
    this.state = "connecting";
    /** @type {Map<string, Subscription>} */
    this.subs = new Map();
    this.ws = null;
    /** The current socket has been accepted ("ready"): subscriptions can be sent. */
    this.authenticated = false;
    this.attempt = 0;
    this.retryTimer = null;
    this.stopped = false;
    this.timers = new Set();
    this.pingSeq = 0;
    // Back online after a network loss: try now instead of waiting out the backoff.
    this.onOnline = () => {
      if (this.state === "reconnecting" && this.retryTimer !== null) {
        this.#cancel(this.retryTimer);
        this.retryTimer = null;
        this.#connect();
      }
    };
    if (typeof globalThis.addEventListener === "function") globalThis.addEventListener("online", this.onOnline);
    this.#connect();
  }

  /**
   * Follows a topic. `onSnapshot` receives the full current state (after connecting, and again
   * after a resync); `onEvent` receives every later event exactly once, in order.
   * @param {string} topic e.g. "queue", "session:<uuid>"
   * @param {object} [handlers]
   * @param {boolean} [handlers.snapshot] ask for the current state first (default true)
   * @param {number} [handlers.since] resume after this position instead
   * @param {(assignments: object[], position: number) => void} [handlers.onSnapshot]
   * @param {(event: object) => void} [handlers.onEvent]
   * @returns {{ unsubscribe(): void, readonly position: number|null }}
   */
  subscribe(topic, handlers = {}) {
    const sub = {
      topic,
      snapshot: handlers.snapshot ?? true,
      position: handlers.since ?? null,
      onSnapshot: handlers.onSnapshot || (() => {}),
      onEvent: handlers.onEvent || (() => {}),
    };
    this.subs.set(topic, sub);
    if (this.authenticated) this.#sendSubscribe(sub);
    const client = this;
    return {
      unsubscribe() {
        client.subs.delete(topic);
        client.#send({ type: "unsubscribe", id: topic, topic });
      },
      get position() {
        return sub.position;
      },
    };
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
    const t = setTimeout(() => {
      this.timers.delete(t);
      fn();
    }, ms);
    this.timers.add(t);
    return t;
  }

  #cancel(t) {
    clearTimeout(t);
    this.timers.delete(t);
  }

  #send(msg) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(msg));
  }

  #sendSubscribe(sub) {
    const msg = { type: "subscribe", id: sub.topic, topic: sub.topic };
    if (sub.position !== null) msg.since = sub.position;
    else if (sub.snapshot) msg.snapshot = true;
    this.#send(msg);
  }

  async #connect() {
    if (this.stopped) return;
    let token;
    try {
      token = typeof this.token === "function" ? await this.token() : this.token;
    } catch (e) {
      this.onError({ code: "token", message: String(e) });
      this.#scheduleReconnect();
      return;
    }
    if (this.stopped) return; // closed while the token was being fetched
    const ws = new WebSocket(this.url);
    this.ws = ws;
    let pingTimer = null;
    let pongDeadline = null;
    const keepAlive = () => {
      pingTimer = this.#later(PING_EVERY_MS, () => {
        const id = `ka${++this.pingSeq}`;
        this.#send({ type: "ping", id });
        pongDeadline = this.#later(PONG_WITHIN_MS, () => ws.close(4000, "no pong"));
        keepAlive();
      });
    };
    ws.onopen = () => ws.send(JSON.stringify({ type: "auth", token }));
    ws.onmessage = (e) => {
      let msg;
      try {
        msg = JSON.parse(e.data);
      } catch {
        return;
      }
      switch (msg.type) {
        case "ready":
          this.attempt = 0;
          this.authenticated = true;
          this.#setState("live");
          for (const sub of this.subs.values()) this.#sendSubscribe(sub);
          keepAlive();
          break;
        case "subscribed": {
          const sub = this.subs.get(msg.topic);
          if (sub && sub.position === null && !sub.snapshot) sub.position = msg.position;
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
        case "pong":
          if (pongDeadline) {
            this.#cancel(pongDeadline);
            pongDeadline = null;
          }
          break;
        case "error":
          this.onError(msg);
          break;
      }
    };
    ws.onclose = (e) => {
      if (pingTimer) this.#cancel(pingTimer);
      if (pongDeadline) this.#cancel(pongDeadline);
      if (this.ws !== ws) return; // an older socket; its successor is in charge
      this.ws = null;
      this.authenticated = false;
      if (this.stopped) return;
      if (e.code === CLOSE_AUTH && typeof this.token !== "function") {
        // A fixed token that the server refused will be refused again.
        this.onError({ code: "unauthorized", message: e.reason || "token refused" });
        this.#setState("closed");
        return;
      }
      this.#scheduleReconnect();
    };
  }

  #scheduleReconnect() {
    this.#setState("reconnecting");
    const ceiling = Math.min(this.maxBackoffMs, this.initialBackoffMs * 2 ** this.attempt);
    this.attempt += 1;
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this.retryTimer = this.#later(delay, () => {
      this.retryTimer = null;
      this.#connect();
    });
  }
}

/**
 * Is `a` in the open queue of mechanic `me` ({ id, workshopId })? The same rule the server
 * applies (design §5), used by pages to decide whether a card shows.
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
