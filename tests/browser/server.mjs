// The server binary as a child process, for the browser test: started with exactly the
// environment a test gives it, waited for until it listens, and killed however the test needs.

import { spawn, execFileSync } from "node:child_process";
import { createServer } from "node:net";
import { createInterface } from "node:readline";

/** The binary under test, built by .ci/browser.sh. */
export const BINARY = process.env.ARTIFACT_EVENTS_BIN;
/** How long a server may take to start listening. */
const START_TIMEOUT_MS = 30_000;
/** Settings the test never inherits from the shell that runs it. */
const CLEARED = ["JWT_SECRET", "DATABASE_PATH", "REDIS_URL", "ADDR", "GENERATOR_DELAY_MS", "LOG_FORMAT"];

const running = new Set();
// A test that fails half way leaves no server behind.
process.on("exit", () => {
  for (const child of running) child.kill("SIGKILL");
});

/** A loopback port that nothing listens on now, for a server that must come back on it. */
export async function freePort() {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

/** A token for `userId` signed with `secret`, from the binary's own `token` command. */
export function token(userId, secret) {
  return execFileSync(BINARY, ["token", userId], {
    env: { ...process.env, JWT_SECRET: secret },
    encoding: "utf8",
    timeout: 10_000,
  }).trim();
}

/** Starts the server with `env` (`ADDR` defaults to an ephemeral loopback port). */
export async function startServer(env) {
  if (!BINARY) throw new Error("ARTIFACT_EVENTS_BIN must name the server binary (see .ci/browser.sh)");
  const childEnv = { ...process.env };
  for (const name of CLEARED) delete childEnv[name];
  Object.assign(childEnv, { ADDR: "127.0.0.1:0" }, env);
  const child = spawn(BINARY, [], { env: childEnv, stdio: ["ignore", "ignore", "pipe"] });
  running.add(child);
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => {
    running.delete(child);
    resolve({ code, signal });
  }));
  const log = [];
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no "listening on" within ${START_TIMEOUT_MS} ms:\n${log.join("\n")}`)), START_TIMEOUT_MS);
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`the server exited (${code ?? signal}) before listening:\n${log.join("\n")}`));
    });
    createInterface({ input: child.stderr }).on("line", (line) => {
      log.push(line);
      const found = /listening on (https?:\/\/[^\s"]+)/.exec(line);
      if (found) {
        clearTimeout(timer);
        resolve(found[1]);
      }
    });
  });
  return {
    url,
    log,
    /** Sends `signal` and waits for the process to exit. */
    async stop(signal = "SIGTERM") {
      if (running.has(child)) child.kill(signal);
      return exited;
    },
  };
}
