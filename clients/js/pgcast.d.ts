// Types of pgcast.js (protocol v1). Served at /client.d.ts; the `types` of the pgcast-client
// package.

/**
 * - `connecting`: first connection attempt;
 * - `live`: authenticated, subscriptions active (the token is refreshed in place, the state
 *   stays `live`);
 * - `reconnecting`: connection lost, retrying with exponential backoff and jitter (each topic
 *   resumes with `since`, so nothing is missed); an attempt that does not open within 15 s is
 *   given up and retried;
 * - `expired`: the token expired before it could be refreshed (`token_expired`, close 4001); the
 *   client is getting a fresh one from `token()` and reconnecting with `since`;
 * - `resyncing`: the server could not replay what was missed; a fresh snapshot is on its way;
 * - `closed`: `close()` was called, or a fixed token was refused or expired.
 */
export type ConnectionState =
  | "connecting" | "live" | "reconnecting" | "expired" | "resyncing" | "closed";

/**
 * Why the client asks `token()` for a token:
 * - `connect`: the first connection;
 * - `reconnect`: a new connection after a network loss, a restart or a slow-consumer close;
 * - `refresh`: the live connection's token expires soon (asked ahead of `expiresAt`);
 * - `expired`: the server closed the connection because its token expired (4001);
 * - `rejected`: the server refused the last token (1008) — do not hand out the same one again.
 */
export type TokenReason = "connect" | "reconnect" | "refresh" | "expired" | "rejected";

export type AssignmentStatus =
  | "queued" | "offered" | "accepted" | "declined" | "cancelled" | "expired" | "completed";

export interface Assignment {
  id: string;
  session_id: string;
  mechanic_id: string | null;
  workshop_id: string | null;
  status: AssignmentStatus;
  urgent: boolean;
  customer_name: string | null;
  vehicle_summary: string | null;
  concern: string | null;
  created_at: string | null;
  updated_at: string | null;
}

export interface AssignmentEvent {
  type: "event";
  topic: string;
  position: number;
  event: "assignment.created" | "assignment.updated" | "assignment.deleted";
  assignment: Assignment;
  old_status: AssignmentStatus | null;
}

export interface ServerError {
  code:
    | "bad_request" | "unauthorized" | "forbidden" | "unknown_topic"
    | "too_many_subscriptions" | "rate_limited" | "unavailable" | "snapshot_too_large" | "token_expired" | "token"
    | string;
  message: string;
  id?: string;
}

/**
 * What the client needs of a WebSocket: the browser's API (`WebSocket` of browsers, Deno, Bun,
 * Node.js 22+, or of the `ws` package). Events are typed loosely so that each of those fits.
 */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => void) | null;
  /** `event.data` is the text of the frame. */
  onmessage: ((event: any) => void) | null;
  /** `event.code` and `event.reason` are the close frame's. */
  onclose: ((event: any) => void) | null;
  /** A handshake that fails may report only this (Node.js 20's `WebSocket` never `close`s). */
  onerror: ((event: any) => void) | null;
}

export type WebSocketClass = new (url: string) => WebSocketLike;

export interface ClientOptions {
  /** WebSocket URL of pgcast, e.g. "wss://host/ws". */
  url: string;
  /**
   * Where tokens come from. Pass a function (the documented way): it is called before every
   * connection attempt and ahead of each token's expiry — at 80% of the remaining lifetime or
   * 60 s before `exp`, whichever is earlier (never before half of it, never in a tight loop) —
   * and the fresh token re-authenticates the live connection in place. A function that throws
   * is retried with backoff (and reported as `{ code: "token" }`); if the token expires
   * meanwhile, the server closes with 4001 and the client reconnects with the next token and
   * `since`. A fixed string still works but cannot be renewed: the client stops (`closed`) when
   * it expires or is refused.
   */
  token: ((ctx: { reason: TokenReason }) => string | Promise<string>) | string;
  /** Called on every change of `state`. */
  onState?: (state: ConnectionState) => void;
  /**
   * Errors from the server, `{ code: "token" }` when the token function throws or gives
   * nothing, `{ code: "token_expired" }` when a fixed token expired. A subscription refused
   * with `forbidden`, `unknown_topic` or `snapshot_too_large` is dropped (it would be refused
   * again; for the last, follow the topic with `snapshot: false`), except that a
   * `forbidden` for a topic the server had accepted before (on a resume) goes to `onRevoked`
   * instead. One the server could not answer (`unavailable`: a snapshot, replay or access check
   * that failed) is sent again after a jittered backoff from 0.5 s up to `maxBackoffMs`; after
   * other refusals (`too_many_subscriptions`) it stays inactive until the next reconnect.
   */
  onError?: (error: ServerError) => void;
  /**
   * The server revoked a subscription: the user lost the right to `topic` (say, a mechanic no
   * longer assigned to the session, or a refreshed token for another workshop). The
   * subscription is dropped and never sent again, not even after a reconnect; nothing more of
   * it arrives. Called after the subscription's own `onRevoked`.
   */
  onRevoked?: (topic: string, reason: string) => void;
  /**
   * First reconnection delay ceiling; default 250. It doubles with every failed attempt and
   * starts over once a connection has stayed up for 10 s.
   */
  initialBackoffMs?: number;
  /** Largest reconnection (and refresh retry) delay ceiling; default 10000. */
  maxBackoffMs?: number;
  /**
   * The WebSocket class to connect with. Default: the runtime's global `WebSocket` (browsers,
   * Deno, Bun, Node.js 22 and later). Node.js 18 and 20 have none: pass one, e.g.
   * `import { WebSocket } from "ws"` (or start Node.js 20 with `--experimental-websocket`). The
   * constructor throws a `TypeError` when there is neither.
   */
  WebSocket?: WebSocketClass;
}

export interface SubscribeOptions {
  /** Ask for the current state first (default true). */
  snapshot?: boolean;
  /** Resume after this position instead of taking a snapshot. */
  since?: number;
  /** The full current state: after subscribing, and again after a resync. */
  onSnapshot?: (assignments: Assignment[], position: number) => void;
  /** Every later event exactly once, in position order (duplicates are dropped). */
  onEvent?: (event: AssignmentEvent) => void;
  /**
   * The server revoked this subscription (the event that ended the right, if any, came just
   * before). It is dropped for good; subscribing again is up to the app.
   */
  onRevoked?: (topic: string, reason: string) => void;
}

export interface Subscription {
  unsubscribe(): void;
  /**
   * Position of the last snapshot or event received on this topic (or where it was subscribed:
   * `since`, or the server's `subscribed` position without a snapshot).
   */
  readonly position: number | null;
  /** Why the server revoked it, once it did; `null` while it is active. */
  readonly revoked: string | null;
}

export class PgcastClient {
  /**
   * Connects at once; reconnects by itself until `close()`. Throws a `TypeError` when the
   * runtime has no `WebSocket` and `options.WebSocket` gives none.
   */
  constructor(options: ClientOptions);
  readonly state: ConnectionState;
  /** `exp` (unix seconds) of the live connection's token, from `ready`; `null` when not live. */
  readonly expiresAt: number | null;
  /**
   * Follows a topic ("queue", "session:<uuid>", "mechanic:<uuid>", "workshop:<uuid>",
   * "customer:<uuid>", "assignments"); may be called before the connection is up.
   */
  subscribe(topic: string, options?: SubscribeOptions): Subscription;
  /**
   * Asks `token()` for a fresh token now: a live connection re-authenticates in place
   * (subscriptions stay), a client waiting to reconnect tries at once. For when the app knows
   * the token changed (the user signed in again, a new link was opened).
   */
  refresh(): void;
  /** Closes the connection for good. */
  close(): void;
}

/** Is `a` in the open queue of mechanic `me`? The server's rule (docs/architecture.md §5). */
export function inQueue(a: Assignment, me: { id: string; workshopId: string | null }): boolean;
/** The claims of a JWT, not verified (the server verifies). */
export function tokenClaims(token: string): Record<string, unknown>;
/**
 * For pages opened from a link with the token in the fragment (`/page#token=…`, never sent to
 * a server): removes it from the address bar (`history.replaceState`), keeps it in this tab's
 * `sessionStorage` under `key` (default: one per page path) so a reload still works, and returns
 * the newest token this tab was given, or null. A `token` in the query string is removed too,
 * never used.
 */
export function linkToken(key?: string): string | null;
