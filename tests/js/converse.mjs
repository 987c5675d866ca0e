// One conversation turn with the official socket.io-client, the way the OpenHands frontend talks.
//
// usage: node converse.mjs BASE_URL CONVERSATION_ID TEXT [TOKEN] [TIMEOUT_MS]
//
// Connects (websocket transport unless OH_JS_TRANSPORTS says otherwise, no reconnection) with query
// {conversation_id, latest_event_id: -1} and, if TOKEN is non-empty, header
// `Authorization: Bearer TOKEN`. After `connect` it emits oh_user_action
// {"action":"message","args":{"content":TEXT}} and waits for an oh_event with source "agent",
// action "message" and args.content "echo: TEXT". Then it prints every received oh_event as one
// JSON line on stdout.
//
// exit 0: got the echo; 3: connect_error (prints {"connect_error": message, "data": ...});
// 4: timeout (prints the events received so far, then {"timeout": ms});
// 5: disconnected before the echo (prints the events so far, then {"disconnect": reason});
// 2: bad usage.
import { io } from "socket.io-client";

const [baseUrl, conversationId, text, token, timeoutArg] = process.argv.slice(2);
if (!baseUrl || !conversationId || text === undefined) {
  process.stderr.write("usage: node converse.mjs BASE_URL CONVERSATION_ID TEXT [TOKEN] [TIMEOUT_MS]\n");
  process.exit(2);
}
const timeoutMs = Number(timeoutArg || 30000);
const expected = `echo: ${text}`;
const events = [];
let finished = false;

const opts = {
  // OH_JS_TRANSPORTS=polling (or "polling,websocket") exercises long-polling too.
  transports: (process.env.OH_JS_TRANSPORTS || "websocket").split(","),
  query: { conversation_id: conversationId, latest_event_id: -1 },
  reconnection: false,
  timeout: timeoutMs,
};
if (token) {
  opts.extraHeaders = { Authorization: `Bearer ${token}` };
}
const socket = io(baseUrl, opts);

function finish(code, extra) {
  if (finished) return;
  finished = true;
  clearTimeout(timer);
  let out = "";
  if (code !== 3) {
    for (const ev of events) out += JSON.stringify(ev) + "\n";
  }
  if (extra !== undefined) out += JSON.stringify(extra) + "\n";
  socket.disconnect();
  process.stdout.write(out, () => process.exit(code));
}

const timer = setTimeout(() => finish(4, { timeout: timeoutMs }), timeoutMs);

socket.on("connect", () => {
  socket.emit("oh_user_action", { action: "message", args: { content: text } });
});

socket.on("connect_error", (err) => {
  const line = { connect_error: err && err.message };
  if (err && err.data !== undefined) line.data = err.data;
  finish(3, line);
});

socket.on("disconnect", (reason) => {
  if (reason !== "io client disconnect") finish(5, { disconnect: reason });
});

socket.on("oh_event", (ev) => {
  events.push(ev);
  if (
    ev &&
    ev.source === "agent" &&
    ev.action === "message" &&
    ev.args &&
    ev.args.content === expected
  ) {
    finish(0);
  }
});
