// Real processes for the tests: a PostgreSQL (the one `pgcast demo` starts from the machine's
// binaries), a `pgcast serve` against it, a TCP relay in front of the server (so the client's
// URL survives a server restart and the test can cut connections), rows written with psql, and
// tokens minted with `pgcast token`. Everything listens on 127.0.0.1 and is stopped by the
// test's `after` hook; children get SIGTERM if the test process exits first.

import { execFile, spawn } from "node:child_process";
import { chmodSync, existsSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { createServer, connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

import { MiniWebSocket } from "./websocket.js";

/** The repository's root (clients/js/test/support/ is four levels down). */
export const REPO = fileURLToPath(new URL("../../../../", import.meta.url));
/** The package directory, clients/js/. */
export const PACKAGE = fileURLToPath(new URL("../../", import.meta.url));
/** The secret of every `serve` and token here. */
export const SECRET = "js-client-test-secret-of-at-least-32-bytes";
/** Bound for one awaited condition; never reached when things work. */
export const WAIT_MS = 20_000;
/** `pgcast demo` runs initdb first, which a busy machine can make slow. */
const START_PG_MS = 90_000;
const READY = "pgcast ready on http://";

/**
 * The WebSocket the suite runs the client with: the runtime's own when it has one (Node.js 22+,
 * or 20 with --experimental-websocket), else the tests' small one through the `WebSocket`
 * option, as an app on Node.js 18/20 would pass the `ws` package's.
 */
export const WebSocketImpl = globalThis.WebSocket ?? MiniWebSocket;
export const webSocketName = globalThis.WebSocket ? "the runtime's WebSocket" : "MiniWebSocket (test/support)";

/** The built binary: $PGCAST_BIN, or target/debug/pgcast (under $CARGO_TARGET_DIR if set). */
export function pgcastBin() {
  const bin = process.env.PGCAST_BIN ?? join(process.env.CARGO_TARGET_DIR ?? join(REPO, "target"), "debug", "pgcast");
  if (!existsSync(bin)) {
    throw new Error(`no pgcast binary at ${bin}: build it first (cargo build -p pgcast), or set PGCAST_BIN`);
  }
  return bin;
}

/** The environment for pgcast: nothing of the caller's pgcast settings leaks in. */
function childEnv(extra = {}) {
  const env = { ...process.env, NO_COLOR: "1", ...extra };
  for (const name of Object.keys(env)) {
    const ours = name.startsWith("PGCAST_") && name !== "PGCAST_PG_BIN" && !(name in extra);
    if (ours || ["DATABASE_URL", "RUST_LOG", "PGSSLMODE", "PGSSLROOTCERT"].includes(name)) delete env[name];
  }
  return env;
}

/** Children still running, stopped if the test process exits without its `after` hook. */
const running = new Set();
process.on("exit", () => {
  // SIGTERM, not SIGKILL: the demo then stops its PostgreSQL.
  for (const child of running) child.process.kill("SIGTERM");
});

/** A child process with its output kept, and waits on that output. */
export class Child {
  constructor(name, args, env) {
    this.name = name;
    this.stdout = "";
    this.stderr = "";
    this.waiters = new Set();
    this.process = spawn(pgcastBin(), args, { env: childEnv(env), stdio: ["ignore", "pipe", "pipe"] });
    running.add(this);
    this.exited = new Promise((resolve) => {
      this.process.on("exit", (code, signal) => {
        running.delete(this);
        this.exitStatus = { code, signal };
        resolve(this.exitStatus);
        this.#check();
      });
    });
    this.process.stdout.on("data", (d) => {
      this.stdout += d;
      this.#check();
    });
    this.process.stderr.on("data", (d) => {
      this.stderr += d;
      this.#check();
    });
  }

  /** Resolves with the first match of `pattern` in stdout or stderr (`which`). */
  waitFor(which, pattern, timeoutMs = WAIT_MS) {
    return new Promise((resolve, reject) => {
      const waiter = { which, pattern, resolve, reject };
      waiter.timer = setTimeout(() => {
        this.waiters.delete(waiter);
        reject(new Error(`${this.name}: no ${pattern} on ${which} within ${timeoutMs} ms\n${this.output()}`));
      }, timeoutMs);
      this.waiters.add(waiter);
      this.#check();
    });
  }

  #check() {
    for (const w of this.waiters) {
      const match = this[w.which].match(w.pattern);
      if (match) {
        clearTimeout(w.timer);
        this.waiters.delete(w);
        w.resolve(match);
      } else if (this.exitStatus) {
        clearTimeout(w.timer);
        this.waiters.delete(w);
        w.reject(new Error(`${this.name} exited (${JSON.stringify(this.exitStatus)}) before ${w.pattern}\n${this.output()}`));
      }
    }
  }

  output() {
    return `--- stdout\n${this.stdout}--- stderr\n${this.stderr}`;
  }

  /** Sends `signal` and waits for the exit, failing after `timeoutMs`. */
  async stop(signal = "SIGTERM", timeoutMs = WAIT_MS) {
    if (!this.exitStatus) this.process.kill(signal);
    let timer;
    const late = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${this.name} did not exit within ${timeoutMs} ms after ${signal}`)), timeoutMs);
    });
    try {
      return await Promise.race([this.exited, late]);
    } finally {
      clearTimeout(timer);
    }
  }
}

/**
 * A PostgreSQL of its own: `pgcast demo` on a fresh data directory (it runs initdb, migrates and
 * loads its demo data; the tests use their own rows). Its own server is not used.
 */
export async function startDatabase() {
  const dir = mkdtempSync(join(tmpdir(), "pgcast-js-"));
  // As root, PostgreSQL runs as the `postgres` user, which must reach the data directory.
  chmodSync(dir, 0o755);
  const demo = new Child("pgcast demo", ["demo", "--listen", "127.0.0.1:0", "--data-dir", join(dir, "pg")]);
  try {
    const [, port] = await demo.waitFor("stdout", /\(port (\d+)/, START_PG_MS);
    // Printed once migrated and loaded.
    await demo.waitFor("stdout", /Overview: /, START_PG_MS);
    return {
      port: Number(port),
      url: `postgres://postgres@127.0.0.1:${port}/postgres`,
      async stop() {
        try {
          await demo.stop("SIGTERM", 30_000);
        } finally {
          rmSync(dir, { recursive: true, force: true });
        }
      },
    };
  } catch (e) {
    await demo.stop("SIGTERM", 30_000).catch(() => demo.process.kill("SIGKILL"));
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}

/** `pgcast serve` on a free port of 127.0.0.1, once it logged its ready line and /readyz is 200. */
export async function startServe(databaseUrl) {
  const serve = new Child(
    "pgcast serve",
    ["serve", "--listen", "127.0.0.1:0", "--database-url", databaseUrl, "--jwt-secret", SECRET],
    // Every client here comes from 127.0.0.1 and reconnects often: lift the per-address limits
    // (as the Rust process tests do).
    {
      PGCAST_MAX_CONNECTIONS_PER_IP: "0",
      PGCAST_CONNECTION_RATE_PER_IP: "0",
      PGCAST_MAX_UNAUTHENTICATED: "20000",
      PGCAST_MAX_UNAUTHENTICATED_PER_IP: "19999",
    },
  );
  try {
    const [, addr] = await serve.waitFor("stderr", new RegExp(`${READY}(\\S+)`));
    serve.addr = addr;
    await until(async () => (await fetch(`http://${addr}/readyz`)).status === 200, "/readyz answers 200");
    return serve;
  } catch (e) {
    await serve.stop("SIGKILL").catch(() => {});
    throw e;
  }
}

/**
 * A TCP relay on 127.0.0.1 to the current server: the client's URL stays the same across
 * server restarts. With no backend (`setBackend(null)`) it accepts and drops connections, like
 * a load balancer with no healthy replica; `cut()` drops the open ones.
 */
export async function startRelay() {
  const pairs = new Set();
  let backend = null;
  const server = createServer((down) => {
    if (backend === null) {
      down.destroy();
      return;
    }
    const [host, port] = splitAddr(backend);
    const up = connect({ host, port });
    const pair = { down, up };
    pairs.add(pair);
    const drop = () => {
      pairs.delete(pair);
      down.destroy();
      up.destroy();
    };
    for (const s of [down, up]) {
      s.setNoDelay(true);
      s.on("error", drop);
      s.on("close", drop);
    }
    down.pipe(up);
    up.pipe(down);
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const { port } = server.address();
  return {
    url: `ws://127.0.0.1:${port}/ws`,
    setBackend(addr) {
      backend = addr;
    },
    cut() {
      for (const { down, up } of pairs) {
        down.destroy();
        up.destroy();
      }
      pairs.clear();
    },
    async stop() {
      this.cut();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

function splitAddr(addr) {
  const at = addr.lastIndexOf(":");
  return [addr.slice(0, at), Number(addr.slice(at + 1))];
}

/** psql: PGCAST_PG_BIN's, the newest Debian one, or the one on PATH. */
function psqlPath() {
  const dirs = [];
  if (process.env.PGCAST_PG_BIN) dirs.push(process.env.PGCAST_PG_BIN);
  const debian = "/usr/lib/postgresql";
  if (existsSync(debian)) {
    const versions = readdirSync(debian).filter((v) => /^\d+$/.test(v)).sort((a, b) => Number(b) - Number(a));
    for (const v of versions) dirs.push(join(debian, v, "bin"));
  }
  for (const dir of dirs) if (existsSync(join(dir, "psql"))) return join(dir, "psql");
  return "psql";
}

/**
 * Runs `sql` with psql as the superuser of the test database; `vars` become psql variables
 * (`:'name'` in the SQL is the quoted value), so no value is pasted into SQL. Returns the
 * output rows (unaligned, tuples only) as arrays of fields.
 */
export function psql(db, sql, vars = {}) {
  const args = ["-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1"];
  args.push("-h", "127.0.0.1", "-p", String(db.port), "-U", "postgres", "-d", "postgres");
  for (const [name, value] of Object.entries(vars)) args.push("-v", `${name}=${value}`);
  args.push("-f", "-");
  return new Promise((resolve, reject) => {
    const child = execFile(psqlPath(), args, { env: childEnv(), timeout: WAIT_MS }, (error, stdout, stderr) => {
      if (error) reject(new Error(`psql failed: ${error.message}\n${stderr}\nSQL: ${sql}`));
      else resolve(stdout.split("\n").filter((l) => l !== "").map((l) => l.split("\t")));
    });
    child.stdin.end(sql);
  });
}

/** `pgcast token --sub … --role … --ttl …` with the tests' secret. */
export function mintToken({ sub, role, ttl = "10m", workshop }) {
  const args = ["token", "--jwt-secret", SECRET, "--sub", sub, "--role", role, "--ttl", ttl];
  if (workshop) args.push("--workshop", workshop);
  return new Promise((resolve, reject) => {
    execFile(pgcastBin(), args, { env: childEnv(), timeout: WAIT_MS }, (error, stdout, stderr) => {
      if (error) reject(new Error(`pgcast token failed: ${error.message}\n${stderr}`));
      else resolve(stdout.trim());
    });
  });
}

/** Polls `check` (sync or async) until it is true, failing after `timeoutMs`. */
export async function until(check, what, timeoutMs = WAIT_MS) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      if (await check()) return;
      last = undefined;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`not true within ${timeoutMs} ms: ${what}${last ? ` (${last.message})` : ""}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

/**
 * What a client reported (states, snapshots, events, errors, token requests), in order, and
 * waits on it: `await log.next(pred, what)` resolves with the first entry after `from` that
 * `pred` accepts — already recorded or still to come — and fails after WAIT_MS.
 */
export class Recorder {
  constructor() {
    this.entries = [];
    this.waiters = new Set();
  }

  push(kind, value) {
    this.entries.push({ kind, value });
    for (const w of this.waiters) this.#try(w);
  }

  /** Entries of `kind`, as values. */
  all(kind) {
    return this.entries.filter((e) => e.kind === kind).map((e) => e.value);
  }

  /** A mark to wait from: only entries recorded after it count. */
  mark() {
    return this.entries.length;
  }

  next(kind, pred = () => true, what = kind, from = 0, timeoutMs = WAIT_MS) {
    return new Promise((resolve, reject) => {
      const w = { kind, pred, from, resolve };
      w.timer = setTimeout(() => {
        this.waiters.delete(w);
        const seen = this.entries.map((e) => `${e.kind} ${JSON.stringify(e.value)}`.slice(0, 200)).join("\n  ");
        reject(new Error(`no ${what} within ${timeoutMs} ms; recorded:\n  ${seen}`));
      }, timeoutMs);
      this.waiters.add(w);
      this.#try(w);
    });
  }

  #try(w) {
    for (let i = w.from; i < this.entries.length; i++) {
      const e = this.entries[i];
      if (e.kind === w.kind && w.pred(e.value)) {
        clearTimeout(w.timer);
        this.waiters.delete(w);
        w.resolve(e.value);
        return;
      }
    }
  }
}
