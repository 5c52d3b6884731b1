// Types of pgcast.js (protocol v1). Served at /client.d.ts.

/**
 * - `connecting`: first connection attempt;
 * - `live`: authenticated, subscriptions active;
 * - `reconnecting`: connection lost, retrying with exponential backoff and jitter (each topic
 *   resumes with `since`, so nothing is missed);
 * - `resyncing`: the server could not replay what was missed; a fresh snapshot is on its way;
 * - `closed`: `close()` was called, or a fixed token was refused.
 */
export type ConnectionState = "connecting" | "live" | "reconnecting" | "resyncing" | "closed";

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
    | "too_many_subscriptions" | "rate_limited" | "unavailable" | "token" | string;
  message: string;
  id?: string;
}

export interface ClientOptions {
  /** WebSocket URL of pgcast, e.g. "wss://host/ws". */
  url: string;
  /** A JWT, or a function returning a fresh one (called before every connection attempt). */
  token: string | (() => string | Promise<string>);
  /** Called on every change of `state`. */
  onState?: (state: ConnectionState) => void;
  /** Errors from the server, and `{ code: "token" }` when the token function throws. */
  onError?: (error: ServerError) => void;
  /** First reconnection delay ceiling; default 250. */
  initialBackoffMs?: number;
  /** Largest reconnection delay ceiling; default 10000. */
  maxBackoffMs?: number;
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
}

export interface Subscription {
  unsubscribe(): void;
  /** Position of the last snapshot or event received on this topic. */
  readonly position: number | null;
}

export class PgcastClient {
  /** Connects at once; reconnects by itself until `close()`. */
  constructor(options: ClientOptions);
  readonly state: ConnectionState;
  /**
   * Follows a topic ("queue", "session:<uuid>", "mechanic:<uuid>", "workshop:<uuid>",
   * "assignments"); may be called before the connection is up.
   */
  subscribe(topic: string, options?: SubscribeOptions): Subscription;
  /** Closes the connection for good. */
  close(): void;
}

/** Is `a` in the open queue of mechanic `me`? The server's rule (design §5). */
export function inQueue(a: Assignment, me: { id: string; workshopId: string | null }): boolean;
/** The claims of a JWT, not verified (the server verifies). */
export function tokenClaims(token: string): Record<string, unknown>;
