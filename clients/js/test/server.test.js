// The client against a real `pgcast serve` (and a PostgreSQL of its own): connect and
// authenticate, snapshot then live events, resume with `since` after a server restart and after
// a cut connection (the missed events arrive once, in order), resync (a fresh snapshot), token
// refresh on the live connection, and the 4001 path when a token runs out.

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { PgcastClient } from "pgcast-client";

import {
  PACKAGE,
  Recorder,
  WebSocketImpl,
  mintToken,
  psql,
  startDatabase,
  startRelay,
  startServe,
  until,
  webSocketName,
} from "./support/harness.js";
import { MiniWebSocket } from "./support/websocket.js";

let db;
let serve;
let relay;

before(async () => {
  db = await startDatabase();
  serve = await startServe(db.url);
  relay = await startRelay();
  relay.setBackend(serve.addr);
});

after(async () => {
  try {
    await relay?.stop();
  } finally {
    try {
      await serve?.stop("SIGTERM");
    } finally {
      await db?.stop();
    }
  }
});

/** A new customer with an open session holding one queued assignment. */
async function newSession() {
  const customer = randomUUID();
  const session = randomUUID();
  const assignment = randomUUID();
  await psql(
    db,
    `INSERT INTO sessions (id, customer_id, kind) VALUES (:'session', :'customer', 'free');
     INSERT INTO session_assignments (id, session_id, status, customer_name, vehicle_summary, concern)
     VALUES (:'assignment', :'session', 'queued', 'JS Test', '2014 Honda Civic', 'start');`,
    { customer, session, assignment },
  );
  return { customer, session, assignment, topic: `session:${session}` };
}

/** Updates the assignment's `concern` to `text` (one event); returns that event's position. */
async function touch(assignment, text) {
  const rows = await psql(
    db,
    `UPDATE session_assignments SET concern = :'text', updated_at = now() WHERE id = :'assignment';
     SELECT max(position) FROM pgcast.assignment_events WHERE payload->'row'->>'id' = :'assignment';`,
    { assignment, text },
  );
  return Number(rows[0][0]);
}

/**
 * A client following `topic` (snapshot first) whose callbacks all go to a Recorder; `token`
 * gets `{reason}` (recorded as "token" entries). Short backoff: the tests wait on outages.
 */
function follow(topic, token, { subscribe = {}, ...options } = {}) {
  const rec = new Recorder();
  const client = new PgcastClient({
    url: relay.url,
    WebSocket: WebSocketImpl,
    initialBackoffMs: 50,
    maxBackoffMs: 500,
    token:
      typeof token === "function"
        ? (ctx) => {
            rec.push("token", ctx.reason);
            return token(ctx);
          }
        : token,
    onState: (s) => rec.push("state", s),
    onError: (e) => rec.push("error", e),
    onRevoked: (t, r) => rec.push("revoked", { topic: t, reason: r }),
    ...options,
  });
  const sub = client.subscribe(topic, {
    onSnapshot: (assignments, position) => rec.push("snapshot", { assignments, position }),
    onEvent: (event) => rec.push("event", event),
    ...subscribe,
  });
  return { client, sub, rec };
}

const positions = (rec) => rec.all("event").map((e) => e.position);

describe(`the client against pgcast serve (${webSocketName})`, () => {
  test("/client.js and /client.d.ts are this package's files", async () => {
    for (const [path, file] of [
      ["/client.js", "pgcast.js"],
      ["/client.d.ts", "pgcast.d.ts"],
    ]) {
      const res = await fetch(`http://${serve.addr}${path}`);
      assert.equal(res.status, 200, path);
      assert.ok(
        (await res.text()) === readFileSync(join(PACKAGE, file), "utf8"),
        `${path} is not clients/js/${file}: the binary embeds another version of it (rebuild: cargo build -p pgcast)`,
      );
    }
  });

  test("connects, authenticates, takes a snapshot, then gets live events", async () => {
    const s = await newSession();
    const { client, sub, rec } = follow(s.topic, () => mintToken({ sub: s.customer, role: "customer" }));
    try {
      await rec.next("state", (v) => v === "live");
      assert.ok(client.expiresAt > Date.now() / 1000, "expiresAt comes from ready");
      const snap = await rec.next("snapshot");
      assert.deepEqual(
        snap.assignments.map((a) => [a.id, a.session_id, a.status, a.concern]),
        [[s.assignment, s.session, "queued", "start"]],
      );
      const p1 = await touch(s.assignment, "live");
      assert.ok(p1 > snap.position, "the change is after the snapshot");
      const event = await rec.next("event", (e) => e.position === p1);
      assert.equal(event.topic, s.topic);
      assert.equal(event.event, "assignment.updated");
      assert.equal(event.old_status, "queued");
      assert.equal(event.assignment.id, s.assignment);
      assert.equal(event.assignment.concern, "live");
      assert.deepEqual(positions(rec), [p1]);
      assert.equal(sub.position, p1);
      assert.deepEqual(rec.all("token"), ["connect"]);
      assert.deepEqual(rec.all("error"), []);
    } finally {
      client.close();
    }
    assert.equal(client.state, "closed");
  });

  /**
   * Follows a session, takes it down with `interrupt`, writes two changes while the client is
   * away, brings it back with `restore`: every change arrives once, in order, without a new
   * snapshot.
   */
  async function resumes(interrupt, restore) {
    const s = await newSession();
    const { client, rec } = follow(s.topic, () => mintToken({ sub: s.customer, role: "customer" }));
    try {
      await rec.next("snapshot");
      const p1 = await touch(s.assignment, "1");
      await rec.next("event", (e) => e.position === p1);

      const away = rec.mark();
      await interrupt();
      await rec.next("state", (v) => v === "reconnecting", "reconnecting", away);
      // Written while no connection can reach the server: only a resume brings them.
      const p2 = await touch(s.assignment, "2");
      const p3 = await touch(s.assignment, "3");
      await restore();
      await rec.next("state", (v) => v === "live", "live again", away);
      const p4 = await touch(s.assignment, "4");
      await rec.next("event", (e) => e.position === p4);

      assert.deepEqual(positions(rec), [p1, p2, p3, p4]);
      assert.deepEqual(
        rec.all("event").map((e) => e.assignment.concern),
        ["1", "2", "3", "4"],
      );
      assert.equal(rec.all("snapshot").length, 1, "resumed with since, no new snapshot");
      const reasons = rec.all("token");
      assert.equal(reasons[0], "connect");
      assert.ok(reasons.length > 1 && reasons.slice(1).every((r) => r === "reconnect"), reasons.join());
    } finally {
      client.close();
    }
  }

  test("a cut connection resumes with since: what it missed arrives once, in order", async () => {
    await resumes(
      async () => {
        relay.setBackend(null);
        relay.cut();
      },
      async () => relay.setBackend(serve.addr),
    );
  });

  test("after the server is killed and restarted, the client resumes with since from the log", async () => {
    await resumes(
      async () => {
        relay.setBackend(null);
        await serve.stop("SIGKILL");
      },
      async () => {
        serve = await startServe(db.url);
        relay.setBackend(serve.addr);
      },
    );
  });

  test("resync: a since older than the retained log brings a fresh snapshot", async () => {
    const s = await newSession();
    const { client, rec } = follow(s.topic, () => mintToken({ sub: s.customer, role: "customer" }));
    try {
      await rec.next("snapshot");
      const p1 = await touch(s.assignment, "before");
      await rec.next("event", (e) => e.position === p1);

      const away = rec.mark();
      relay.setBackend(null);
      await serve.stop("SIGKILL");
      await rec.next("state", (v) => v === "reconnecting", "reconnecting", away);
      const p2 = await touch(s.assignment, "pruned");
      // Retention runs while the client is away and takes everything up to p2.
      await psql(db, "SELECT pgcast.prune_events(interval '0', 1000000);");
      const [[prunedThrough]] = await psql(db, "SELECT pruned_through FROM pgcast.log_state;");
      assert.ok(Number(prunedThrough) >= p2, `log pruned through ${prunedThrough}, past ${p2}`);
      serve = await startServe(db.url);
      relay.setBackend(serve.addr);

      await rec.next("state", (v) => v === "resyncing", "resyncing", away);
      const snap = await rec.next("snapshot", () => true, "a second snapshot", away);
      assert.deepEqual(
        snap.assignments.map((a) => [a.id, a.concern]),
        [[s.assignment, "pruned"]],
      );
      assert.ok(snap.position >= p2);
      await until(() => client.state === "live", "live after the snapshot");
      const p3 = await touch(s.assignment, "after");
      await rec.next("event", (e) => e.position === p3);
      // p2 came as part of the snapshot, not as an event.
      assert.deepEqual(positions(rec), [p1, p3]);
    } finally {
      client.close();
    }
  });

  test("resync: a since the log has not reached brings a snapshot", async () => {
    const s = await newSession();
    const { client, rec } = follow(s.topic, () => mintToken({ sub: s.customer, role: "customer" }), {
      subscribe: { since: 2 ** 50 },
    });
    try {
      await rec.next("state", (v) => v === "resyncing");
      const snap = await rec.next("snapshot");
      assert.deepEqual(
        snap.assignments.map((a) => a.id),
        [s.assignment],
      );
      await until(() => client.state === "live", "live after the snapshot");
      const p1 = await touch(s.assignment, "next");
      await rec.next("event", (e) => e.position === p1);
      assert.deepEqual(positions(rec), [p1]);
    } finally {
      client.close();
    }
  });

  // These wait for tokens to run out (plus the server's leeway of a few seconds): side by side.
  describe("tokens", { concurrency: true }, () => {
    test("refreshes a short-lived token on the live connection, which outlives the first token", async () => {
      const s = await newSession();
      const { client, rec } = follow(s.topic, () => mintToken({ sub: s.customer, role: "customer", ttl: "4s" }));
      try {
        await rec.next("snapshot");
        const first = client.expiresAt;
        await rec.next("token", (r) => r === "refresh");
        await until(() => client.expiresAt > first, "ready with the refreshed token's exp");
        // Waiting for a deadline, not for a race: the first token is past its exp (the server
        // would have closed with 4001 by now without the refresh).
        await until(() => Date.now() > (first + 1) * 1000, "the first token expired");
        const p1 = await touch(s.assignment, "after the first exp");
        await rec.next("event", (e) => e.position === p1);
        assert.deepEqual(rec.all("state"), ["live"], "one connection, never down");
        const reasons = rec.all("token");
        assert.equal(reasons[0], "connect");
        assert.ok(reasons.slice(1).every((r) => r === "refresh"), reasons.join());
        assert.deepEqual(rec.all("error"), []);
      } finally {
        client.close();
      }
  });

  test("a token that runs out (4001): a fresh one, and the missed events by since", async () => {
    const s = await newSession();
    let release;
    const released = new Promise((resolve) => {
      release = resolve;
    });
    const { client, rec } = follow(s.topic, async ({ reason }) => {
      if (reason === "connect") return mintToken({ sub: s.customer, role: "customer", ttl: "2s" });
      if (reason === "refresh") throw new Error("the token service is down");
      // "expired": the test writes a change before the client may reconnect.
      await released;
      return mintToken({ sub: s.customer, role: "customer" });
    });
    try {
      const snap = await rec.next("snapshot");
      await rec.next("state", (v) => v === "expired");
      const p1 = await touch(s.assignment, "while expired");
      release();
      await rec.next("event", (e) => e.position === p1);
      await until(() => client.state === "live", "live again");
      const p2 = await touch(s.assignment, "live again");
      await rec.next("event", (e) => e.position === p2);

      assert.ok(p1 > snap.position);
      assert.deepEqual(positions(rec), [p1, p2]);
      assert.equal(rec.all("snapshot").length, 1, "resumed with since");
      assert.ok(rec.all("token").includes("expired"), rec.all("token").join());
      assert.ok(rec.all("error").some((e) => e.code === "token"), "the failed refresh is reported");
    } finally {
      client.close();
    }
  });

  test("a fixed token that expires stops the client with token_expired", async () => {
    const s = await newSession();
    const token = await mintToken({ sub: s.customer, role: "customer", ttl: "2s" });
    const { client, rec } = follow(s.topic, token);
    try {
      await rec.next("snapshot");
      const error = await rec.next("error", (e) => e.code === "token_expired");
      assert.match(error.message, /token\(\) function/);
      await rec.next("state", (v) => v === "closed");
    } finally {
      client.close();
    }
  });

  });

  test("the WebSocket option: the client connects with the class it is given", async () => {
    const s = await newSession();
    let made = 0;
    class Counted extends MiniWebSocket {
      constructor(url) {
        super(url);
        made += 1;
      }
    }
    const { client, rec } = follow(s.topic, () => mintToken({ sub: s.customer, role: "customer" }), {
      WebSocket: Counted,
    });
    try {
      await rec.next("snapshot");
      const p1 = await touch(s.assignment, "through the given class");
      await rec.next("event", (e) => e.position === p1);
      assert.equal(made, 1);
    } finally {
      client.close();
    }
  });
});
