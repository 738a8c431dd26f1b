// The demo page at / in a real browser (Debian's headless Chromium, driven by playwright-core)
// against the real server binary: sign in, a quiz rendered, a failed job's error, flashcards
// flipped with the keyboard, a summary, a cancel; then, on SQLite, the server killed during a
// job and restarted, the page reconnecting and showing the job's result. The page's console
// must stay free of errors throughout. A screenshot of every step goes to SCREENSHOT_DIR (a
// temporary directory unless set), for a person to look at.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { freePort, startServer, token } from "./server.mjs";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SCREENSHOTS = process.env.SCREENSHOT_DIR || mkdtempSync(join(tmpdir(), "artifact-events-page-"));
/** The longest any one wait may take before the test fails. */
const PATIENCE_MS = 20_000;
const PHOTOSYNTHESIS = "Photosynthesis is the process by which green plants convert light energy into chemical energy. It takes place mainly in the chloroplasts of leaf cells. Chlorophyll, the green pigment in chloroplasts, absorbs red and blue light. During the light reactions, water molecules are split and oxygen is released as a byproduct. The Calvin cycle then uses carbon dioxide from the air to build glucose.";
const STREAM_PATH = "/ai/artifact/events/stream";

let browser;

before(async () => {
  mkdirSync(SCREENSHOTS, { recursive: true });
  console.log(`screenshots: ${SCREENSHOTS}`);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Root in a CI container has no user namespace for Chromium's sandbox; the network is
    // closed, so Chromium's own background connections are turned off rather than refused.
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

after(async () => {
  await browser?.close();
});

/** A page whose console errors and uncaught exceptions are collected, each with the phase it happened in. */
async function openPage(context) {
  const page = await context.newPage();
  page.setDefaultTimeout(PATIENCE_MS);
  const watch = { phase: "normal", errors: [] };
  page.on("console", (message) => {
    if (message.type() === "error") {
      watch.errors.push({ phase: watch.phase, text: message.text(), url: message.location().url });
    }
  });
  page.on("pageerror", (error) => watch.errors.push({ phase: watch.phase, text: String(error), url: "" }));
  return { page, watch };
}

async function shot(page, name) {
  await page.screenshot({ path: join(SCREENSHOTS, `${name}.png`), fullPage: true });
}

const byTestId = (scope, id) => scope.locator(`[data-testid="${id}"]`);

async function connectionIs(page, state) {
  await byTestId(page, "connection").filter({ hasText: new RegExp(`^${state}$`) }).waitFor();
}

/** Submits the generate form and returns the new job's element, found by the id the server answered. */
async function generate(page, artifactType, content) {
  await byTestId(page, "content").fill(content);
  await byTestId(page, "artifact-type").selectOption(artifactType);
  const [response] = await Promise.all([
    page.waitForResponse((response) => response.url().endsWith("/ai/artifact/generate")),
    byTestId(page, "generate").click(),
  ]);
  assert.equal(response.status(), 202);
  const { job_id: jobId } = await response.json();
  const job = page.locator(`[data-testid="job"][data-job-id="${jobId}"]`);
  await job.waitFor();
  return { job, jobId };
}

/**
 * Records every value each job's progress bar shows, in order. Waiting for a value instead
 * could miss one: a locator polls every 500 ms once a wait is long, and a stage lasts only
 * GENERATOR_DELAY_MS.
 */
async function recordProgress(page) {
  await page.evaluate(() => {
    window.progressShown = {};
    new MutationObserver((records) => {
      for (const { target } of records) {
        const jobId = target.closest("[data-testid=job]").dataset.jobId;
        (window.progressShown[jobId] ||= []).push(target.getAttribute("value"));
      }
    }).observe(document.getElementById("jobs"), { subtree: true, attributeFilter: ["value"] });
  });
}

async function statusIs(job, status) {
  await job.and(job.page().locator(`[data-status="${status}"]`)).waitFor();
}

async function quizIsRendered(job) {
  const result = byTestId(job, "result");
  await result.waitFor({ state: "visible" });
  const questions = result.locator("ol.quiz > li");
  assert.equal(await questions.count(), 5, "five questions");
  for (const question of await questions.all()) {
    assert.match(await question.locator(".question").innerText(), /_____/, "a cloze question");
    const options = await question.locator("ol.options > li").allInnerTexts();
    assert.ok(options.length >= 2 && options.every((option) => option.trim()), `options: ${options}`);
    assert.ok(await question.locator("ol.options").isVisible());
  }
  assert.ok(await byTestId(job, "error").isHidden());
}

function assertNoConsoleErrors(watch) {
  assert.deepEqual(watch.errors, [], "the page's console has no errors");
}

test("development mode: sign in, a quiz, a failure, flashcards, a summary and a cancel", async () => {
  const server = await startServer({ GENERATOR_DELAY_MS: "700" });
  const context = await browser.newContext();
  try {
    const { page, watch } = await openPage(context);
    await page.goto(`${server.url}/`);
    await connectionIs(page, "signed out");
    assert.ok(await byTestId(page, "generate").isDisabled(), "no generating before signing in");
    await shot(page, "01-signed-out");

    // The keyboard alone signs in: type the id, press Enter.
    await byTestId(page, "user-id").fill("ada");
    await byTestId(page, "user-id").press("Enter");
    await connectionIs(page, "connected");
    await byTestId(page, "whoami").filter({ hasText: "Signed in as ada" }).waitFor();
    const cookies = await context.cookies();
    const session = cookies.find((cookie) => cookie.name === "access_token");
    assert.ok(session?.httpOnly && session.sameSite === "Strict", JSON.stringify(cookies.map(({ value, ...rest }) => rest)));
    await shot(page, "02-signed-in");

    await recordProgress(page);
    const quiz = await generate(page, "quiz", PHOTOSYNTHESIS);
    await statusIs(quiz.job, "running");
    await shot(page, "03-quiz-in-progress");
    await statusIs(quiz.job, "completed");
    await quizIsRendered(quiz.job);
    // The bar moved with each artifact.progress event (20 planned, 60 generated, 90
    // validated), then filled on completion.
    const shown = await page.evaluate((jobId) => window.progressShown[jobId], quiz.jobId);
    assert.deepEqual(shown.filter((value) => value !== "0"), ["20", "60", "90", "100"]);
    await shot(page, "04-quiz-completed");

    const failing = await generate(page, "quiz", "Create quiz on cells");
    await statusIs(failing.job, "failed");
    const error = byTestId(failing.job, "error");
    await error.waitFor({ state: "visible" });
    assert.match(await error.innerText(), /^Validation failed after 2 repair attempts: expected 5 questions, got 0/);
    assert.ok(await byTestId(failing.job, "result").isHidden());
    await shot(page, "05-quiz-failed");

    const cards = await generate(page, "flashcards", PHOTOSYNTHESIS);
    await statusIs(cards.job, "completed");
    const first = cards.job.locator('[data-testid="flashcard"]').first();
    await first.waitFor();
    assert.ok((await cards.job.locator('[data-testid="flashcard"]').count()) >= 3);
    const front = await first.locator(".text").innerText();
    await first.focus();
    await page.keyboard.press("Enter");
    assert.equal(await first.getAttribute("aria-pressed"), "true");
    const back = await first.locator(".text").innerText();
    assert.notEqual(back, front);
    assert.ok(back.includes(front), `the back explains the front: ${front} / ${back}`);
    await shot(page, "06-flashcard-flipped");
    await page.keyboard.press("Space");
    assert.equal(await first.getAttribute("aria-pressed"), "false");
    assert.equal(await first.locator(".text").innerText(), front);

    const summary = await generate(page, "summary", PHOTOSYNTHESIS);
    await statusIs(summary.job, "completed");
    const text = await byTestId(summary.job, "result").locator("p").first().innerText();
    assert.match(text, /Photosynthesis|chloroplasts|Calvin/);
    await shot(page, "07-summary");

    const cancelled = await generate(page, "quiz", PHOTOSYNTHESIS);
    await byTestId(cancelled.job, "cancel").click();
    await statusIs(cancelled.job, "cancelled");
    assert.ok(await byTestId(cancelled.job, "result").isHidden());
    assert.ok(await byTestId(cancelled.job, "cancel").isHidden());
    await shot(page, "08-cancelled");

    assertNoConsoleErrors(watch);
  } finally {
    await context.close();
    await server.stop();
  }
});

test("production mode on SQLite: the server killed mid-job and restarted, the page shows the result after reconnecting", async () => {
  const secret = "browser-test-secret-0123456789abcdef0123";
  const dir = mkdtempSync(join(tmpdir(), "artifact-events-browser-db-"));
  const port = await freePort();
  const settings = {
    ADDR: `127.0.0.1:${port}`,
    JWT_SECRET: secret,
    DATABASE_PATH: join(dir, "events.db"),
    // Slow enough that the job is surely running when the server is killed.
    GENERATOR_DELAY_MS: "2000",
  };
  let server = await startServer(settings);
  const anonymous = await browser.newContext();
  const context = await browser.newContext();
  try {
    // Without the application's cookie the page says why it cannot sign anyone in.
    const { page: outsider, watch: outsiderWatch } = await openPage(anonymous);
    await outsider.goto(`${server.url}/`);
    await byTestId(outsider, "notice").filter({ hasText: "not in development mode" }).waitFor();
    assert.ok(await byTestId(outsider, "login").isHidden(), "no sign-in form the server would refuse");
    await shot(outsider, "09-production-without-cookie");
    assertNoConsoleErrors(outsiderWatch);

    // The application's own cookie, as its sign-in would set it.
    await context.addCookies([{
      name: "access_token",
      value: token("carol", secret),
      url: server.url,
      httpOnly: true,
      sameSite: "Strict",
    }]);
    const { page, watch } = await openPage(context);
    await page.goto(`${server.url}/`);
    await connectionIs(page, "connected");
    await byTestId(page, "whoami").filter({ hasText: "Signed in as carol" }).waitFor();

    const quiz = await generate(page, "quiz", PHOTOSYNTHESIS);
    await quiz.job.locator('[data-testid="progress"][value="20"]').waitFor();
    await shot(page, "10-running-before-the-kill");

    // SIGKILL: no shutdown code runs, the job is left `running` in the file.
    watch.phase = "outage";
    const killed = await server.stop("SIGKILL");
    assert.equal(killed.signal, "SIGKILL");
    await connectionIs(page, "reconnecting");
    assert.equal(await quiz.job.getAttribute("data-status"), "running");
    await shot(page, "11-reconnecting");

    // Restarted on the same port and file, now fast: the requeued job finishes at once,
    // most likely before the page's next reconnection attempt.
    server = await startServer({ ...settings, GENERATOR_DELAY_MS: "0" });
    const reconnectedEarly = await waitForStoredCompletion(server.url, quiz.jobId, token("carol", secret), page);
    console.log(`job completed on the restarted server while the page was ${reconnectedEarly ? "already connected" : "still reconnecting"}`);
    await connectionIs(page, "connected");
    watch.phase = "normal";
    await statusIs(quiz.job, "completed");
    await quizIsRendered(quiz.job);
    await shot(page, "12-completed-after-reconnect");

    // Expected, and only these: while the server is down, each reconnection attempt of the
    // EventSource fails, and Chromium logs that failed request as a console error. Nothing
    // the page's own code does, and nothing else, may log an error.
    const unexpected = watch.errors.filter((error) => !(error.phase === "outage" && isStreamNetworkError(error)));
    assert.deepEqual(unexpected, [], "the page's console has no errors but the outage's failed reconnections");
    console.log(`console errors during the outage (expected): ${JSON.stringify(watch.errors)}`);
  } finally {
    await anonymous.close();
    await context.close();
    await server.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});

/** Chromium's log line for the stream's request failing at the network level. */
function isStreamNetworkError({ text, url }) {
  return url.endsWith(STREAM_PATH) || url.includes(`${STREAM_PATH}?`)
    ? /^Failed to load resource: net::ERR_(CONNECTION_REFUSED|INCOMPLETE_CHUNKED_ENCODING|EMPTY_RESPONSE|CONNECTION_RESET)$/.test(text)
    : false;
}

/**
 * Waits, through the API with a bearer token, until the job is stored as completed; returns
 * whether the page was already connected again at that moment (for the log only: the test's
 * claim is the result on the page, however the page learned it).
 */
async function waitForStoredCompletion(url, jobId, bearer, page) {
  const deadline = Date.now() + PATIENCE_MS;
  for (;;) {
    const response = await fetch(`${url}/ai/artifact/jobs/${jobId}`, { headers: { authorization: `Bearer ${bearer}` } });
    const job = await response.json();
    if (job.status === "completed") {
      return (await byTestId(page, "connection").innerText()) === "connected";
    }
    assert.ok(Date.now() < deadline, `job still ${job.status}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}
