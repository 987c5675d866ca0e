// Drives the gateway's built-in page (gateway/web/index.html) in headless Chromium, as a user
// would, against a running deployment with the echo agent (tests/tests/web.rs).
//
// Usage: node builtin-page.mjs BASE_URL [TOKEN]
//   TOKEN               the gateway runs with OH_AUTH_TOKENS: the page is first seen refused
//                       (401), then the token is typed in; the page keeps it across the reload
//   OH_CHROMIUM         the browser (default /usr/bin/chromium; never a downloaded one)
//   OH_STEP_TIMEOUT_MS  how long each expectation may take (default 30000)
//   OH_SCREENSHOT       a PNG path: a screenshot of the conversation after the second echo
//
// Steps: create a conversation with a message and see the echo; stop and see `stopped`;
// reload and see the history again, each event once; resume; drop the socket and see it
// reconnect after the last id seen; send a second message and see its echo; how actions,
// observations and status updates are described; the errors a user must see (a refused
// socket, a failed REST call). Prints one line per step with its time. Exit codes: 0 all
// passed; 1 an expectation failed (the message says which, with what the page showed);
// 2 bad usage or no browser.

import { chromium } from "playwright-core";

const [base, token] = process.argv.slice(2);
if (!base) {
  console.error("usage: node builtin-page.mjs BASE_URL [TOKEN]");
  process.exit(2);
}
const executablePath = process.env.OH_CHROMIUM || "/usr/bin/chromium";
const T = Number(process.env.OH_STEP_TIMEOUT_MS || 30000);
const FIRST = "hello from the browser";
const SECOND = "second message after resume";

const started = Date.now();
const log = (line) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)} s] ${line}`);

class Failed extends Error {}
const fail = (message) => { throw new Failed(message); };

let browser;
try {
  browser = await chromium.launch({ executablePath, headless: true });
} catch (e) {
  console.error(`cannot launch ${executablePath}: ${e.message}`);
  process.exit(2);
}
const page = await browser.newPage();
page.setDefaultTimeout(T);
const pageErrors = [];
const sockets = []; // URL of every WebSocket the page opened, for failure reports
page.on("pageerror", (e) => pageErrors.push(String(e)));
page.on("console", (m) => {
  // The browser logs the expected 401 (the first list, before the token is typed) as an error.
  const expected = token && /status of 401/.test(m.text());
  if (m.type() === "error" && !expected) pageErrors.push(`console: ${m.text()}`);
});
page.on("websocket", (ws) => sockets.push(ws.url()));

// The next WebSocket the page opens (a rejection is seen where it is awaited).
function nextSocket() {
  const socket = page.waitForEvent("websocket", { timeout: T });
  socket.catch(() => {});
  return socket;
}

async function step(name, body) {
  const t = Date.now();
  try {
    await body();
  } catch (e) {
    e.step = name;
    throw e;
  }
  log(`ok ${name} (${Date.now() - t} ms)`);
}

// Waits until `predicate(arg)` holds in the page; `what` names it in the failure.
async function until(what, predicate, arg) {
  try {
    await page.waitForFunction(predicate, arg, { timeout: T, polling: 50 });
  } catch (e) {
    fail(`timed out after ${T} ms waiting for ${what}`);
  }
}

const shown = (kind, text) =>
  page.$$eval(`#events .event[data-kind="${kind}"] .text`,
    (els, t) => els.filter((e) => e.textContent === t).length, text);

const untilShown = (kind, text) =>
  until(`${kind} "${text}" to be shown`,
    ([k, t]) => [...document.querySelectorAll(`#events .event[data-kind="${k}"] .text`)]
      .some((e) => e.textContent === t), [kind, text]);

async function expectOnce(kind, text) {
  await untilShown(kind, text);
  const n = await shown(kind, text);
  if (n !== 1) fail(`${kind} "${text}" is shown ${n} times, expected once`);
}

const untilAttr = (selector, attr, value) =>
  until(`${selector} ${attr}=${value}`,
    ([s, a, v]) => document.querySelector(s)?.getAttribute(a) === v, [selector, attr, value]);

async function expectNoError() {
  const text = await page.textContent("#error");
  if (text) fail(`the page shows an error: ${text}`);
  if (pageErrors.length) fail(`errors in the page: ${pageErrors.join("; ")}`);
}

async function expectNoDuplicateIds() {
  const ids = await page.$$eval("#events .event[data-event-id]", (els) => els.map((e) => e.dataset.eventId));
  const dup = ids.filter((id, i) => ids.indexOf(id) !== i);
  if (dup.length) fail(`events shown more than once: ids ${dup.join(", ")}`);
  if (!ids.length) fail("no events shown");
}

let sid;
try {
  await step("load the built-in page", async () => {
    const res = await page.goto(base);
    if (!res || res.status() !== 200) fail(`GET ${base} answered ${res && res.status()}`);
    await page.waitForSelector("#create", { timeout: T });
    await untilAttr("#conversations", "data-testid", "conversations");
    if (!token) await expectNoError();
  });

  if (token) {
    await step("without the token the refusal is shown; with it, the list loads", async () => {
      await until("the 401 to be shown",
        () => /GET \/api\/conversations\?limit=20: 401 Invalid token/.test(document.querySelector("#error").textContent));
      const listed = page.waitForResponse((r) => r.url().endsWith("/api/conversations?limit=20"), { timeout: T });
      await page.fill("#token", token);
      await page.dispatchEvent("#token", "change");
      const res = await listed;
      if (res.status() !== 200) fail(`with the token, the list answered ${res.status()}`);
      await expectNoError();
    });
  }

  await step("create a conversation with a message", async () => {
    await page.fill("#new-msg", FIRST);
    await page.click("#create");
    await until("the new conversation to open", () => /^#\/conversations\/./.test(location.hash));
    sid = await page.textContent("#conv-id");
    if (!sid) fail("no conversation id shown");
    await untilAttr("#conn-status", "data-state", "connected");
    log(`conversation ${sid}`);
  });

  await step("see the message and the echo reply", async () => {
    await expectOnce("user-message", FIRST);
    await expectOnce("agent-message", `echo: ${FIRST}`);
    await untilAttr("#agent-state", "data-state", "awaiting_user_input");
    await untilAttr(`#conversations li[data-id="${sid}"]`, "data-testid", "conversation");
    await expectNoError();
  });

  await step("stop, and see the stopped state", async () => {
    await page.click("#stop");
    await untilAttr("#agent-state", "data-state", "stopped");
    await untilAttr(`#conversations li[data-id="${sid}"]`, "data-status", "STOPPED");
    await expectNoError();
  });

  await step("reload: the history is shown again, each event once", async () => {
    const socket = nextSocket();
    await page.reload();
    const url = (await socket).url();
    if (!url.includes("latest_event_id=-1")) fail(`the reloaded page connected with ${url}, not latest_event_id=-1`);
    await untilAttr("#conn-status", "data-state", "connected");
    await expectOnce("user-message", FIRST);
    await expectOnce("agent-message", `echo: ${FIRST}`);
    await expectNoDuplicateIds();
    await expectNoError();
  });

  await step("resume", async () => {
    await page.click("#resume");
    await untilAttr("#agent-state", "data-state", "awaiting_user_input");
    await untilAttr(`#conversations li[data-id="${sid}"]`, "data-status", "RUNNING");
    await expectNoError();
  });

  await step("a dropped socket reconnects after the last id seen", async () => {
    const latest = await page.$$eval("#events .event[data-event-id]",
      (els) => Math.max(...els.map((e) => Number(e.dataset.eventId))));
    const socket = nextSocket();
    await page.evaluate(() => window.ohPage.dropSocket());
    const url = (await socket).url();
    if (!url.includes(`latest_event_id=${latest}`)) fail(`reconnected with ${url}, expected latest_event_id=${latest}`);
    await untilAttr("#conn-status", "data-state", "connected");
    await expectNoDuplicateIds();
  });

  await step("send a second message, and see its echo", async () => {
    await page.fill("#msg", SECOND);
    await page.press("#msg", "Enter");
    await expectOnce("user-message", SECOND);
    await expectOnce("agent-message", `echo: ${SECOND}`);
    await untilAttr("#agent-state", "data-state", "awaiting_user_input");
    for (const [kind, text] of [["user-message", FIRST], ["agent-message", `echo: ${FIRST}`]]) {
      const n = await shown(kind, text);
      if (n !== 1) fail(`${kind} "${text}" is shown ${n} times, expected once`);
    }
    await expectNoDuplicateIds();
    await expectNoError();
    if (process.env.OH_SCREENSHOT) await page.screenshot({ path: process.env.OH_SCREENSHOT, fullPage: true });
  });

  await step("actions, observations and status updates are described", async () => {
    // Events the echo agent never writes (OpenHands' shapes, as shared::event builds them).
    const got = await page.evaluate(() => [
      { id: 1, source: "agent", action: "run", message: "Running command: ls -la",
        args: { command: "ls -la", thought: "look" } },
      { id: 2, source: "agent", observation: "run", content: "a.txt\n", message: "Command `ls -la` executed with exit code 0.",
        extras: { command: "ls -la", metadata: { exit_code: 0 } } },
      { status_update: true, type: "info", id: "STATUS$LLM_RETRY", message: "Retrying LLM request" },
      { error: true, message: "invalid action" },
    ].map((ev) => describe(ev)));
    const expect = [
      { kind: "action", label: "agent run", text: "$ ls -la", detail: "look" },
      { kind: "observation", label: "run (exit 0)", text: "Command `ls -la` executed with exit code 0.", detail: "a.txt\n" },
      { kind: "status", label: "info", text: "Retrying LLM request" },
      { kind: "error", label: "error", text: "invalid action" },
    ];
    for (const [i, want] of expect.entries()) {
      for (const [k, v] of Object.entries(want)) {
        if (got[i][k] !== v) fail(`event ${i}: ${k} is ${JSON.stringify(got[i][k])}, expected ${JSON.stringify(v)}`);
      }
    }
  });

  await step("errors are shown: a refused socket, a failed REST call", async () => {
    await page.evaluate(() => { location.hash = "#/conversations/no-such-conversation"; });
    await untilAttr("#conn-status", "data-state", "refused");
    await until("the socket's refusal to be shown",
      () => document.querySelector("#error").textContent.includes("Conversation not found"));
    await page.click("#error"); // dismiss
    await page.click("#stop");
    await until("the REST error to be shown",
      () => /POST \/api\/conversations\/no-such-conversation\/stop: 404/.test(document.querySelector("#error").textContent));
  });
  log("all steps passed");
} catch (e) {
  const where = e.step ? `step "${e.step}" failed` : "failed";
  console.error(`${where}: ${e instanceof Failed ? e.message : e.stack || e}`);
  console.error(`sockets opened: ${sockets.join(" ") || "none"}`);
  if (pageErrors.length) console.error(`errors in the page: ${pageErrors.join("; ")}`);
  try {
    const shown = await page.evaluate(() => {
      const text = (id) => document.getElementById(id)?.textContent;
      const events = [...document.querySelectorAll("#events .event")].map(
        (e) => `  ${e.querySelector(".meta")?.textContent} | ${e.querySelector(".text")?.textContent}`);
      return `url: ${location.href}; socket: ${text("conn-status")}; agent: ${text("agent-state")}; ` +
        `error banner: ${JSON.stringify(text("error"))}\nevents shown:\n${events.join("\n")}`;
    });
    console.error(shown);
  } catch (dumpError) {
    console.error(`(could not read the page: ${dumpError.message})`);
  }
  process.exitCode = 1;
} finally {
  await browser.close();
}
