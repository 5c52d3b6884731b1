// The client's own logic, against a scripted WebSocket (no server): what it sends, what it
// passes on, and how it reconnects. The same paths against a real server: server.test.js.

import assert from "node:assert/strict";
import { afterEach, test } from "node:test";

import { PgcastClient, tokenClaims } from "pgcast-client";

import { until } from "./support/harness.js";

/** A WebSocket class whose instances the test drives; `made` lists them in order. */
function scripted() {
  const made = [];
  class Scripted {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      made.push(this);
    }
    send(text) {
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) {
      this.closedWith = { code, reason };
    }
    // The server's side.
    open() {
      this.readyState = 1;
      this.onopen?.({ type: "open" });
    }
    deliver(msg) {
      this.onmessage?.({ type: "message", data: JSON.stringify(msg) });
    }
    drop(code = 1006, reason = "") {
      this.readyState = 3;
      this.onclose?.({ type: "close", code, reason });
    }
    /** A handshake that fails with `error` and never `close` (as Node.js 20's WebSocket). */
    fail() {
      this.readyState = 3;
      this.onerror?.({ type: "error" });
    }
  }
  return { Scripted, made };
}

let clients = [];
afterEach(() => {
  for (const c of clients) c.close();
  clients = [];
});

/** A client on a scripted socket; callbacks recorded in `seen`. */
function client(extra = {}) {
  const { Scripted, made } = scripted();
  const seen = { states: [], reasons: [], errors: [], snapshots: [], events: [] };
  const c = new PgcastClient({
    url: "ws://pgcast.test/ws",
    WebSocket: Scripted,
    initialBackoffMs: 1,
    maxBackoffMs: 2,
    token: ({ reason }) => {
      seen.reasons.push(reason);
      return `token-${seen.reasons.length}`;
    },
    onState: (s) => seen.states.push(s),
    onError: (e) => seen.errors.push(e),
    ...extra,
  });
  clients.push(c);
  const sub = c.subscribe("queue", {
    onSnapshot: (assignments, position) => seen.snapshots.push({ assignments, position }),
    onEvent: (e) => seen.events.push(e.position),
  });
  return { c, sub, made, seen };
}

const ready = { type: "ready", user_id: "u", role: "mechanic", expires_at: Math.floor(Date.now() / 1000) + 3600 };
const event = (position) => ({
  type: "event",
  topic: "queue",
  position,
  event: "assignment.updated",
  assignment: { id: "a" },
  old_status: "queued",
});

/** Opens socket `i` and answers its `auth` with `ready`. */
async function goLive({ c, made }, i) {
  await until(() => made.length > i, `socket ${i}`);
  made[i].open();
  assert.equal(made[i].sent[0].type, "auth");
  made[i].deliver(ready);
  assert.equal(c.state, "live");
}

test("without a WebSocket in the runtime or the options, the constructor says what to pass", (t) => {
  const own = Object.getOwnPropertyDescriptor(globalThis, "WebSocket");
  if (own && !own.configurable) {
    t.skip("this runtime's global WebSocket cannot be removed");
    return;
  }
  if (own) delete globalThis.WebSocket;
  try {
    assert.throws(() => new PgcastClient({ url: "ws://x/ws", token: "t" }), {
      name: "TypeError",
      message: /`WebSocket` option/,
    });
  } finally {
    if (own) Object.defineProperty(globalThis, "WebSocket", own);
  }
});

test("authenticates, subscribes with snapshot, drops duplicate and older events", async () => {
  const t = client();
  await until(() => t.made.length === 1, "a socket");
  t.made[0].open();
  assert.deepEqual(t.made[0].sent, [{ type: "auth", token: "token-1" }]);
  t.made[0].deliver(ready);
  assert.deepEqual(t.made[0].sent[1], { type: "subscribe", id: "queue", topic: "queue", snapshot: true });
  assert.equal(t.c.expiresAt, ready.expires_at);
  t.made[0].deliver({ type: "subscribed", id: "queue", topic: "queue", position: 5 });
  t.made[0].deliver({ type: "snapshot", topic: "queue", position: 5, assignments: [] });
  for (const p of [6, 6, 4, 7]) t.made[0].deliver(event(p));
  assert.deepEqual(t.seen.events, [6, 7]);
  assert.equal(t.sub.position, 7);
});

test("a slow-consumer close (4008) resumes with since, without a new snapshot", async () => {
  const t = client();
  await goLive(t, 0);
  t.made[0].deliver({ type: "snapshot", topic: "queue", position: 5, assignments: [] });
  t.made[0].deliver(event(9));
  t.made[0].drop(4008, "slow consumer");
  assert.equal(t.c.state, "reconnecting");
  await goLive(t, 1);
  assert.deepEqual(t.made[1].sent[1], { type: "subscribe", id: "queue", topic: "queue", since: 9 });
  assert.deepEqual(t.seen.reasons, ["connect", "reconnect"]);
});

test("resync: the topic is subscribed again with a snapshot", async () => {
  const t = client();
  await goLive(t, 0);
  t.made[0].deliver({ type: "snapshot", topic: "queue", position: 5, assignments: [] });
  t.made[0].deliver({ type: "resync", topic: "queue", reason: "since is older than the retained event log" });
  assert.equal(t.c.state, "resyncing");
  assert.deepEqual(t.made[0].sent.at(-1), { type: "subscribe", id: "queue", topic: "queue", snapshot: true });
  t.made[0].deliver({ type: "snapshot", topic: "queue", position: 12, assignments: [{ id: "a" }] });
  assert.equal(t.c.state, "live");
  assert.deepEqual(
    t.seen.snapshots.map((s) => s.position),
    [5, 12],
  );
});

test("a handshake that reports only `error` (no `close`) is retried", async () => {
  const t = client();
  await until(() => t.made.length === 1, "a socket");
  t.made[0].fail();
  assert.equal(t.c.state, "reconnecting");
  await goLive(t, 1);
  assert.deepEqual(t.seen.reasons, ["connect", "reconnect"]);
  // The given-up socket is not closed again (it failed), and a late event from it is ignored.
  assert.equal(t.made[0].closedWith, undefined);
  t.made[0].deliver(event(3));
  assert.deepEqual(t.seen.events, []);
});

test("token_expired and 4001: state expired, a token for reason expired, then since", async () => {
  const t = client();
  await goLive(t, 0);
  t.made[0].deliver({ type: "snapshot", topic: "queue", position: 5, assignments: [] });
  t.made[0].deliver({ type: "error", code: "token_expired", message: "token expired" });
  t.made[0].drop(4001, "token expired");
  assert.equal(t.c.state, "expired");
  await goLive(t, 1);
  assert.deepEqual(t.seen.reasons, ["connect", "expired"]);
  assert.deepEqual(t.made[1].sent[1], { type: "subscribe", id: "queue", topic: "queue", since: 5 });
});

test("tokenClaims reads a JWT's claims without verifying", () => {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const jwt = `${b64({ alg: "HS256" })}.${b64({ sub: "s", exp: 1700000000 })}.sig`;
  assert.deepEqual(tokenClaims(jwt), { sub: "s", exp: 1700000000 });
  assert.deepEqual(tokenClaims("not a token"), {});
});

/** Lets the client's promises run (timers are mocked) until `done()`. */
async function settle(done) {
  for (let i = 0; i < 100 && !done(); i++) await new Promise((resolve) => setImmediate(resolve));
  assert.ok(done(), "not reached");
}

/** With only setTimeout mocked, a client whose first socket is open and `ready`. */
async function liveWithMockedTimers(t, extra = {}) {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const c = client(extra);
  await settle(() => c.made.length === 1);
  const ws = c.made[0];
  ws.open();
  ws.deliver(ready);
  assert.equal(c.c.state, "live");
  return { c, ws };
}

test("a ping is answered by any frame within its deadline; silence closes the socket", async (t) => {
  const { c, ws } = await liveWithMockedTimers(t);
  const pings = () => ws.sent.filter((m) => m.type === "ping").length;
  t.mock.timers.tick(25000);
  assert.equal(pings(), 1);
  // An event comes before the pong (the pong waits behind a replay or a backlog): alive.
  ws.deliver(event(6));
  t.mock.timers.tick(10000);
  assert.equal(ws.closedWith, undefined, "closed although a frame came after the ping");
  // The next ping meets silence.
  t.mock.timers.tick(15000);
  assert.equal(pings(), 2);
  t.mock.timers.tick(9999);
  assert.equal(ws.closedWith, undefined);
  t.mock.timers.tick(1);
  assert.deepEqual(ws.closedWith, { code: 4000, reason: "no pong" });
  // A half-open socket may take its closing handshake's timeout to report `close`: the next
  // attempt does not wait for it.
  assert.equal(c.c.state, "reconnecting");
  t.mock.timers.tick(2);
  await settle(() => c.made.length === 2);
  c.made[1].open();
  c.made[1].deliver(ready);
  assert.equal(c.c.state, "live");
  // The old socket's late `close` changes nothing.
  ws.drop(1006);
  assert.equal(c.c.state, "live");
});

test("a subscribe the server could not answer (unavailable) is sent again after a backoff", async (t) => {
  const { c, ws } = await liveWithMockedTimers(t, { maxBackoffMs: 10000 });
  const subscribes = () => ws.sent.filter((m) => m.type === "subscribe");
  assert.equal(subscribes().length, 1);
  ws.deliver({ type: "error", id: "queue", code: "unavailable", message: "snapshot failed; retry" });
  assert.equal(c.seen.errors.at(-1).code, "unavailable", "the app is told");
  t.mock.timers.tick(249);
  assert.equal(subscribes().length, 1, "not before the backoff");
  t.mock.timers.tick(251);
  assert.equal(subscribes().length, 2);
  assert.deepEqual(subscribes()[1], { type: "subscribe", id: "queue", topic: "queue", snapshot: true });
  // Again: the backoff doubles.
  ws.deliver({ type: "error", id: "queue", code: "unavailable", message: "snapshot failed; retry" });
  t.mock.timers.tick(499);
  assert.equal(subscribes().length, 2);
  t.mock.timers.tick(501);
  assert.equal(subscribes().length, 3);
  // A refusal is final: never sent again.
  ws.deliver({ type: "error", id: "queue", code: "forbidden", message: "no" });
  t.mock.timers.tick(60000);
  assert.equal(subscribes().length, 3);
  assert.equal(c.c.subs.size, 0);
});

test("a snapshot too large is not asked for again; nothing is scheduled after close()", async (t) => {
  const { c, ws } = await liveWithMockedTimers(t, { maxBackoffMs: 10000 });
  const subscribes = () => ws.sent.filter((m) => m.type === "subscribe").length;
  ws.deliver({ type: "error", id: "queue", code: "snapshot_too_large", message: "too many rows" });
  t.mock.timers.tick(60000);
  assert.equal(subscribes(), 1);
  assert.equal(c.c.subs.size, 0);
  assert.equal(c.seen.errors.at(-1).code, "snapshot_too_large");
  // After close(), a late `unavailable` schedules nothing (no timer keeps the process alive).
  const other = c.c.subscribe("assignments");
  ws.deliver({ type: "subscribed", id: "assignments", topic: "assignments", position: 1 });
  c.c.close();
  ws.deliver({ type: "error", id: "assignments", code: "unavailable", message: "retry" });
  assert.equal(c.c.timers.size, 0);
  other.unsubscribe();
});

test("a resync whose snapshot is too large drops the topic and leaves resyncing", async () => {
  const t = client();
  await goLive(t, 0);
  t.made[0].deliver({ type: "subscribed", id: "queue", topic: "queue", position: 5 });
  t.made[0].deliver({ type: "snapshot", topic: "queue", position: 5, assignments: [] });
  t.made[0].deliver({ type: "resync", topic: "queue", reason: "since is older than the log" });
  assert.equal(t.c.state, "resyncing");
  t.made[0].deliver({ type: "error", id: "queue", code: "snapshot_too_large", message: "too many rows" });
  assert.equal(t.c.state, "live");
  assert.equal(t.c.subs.size, 0);
  assert.equal(t.seen.errors.at(-1).code, "snapshot_too_large");
});

test("the reconnect backoff starts over only after a connection stayed up", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const c = client();
  const live = async (i) => {
    await settle(() => c.made.length > i);
    c.made[i].open();
    c.made[i].deliver(ready);
    assert.equal(c.c.state, "live");
  };
  await live(0);
  c.made[0].drop(4008, "slow consumer");
  assert.equal(c.c.attempt, 1);
  t.mock.timers.tick(2);
  await live(1);
  // Closed right after `ready`, as a slow consumer resuming a backlog can be: backs off more.
  c.made[1].drop(4008, "slow consumer");
  assert.equal(c.c.attempt, 2);
  t.mock.timers.tick(2);
  await live(2);
  t.mock.timers.tick(10000);
  c.made[2].drop(1006);
  assert.equal(c.c.attempt, 1, "up for 10 s: the backoff started over");
});
