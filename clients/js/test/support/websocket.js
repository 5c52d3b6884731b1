// A small WebSocket client (RFC 6455, `ws://` only) with the browser's API, for the tests on a
// Node.js without a global `WebSocket` (18; 20 without `--experimental-websocket`): the package
// has no dependencies, and neither have its tests. It is what the client's `WebSocket` option
// takes, so it also stands for "an implementation the app passes in".
//
// Enough for pgcast's protocol: text frames (fragmented or not), ping/pong, the close
// handshake with its code and reason; `onclose` fires once, with 1006 when the TCP connection
// ends without a close frame (or never opens), like a browser's.

import { createHash, randomBytes } from "node:crypto";
import { request } from "node:http";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/** How long `close()` waits for the server's close frame and the end of TCP. */
const CLOSE_WAIT_MS = 5000;

const OP = { continuation: 0, text: 1, binary: 2, close: 8, ping: 9, pong: 10 };

export class MiniWebSocket {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;

  constructor(url) {
    const u = new URL(url);
    if (u.protocol !== "ws:") throw new SyntaxError(`MiniWebSocket speaks ws:// only, not ${u.protocol}`);
    this.url = url;
    this.readyState = MiniWebSocket.CONNECTING;
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    this.socket = null;
    this.buffer = Buffer.alloc(0);
    /** Payloads of a fragmented message so far, and its opcode. */
    this.fragments = [];
    this.fragmentOp = null;
    /** The server's close frame, when it sent one. */
    this.closeFrame = null;
    this.closed = false;

    const key = randomBytes(16).toString("base64");
    const expected = createHash("sha1").update(key + GUID).digest("base64");
    this.request = request({
      host: u.hostname,
      port: u.port || 80,
      path: `${u.pathname}${u.search}`,
      headers: {
        Connection: "Upgrade",
        Upgrade: "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": key,
      },
    });
    this.request.on("upgrade", (res, socket, head) => {
      if (res.headers["sec-websocket-accept"] !== expected) {
        socket.destroy();
        this.#fail();
        return;
      }
      this.socket = socket;
      socket.setNoDelay(true);
      socket.on("data", (chunk) => this.#receive(chunk));
      socket.on("error", () => {}); // followed by "close"
      socket.on("close", () => this.#finish());
      this.readyState = MiniWebSocket.OPEN;
      this.onopen?.({ type: "open" });
      if (head.length > 0) this.#receive(head);
    });
    this.request.on("response", (res) => {
      // Anything but 101 Switching Protocols.
      res.resume();
      this.#fail();
    });
    this.request.on("error", () => this.#fail());
    this.request.end();
  }

  send(text) {
    if (this.readyState === MiniWebSocket.CONNECTING) throw new Error("InvalidStateError: still connecting");
    if (this.readyState !== MiniWebSocket.OPEN) return; // as a browser: silently dropped
    this.socket.write(frame(OP.text, Buffer.from(String(text), "utf8")));
  }

  close(code, reason = "") {
    if (this.readyState === MiniWebSocket.CLOSING || this.readyState === MiniWebSocket.CLOSED) return;
    if (this.readyState === MiniWebSocket.CONNECTING) {
      this.request.destroy();
      this.#fail();
      return;
    }
    this.readyState = MiniWebSocket.CLOSING;
    this.socket.write(frame(OP.close, closePayload(code, reason)));
    // The server answers with its close frame and ends TCP; one that does not is cut.
    setTimeout(() => this.socket.destroy(), CLOSE_WAIT_MS).unref();
  }

  #receive(chunk) {
    this.buffer = this.buffer.length === 0 ? chunk : Buffer.concat([this.buffer, chunk]);
    for (;;) {
      const parsed = parseFrame(this.buffer);
      if (parsed === null) return;
      this.buffer = this.buffer.subarray(parsed.size);
      this.#handle(parsed);
      if (this.closed) return;
    }
  }

  #handle({ fin, op, payload }) {
    switch (op) {
      case OP.text:
      case OP.binary:
      case OP.continuation: {
        if (op !== OP.continuation) {
          this.fragments = [];
          this.fragmentOp = op;
        }
        this.fragments.push(payload);
        if (!fin) return;
        const data = Buffer.concat(this.fragments);
        this.fragments = [];
        if (this.readyState !== MiniWebSocket.OPEN) return;
        this.onmessage?.({ type: "message", data: this.fragmentOp === OP.text ? data.toString("utf8") : data });
        return;
      }
      case OP.ping:
        if (this.readyState === MiniWebSocket.OPEN) this.socket.write(frame(OP.pong, payload));
        return;
      case OP.pong:
        return;
      case OP.close: {
        const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
        this.closeFrame = { code, reason: payload.subarray(2).toString("utf8") };
        if (this.readyState === MiniWebSocket.OPEN) {
          // Echo the code, then wait for the server to end TCP.
          this.socket.write(frame(OP.close, payload.subarray(0, 2)));
        }
        this.readyState = MiniWebSocket.CLOSING;
        this.socket.end();
        return;
      }
      default:
        this.socket.destroy(); // a protocol error: 1006
    }
  }

  /** The connection never opened. */
  #fail() {
    if (this.closed) return;
    this.onerror?.({ type: "error" });
    this.#finish();
  }

  #finish() {
    if (this.closed) return;
    this.closed = true;
    this.readyState = MiniWebSocket.CLOSED;
    const { code, reason } = this.closeFrame ?? { code: 1006, reason: "" };
    this.onclose?.({ type: "close", code, reason, wasClean: this.closeFrame !== null });
  }
}

/** A masked frame (a client must mask). */
function frame(op, payload) {
  const len = payload.length;
  const head = len < 126 ? 2 : len < 65536 ? 4 : 10;
  const out = Buffer.alloc(head + 4 + len);
  out[0] = 0x80 | op;
  if (len < 126) {
    out[1] = 0x80 | len;
  } else if (len < 65536) {
    out[1] = 0x80 | 126;
    out.writeUInt16BE(len, 2);
  } else {
    out[1] = 0x80 | 127;
    out.writeBigUInt64BE(BigInt(len), 2);
  }
  const mask = randomBytes(4);
  mask.copy(out, head);
  for (let i = 0; i < len; i++) out[head + 4 + i] = payload[i] ^ mask[i & 3];
  return out;
}

function closePayload(code, reason) {
  if (code === undefined) return Buffer.alloc(0);
  const text = Buffer.from(reason, "utf8");
  const out = Buffer.alloc(2 + text.length);
  out.writeUInt16BE(code, 0);
  text.copy(out, 2);
  return out;
}

/** The first complete frame of `buf` and its size in bytes, or null if more is needed. */
function parseFrame(buf) {
  if (buf.length < 2) return null;
  const fin = (buf[0] & 0x80) !== 0;
  const op = buf[0] & 0x0f;
  const masked = (buf[1] & 0x80) !== 0;
  let len = buf[1] & 0x7f;
  let offset = 2;
  if (len === 126) {
    if (buf.length < 4) return null;
    len = buf.readUInt16BE(2);
    offset = 4;
  } else if (len === 127) {
    if (buf.length < 10) return null;
    len = Number(buf.readBigUInt64BE(2));
    offset = 10;
  }
  const maskAt = offset;
  if (masked) offset += 4;
  if (buf.length < offset + len) return null;
  let payload = buf.subarray(offset, offset + len);
  if (masked) {
    // Servers do not mask; unmask anyway rather than misread.
    payload = Buffer.from(payload);
    for (let i = 0; i < len; i++) payload[i] ^= buf[maskAt + (i & 3)];
  }
  return { fin, op, payload, size: offset + len };
}
