// Types of pgcast.js (protocol v1). Served at /client.d.ts.

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
  url: string;
  token: string | (() => string | Promise<string>);
  onState?: (state: ConnectionState) => void;
  onError?: (error: ServerError) => void;
  initialBackoffMs?: number;
  maxBackoffMs?: number;
}

export interface SubscribeOptions {
  snapshot?: boolean;
  since?: number;
  onSnapshot?: (assignments: Assignment[], position: number) => void;
  onEvent?: (event: AssignmentEvent) => void;
}

export interface Subscription {
  unsubscribe(): void;
  readonly position: number | null;
}

export class PgcastClient {
  constructor(options: ClientOptions);
  readonly state: ConnectionState;
  subscribe(topic: string, options?: SubscribeOptions): Subscription;
  close(): void;
}

export function inQueue(a: Assignment, me: { id: string; workshopId: string | null }): boolean;
export function tokenClaims(token: string): Record<string, unknown>;
