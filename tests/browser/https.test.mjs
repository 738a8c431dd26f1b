// HTTPS with HTTP/2 in a real browser: the server binary with a test certificate
// (TLS_CERT_FILE, TLS_KEY_FILE), and Debian's headless Chromium told to trust exactly that
// certificate's key. One page opens ten EventSources, ten tabs' worth: over HTTP/1.1 Chromium
// would hold all but six of them back (six connections per origin), over HTTP/2 they share one
// connection and all of them connect and get a published event.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createHash, createPublicKey } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { startServer, token } from "./server.mjs";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const PATIENCE_MS = 20_000;
const TABS = 10;
const SECRET = "https-browser-test-secret-0123456789abcdef";

let dir;
let browser;
let server;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "artifact-events-https-"));
  const [cert, key] = [join(dir, "cert.pem"), join(dir, "key.pem")];
  execFileSync("openssl", [
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
    "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
  ], { stdio: "ignore" });
  // Chromium trusts a certificate whose public key has this SHA-256 (SPKI) hash, and only it.
  const spki = createPublicKey(readFileSync(cert)).export({ type: "spki", format: "der" });
  const spkiHash = createHash("sha256").update(spki).digest("base64");
  server = await startServer({ JWT_SECRET: SECRET, TLS_CERT_FILE: cert, TLS_KEY_FILE: key });
  assert.match(server.url, /^https:\/\//);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      `--ignore-certificate-errors-spki-list=${spkiHash}`,
    ],
  });
});

after(async () => {
  await browser?.close();
  await server?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

test("ten EventSources over HTTPS share one HTTP/2 connection and all get the event", async () => {
  const page = await browser.newPage();
  page.setDefaultTimeout(PATIENCE_MS);
  const errors = [];
  page.on("console", (message) => {
    // /healthz is JSON, so the browser's own request for /favicon.ico gets the API's 404.
    if (message.type() === "error" && !message.location().url.endsWith("/favicon.ico")) {
      errors.push(message.text());
    }
  });
  page.on("pageerror", (error) => errors.push(String(error)));
  await page.goto(`${server.url}/healthz`);
  const protocol = await page.evaluate(() => performance.getEntriesByType("navigation")[0].nextHopProtocol);
  assert.equal(protocol, "h2", "the page itself came over HTTP/2");

  const userToken = token("tabs", SECRET);
  const publisherToken = execFileSync(process.env.ARTIFACT_EVENTS_BIN, ["token", "publisher", "--publisher"], {
    env: { ...process.env, JWT_SECRET: SECRET },
    encoding: "utf8",
  }).trim();
  const received = await page.evaluate(async ({ tabs, userToken, publisherToken, patience }) => {
    const url = `/ai/artifact/events/stream?access_token=${encodeURIComponent(userToken)}`;
    const sources = Array.from({ length: tabs }, () => new EventSource(url));
    const next = (source) => new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("no event in time")), patience);
      source.addEventListener("message", function once(event) {
        clearTimeout(timer);
        source.removeEventListener("message", once);
        resolve(JSON.parse(event.data));
      });
    });
    const connected = await Promise.all(sources.map(next));
    const delivered = Promise.all(sources.map(next));
    const published = await fetch("/ai/events/publish", {
      method: "POST",
      headers: { authorization: `Bearer ${publisherToken}`, "content-type": "application/json" },
      body: JSON.stringify({ event_type: "artifact.completed", event_data: { user_id: "tabs", job_id: "j-h2" } }),
    });
    const events = await delivered;
    const metrics = await (await fetch("/metrics")).text();
    sources.forEach((source) => source.close());
    return { connected, status: published.status, events, metrics };
  }, { tabs: TABS, userToken, publisherToken, patience: PATIENCE_MS });

  assert.equal(received.connected.length, TABS);
  for (const frame of received.connected) assert.equal(frame.type, "connected");
  assert.equal(received.status, 202);
  for (const event of received.events) assert.equal(event.job_id, "j-h2");
  assert.match(received.metrics, new RegExp(`^artifact_events_open_streams ${TABS}$`, "m"));
  assert.deepEqual(errors, []);
});
