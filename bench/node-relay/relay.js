// Baseline relay for pgcast-bench: one PostgreSQL connection LISTENs on the bench's baseline
// channel (a plain pg_notify(to_jsonb(NEW)) trigger the bench installs for the run: pgcast's
// own NOTIFY is a doorbell without content) and every notification payload is sent, as it is,
// to every connected WebSocket. No auth, no
// per-user routing, no resume: the minimal thing a team writes when it needs "live updates".
//
// Environment: DATABASE_URL (required), HOST (default 127.0.0.1), PORT (default 0 = any free
// port). Prints "relay listening on ws://HOST:PORT/" on stdout when ready.
'use strict';

const { Client } = require('pg');
const { WebSocketServer, WebSocket } = require('ws');

const CHANNEL = 'pgcast_bench_bare';

async function main() {
  const databaseUrl = process.env.DATABASE_URL;
  if (!databaseUrl) {
    console.error('DATABASE_URL is required');
    process.exit(2);
  }
  const host = process.env.HOST || '127.0.0.1';
  const port = Number(process.env.PORT || 0);

  const db = new Client({ connectionString: databaseUrl });
  db.on('error', (err) => {
    console.error(`database connection lost: ${err.message}`);
    process.exit(1);
  });
  await db.connect();

  let server = null;
  db.on('notification', (msg) => {
    if (msg.channel !== CHANNEL || server === null) return;
    for (const socket of server.clients) {
      if (socket.readyState === WebSocket.OPEN) socket.send(msg.payload);
    }
  });
  await db.query(`LISTEN ${CHANNEL}`);

  server = new WebSocketServer({ host, port, perMessageDeflate: false });
  server.on('listening', () => {
    const addr = server.address();
    console.log(`relay listening on ws://${addr.address}:${addr.port}/`);
  });

  const stop = () => {
    for (const socket of server.clients) socket.terminate();
    server.close();
    db.end().finally(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
