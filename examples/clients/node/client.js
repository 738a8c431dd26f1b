// Follows one artifact job over the event stream until it ends, with the README's recovery
// recipe ("Recovery, for client authors"), on the `eventsource` package (the WHATWG
// EventSource for Node.js):
//
//   TOKEN=<JWT> JOB_ID=<job id> [SERVER_URL=http://127.0.0.1:8000] [TIMEOUT_SECS=120]
//   [TOKEN_COMMAND='a shell command that prints a fresh token'] node client.js
//
// Prints one line per job event it handles. Exit status: 0 once the job completed, failed or
// was cancelled; 1 when TIMEOUT_SECS pass first; 2 for bad arguments; 3 when the server
// refuses the token or does not know the job, or the token expired without TOKEN_COMMAND.
import { execSync } from "node:child_process";
import { EventSource } from "eventsource";

const serverUrl = (process.env.SERVER_URL ?? "http://127.0.0.1:8000").replace(/\/+$/, "");
let token = process.env.TOKEN;
const tokenCommand = process.env.TOKEN_COMMAND;
const jobId = process.env.JOB_ID;
const timeoutSecs = Number(process.env.TIMEOUT_SECS ?? "120");
if (!token || !jobId || !(timeoutSecs > 0)) {
  console.error("usage: TOKEN=<JWT> JOB_ID=<job id> [SERVER_URL=URL] [TIMEOUT_SECS=120] node client.js");
  process.exit(2);
}

const TERMINAL = new Set(["completed", "failed", "cancelled"]);
// How long one job lookup may take before it counts as failed.
const FETCH_TIMEOUT_MS = 10_000;
// The pause before opening a new EventSource after the server refused one (429, 503): the
// server's `retry:` delay, which the library applies to its own reconnects.
const RECONNECT_DELAY_MS = 2000;

// The id of the last event handled: a reconnect asks for everything after it.
let lastEventId = null;
// What has been reported, as "<job id> <kind>": after a refetch, or when a job is rerun after
// a server restart, the stream repeats kinds that were already reported.
const reported = new Set();
// Set while a fetch of the job's state was needed (events may have been missed) and has not
// succeeded yet.
let mustRefetch = false;
// Events are handled one at a time, in stream order, even while a fetch is waiting.
let handling = Promise.resolve();
let source = null;

const deadline = setTimeout(() => {
  console.log(`gave up: no final event for job ${jobId} within ${timeoutSecs} s`);
  process.exit(1);
}, timeoutSecs * 1000);

function finish(status) {
  clearTimeout(deadline);
  source?.close();
  process.exit(status);
}

// The kind of a job event: the stream has no `event:` line, so the fields tell.
function kindOf(event) {
  if ("result" in event) return "completed";
  if ("error" in event) return "failed";
  if (event.status === "cancelled") return "cancelled";
  if ("progress" in event) return `progress ${event.progress}`;
  if (event.status === "running") return "started";
  return null;
}

function report(kind, how) {
  const key = `${jobId} ${kind}`;
  if (reported.has(key)) return;
  reported.add(key);
  console.log(`job ${jobId}: ${kind} ${how}`);
  if (TERMINAL.has(kind)) finish(0);
}

// Brings the job's state up to date when the stream cannot vouch for what was missed.
async function refetch(why) {
  console.log(`${why}: fetching job ${jobId}`);
  mustRefetch = true;
  let response;
  let body;
  try {
    response = await fetch(`${serverUrl}/ai/artifact/jobs/${encodeURIComponent(jobId)}`, {
      headers: { Authorization: `Bearer ${token}` },
      signal: AbortSignal.timeout(FETCH_TIMEOUT_MS),
    });
    body = await response.json();
  } catch (error) {
    console.log(`fetching job ${jobId} failed (${error.message}); will fetch again on the next connect`);
    return;
  }
  if (response.status === 404 || response.status === 401 || response.status === 403) {
    console.log(`job ${jobId}: the server answered ${response.status}: ${body.error}`);
    finish(3);
  }
  if (!response.ok) {
    console.log(`fetching job ${jobId} answered ${response.status}; will fetch again on the next connect`);
    return;
  }
  mustRefetch = false;
  if (TERMINAL.has(body.status)) report(body.status, "(fetched)");
  else console.log(`job ${jobId}: ${body.status} (fetched)`);
}

async function handle(message) {
  const event = JSON.parse(message.data);
  if (event.type === "connected") {
    if (lastEventId) console.log(`connected, resuming after ${lastEventId}`);
    else console.log("connected");
    // Without a last id the stream brings only what happens from now on.
    if (!lastEventId) await refetch("no last event id");
    else if (mustRefetch) await refetch("an earlier fetch failed");
    return;
  }
  if (event.type === "token_expired") {
    renewToken();
    return;
  }
  if (event.type === "replay_incomplete") {
    await refetch(`replay_incomplete after ${event.last_event_id}`);
    return;
  }
  if (message.lastEventId) lastEventId = message.lastEventId;
  if (event.job_id !== jobId) return;
  const kind = kindOf(event);
  if (kind) report(kind, `[id ${message.lastEventId}]`);
}

// Step 5 of the recipe: the stream ends with its token. The library would reconnect with the
// old one and be refused, so this client closes it, gets a fresh token and opens a new
// EventSource, which asks for everything after the last id.
function renewToken() {
  source.close();
  if (!tokenCommand) {
    console.log("the token expired; set TOKEN_COMMAND to renew it");
    finish(3);
  }
  try {
    token = execSync(tokenCommand, { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] }).trim();
  } catch (error) {
    console.log(`the token expired, and TOKEN_COMMAND failed (${error.message})`);
    finish(3);
  }
  console.log("the token expired; renewed it with TOKEN_COMMAND, resuming");
  open();
}

// The library sends Last-Event-ID itself when it reconnects; a new EventSource, opened after
// the server refused one, starts without it, so it is added here.
function fetchWithToken(url, init) {
  const headers = { ...init.headers, Authorization: `Bearer ${token}` };
  if (lastEventId && !("Last-Event-ID" in headers)) headers["Last-Event-ID"] = lastEventId;
  return fetch(url, { ...init, headers });
}

function open() {
  source = new EventSource(`${serverUrl}/ai/artifact/events/stream`, { fetch: fetchWithToken });
  source.onmessage = (message) => {
    handling = handling.then(() => handle(message)).catch((error) => {
      console.log(`could not handle an event (${error.message})`);
    });
  };
  source.onerror = (error) => {
    if (source.readyState === EventSource.CONNECTING) {
      // A network error: the library reconnects by itself after the server's retry delay.
      console.log(`connection lost (${error.message ?? "stream ended"}); reconnecting`);
      return;
    }
    // The server answered, but not with a stream: the library gives up, so this client decides.
    if (error.code === 401 || error.code === 403) {
      console.log(`the server refused the token (${error.code})`);
      finish(3);
    }
    console.log(`the server answered ${error.code ?? error.message}; reconnecting in ${RECONNECT_DELAY_MS} ms`);
    source.close();
    setTimeout(open, RECONNECT_DELAY_MS);
  };
}

open();
