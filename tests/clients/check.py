"""Runs the client examples (examples/clients/) against the real server, through restarts.

    python3 tests/clients/check.py --binary target/debug/artifact-events \
        --python VENV/bin/python --work DIR

The server is a build with the `sqlite` feature. Two scenarios, each with both clients
following one job:

1. Crash and recovery: the server is killed (SIGKILL) while the job runs and started again on
   the same database; the job is requeued and completes before the clients reconnect (the
   server asks for a 10 s reconnect delay), so only a replay after their last event id can
   bring them the completed event. Each client must reconnect by itself and report the
   completed event exactly once, from the stream, then exit 0.
2. A lost history: the server is killed and started on a new, empty database, so the clients'
   last ids mean nothing to it. Each client must get replay_incomplete, refetch the job, learn
   that the server no longer knows it (404), and exit 3.
3. A token that expires: the clients' token lives 5 s and the job runs longer; the server ends
   each stream with token_expired, and each client must renew its token with TOKEN_COMMAND,
   resume after its last id, and report the completed event exactly once, then exit 0.

Prints each client's output and one line per check; exits 1 if any check failed.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECRET = "clients-check-secret-0123456789abcdef0123"
USER = "client-demo"
# The README's "Try it" paragraph: enough material for a quiz that validates.
CONTENT = (
    "Photosynthesis is the process by which green plants convert light energy into chemical "
    "energy. It takes place mainly in the chloroplasts of leaf cells. Chlorophyll, the green "
    "pigment in chloroplasts, absorbs red and blue light. During the light reactions, water "
    "molecules are split and oxygen is released as a byproduct. The Calvin cycle then uses "
    "carbon dioxide from the air to build glucose."
)
# Each generator call waits this long, so a job runs for seconds and can be interrupted.
GENERATOR_DELAY_MS = 2000
# The reconnect delay the server sends (`retry:`), long enough for the requeued job to end
# while the clients are away.
RETRY_MS = 10_000
# Longest any one wait may take before the check fails.
PATIENCE_SECS = 60


class CheckFailed(Exception):
    """A client or the server did not behave as the recipe says."""


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(what, condition):
    deadline = time.monotonic() + PATIENCE_SECS
    while not condition():
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out waiting for {what}")
        time.sleep(0.05)


class Server:
    """The real binary on a fixed port, so the clients reconnect to the same address."""

    def __init__(self, binary, port, log_path):
        self.binary = binary
        self.port = port
        self.log_path = log_path
        self.process = None

    def start(self, database, **settings):
        env = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL",)}
        env.update(
            JWT_SECRET=SECRET,
            DATABASE_PATH=database,
            GENERATOR_DELAY_MS=str(GENERATOR_DELAY_MS),
            SSE_KEEPALIVE_SECS="1",
            SSE_RETRY_MS=str(RETRY_MS),
            LOG_LEVEL="info",
        )
        env.update(settings)
        with open(self.log_path, "a") as log:
            log.write(f"--- start on {database}\n")
        self.process = subprocess.Popen(
            [self.binary, "--addr", f"127.0.0.1:{self.port}"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log_path, "a"),
        )

        def accepts():
            if self.process.poll() is not None:
                raise CheckFailed(f"the server exited with {self.process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until("the server to listen", accepts)

    def kill(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def request(self, method, path, token, body=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


class Client:
    """One client example, run as a newcomer would, its output collected line by line."""

    def __init__(self, name, command, cwd, env):
        self.name = name
        self.lines = []
        self.process = subprocess.Popen(
            command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def saw(self, text):
        return any(text in line for line in self.lines)

    def count(self, text):
        return sum(text in line for line in self.lines)

    def wait(self):
        try:
            status = self.process.wait(timeout=PATIENCE_SECS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise CheckFailed(f"{self.name} client did not exit within {PATIENCE_SECS} s")
        self.reader.join()
        return status

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def show(self):
        for line in self.lines:
            print(f"  {self.name}| {line}")


def start_clients(args, server, token, job_id, **settings):
    env = dict(os.environ, SERVER_URL=f"http://127.0.0.1:{server.port}", TOKEN=token, JOB_ID=job_id,
               TIMEOUT_SECS=str(PATIENCE_SECS), **settings)
    node = Client("node", ["node", "client.js"], os.path.join(ROOT, "examples/clients/node"), env)
    try:
        python = Client("python", [args.python, "client.py"], os.path.join(ROOT, "examples/clients/python"), env)
    except OSError:
        node.stop()
        raise
    return [node, python]


def wait_for(clients):
    """Each client's exit status (None if it did not exit in time), its output shown, none left running."""
    statuses = []
    try:
        for client in clients:
            try:
                statuses.append(client.wait())
            except CheckFailed:
                statuses.append(None)
    finally:
        stop(clients)
    return statuses


def stop(clients):
    """Ends every client still running, and shows what each printed."""
    for client in clients:
        client.stop()
        client.show()


def resumed_and_completed_once(client, status, job_id):
    """The failures of a client that should resume after its last id and exit 0 on completion."""
    failures = []
    if status != 0:
        failures.append(f"{client.name} exited {status}, not 0")
    completed = client.count(f"job {job_id}: completed [id ")
    if completed != 1:
        failures.append(f"{client.name} reported the completed event from the stream {completed} times, not once")
    if not client.saw("connected, resuming after "):
        failures.append(f"{client.name} did not reconnect with its last event id")
    return failures


def generate(server, token):
    status, body = server.request("POST", "/ai/artifact/generate", token, {
        "notebook_id": "nb1", "artifact_type": "quiz", "options": {"num_questions": 3}, "content": CONTENT,
    })
    if status != 202:
        raise CheckFailed(f"generate answered {status}: {body}")
    return body["job_id"]


def kill_while_running(server, token, job_id, clients):
    """SIGKILLs the server once each client has handled an event of the running job."""
    for client in clients:
        wait_until(f"{client.name} to handle an event of job {job_id}", lambda c=client: c.saw("[id "))
    status, job = server.request("GET", f"/ai/artifact/jobs/{job_id}", token)
    if job.get("status") != "running":
        raise CheckFailed(f"job {job_id} was {job.get('status')}, not running, when the server was to be killed")
    server.kill()
    print(f"killed the server (SIGKILL) while job {job_id} was running")


def crash_and_recovery(args, server, token, database):
    job_id = generate(server, token)
    clients = start_clients(args, server, token, job_id)
    try:
        kill_while_running(server, token, job_id, clients)
        server.start(database)
        wait_until(f"job {job_id} to complete after the restart",
                   lambda: server.request("GET", f"/ai/artifact/jobs/{job_id}", token)[1].get("status") == "completed")
        for client in clients:
            if client.saw("connected, resuming"):
                raise CheckFailed(f"{client.name} reconnected before the job completed: the replay went untested")
    except BaseException:
        stop(clients)
        raise
    statuses = wait_for(clients)
    failures = []
    for client, status in zip(clients, statuses):
        failures += resumed_and_completed_once(client, status, job_id)
    status, job = server.request("GET", f"/ai/artifact/jobs/{job_id}", token)
    if job.get("status") != "completed" or job.get("retry_count") != 1:
        failures.append(f"the job is {job.get('status')} with retry_count {job.get('retry_count')}, "
                        "not completed after one requeue")
    return failures


def lost_history(args, server, token, new_database):
    job_id = generate(server, token)
    clients = start_clients(args, server, token, job_id)
    try:
        kill_while_running(server, token, job_id, clients)
        server.start(new_database)
    except BaseException:
        stop(clients)
        raise
    statuses = wait_for(clients)
    failures = []
    for client, status in zip(clients, statuses):
        if status != 3:
            failures.append(f"{client.name} exited {status}, not 3 (job unknown)")
        if not client.saw("replay_incomplete after "):
            failures.append(f"{client.name} did not report replay_incomplete")
        if not client.saw(f"job {job_id}: the server answered 404"):
            failures.append(f"{client.name} did not refetch the job after replay_incomplete")
    return failures


def expiring_token(args, server, token, new_database):
    server.kill()
    # No leeway, and a job whose plan (an event with an id) comes at 3 s, before the clients'
    # 5-second token expires, and whose result comes at 6 s, after it.
    server.start(new_database, JWT_LEEWAY_SECS="0", GENERATOR_DELAY_MS="3000")
    job_id = generate(server, token)
    short = subprocess.run([args.binary, "token", USER, "--ttl", "5"], env=dict(os.environ, JWT_SECRET=SECRET),
                           check=True, capture_output=True, text=True).stdout.strip()
    renew = f"'{os.path.abspath(args.binary)}' token {USER}"
    clients = start_clients(args, server, short, job_id, JWT_SECRET=SECRET, TOKEN_COMMAND=renew)
    statuses = wait_for(clients)
    failures = []
    for client, status in zip(clients, statuses):
        failures += resumed_and_completed_once(client, status, job_id)
        if not client.saw("the token expired; renewed it with TOKEN_COMMAND"):
            failures.append(f"{client.name} did not renew its token")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", required=True, help="the server, built with --features sqlite")
    parser.add_argument("--python", required=True, help="a Python with the client's requirements")
    parser.add_argument("--work", required=True, help="a directory for the databases and the log")
    args = parser.parse_args()
    token = subprocess.run([args.binary, "token", USER], env=dict(os.environ, JWT_SECRET=SECRET),
                           check=True, capture_output=True, text=True).stdout.strip()
    server = Server(args.binary, free_port(), os.path.join(args.work, "server.log"))
    database = os.path.join(args.work, "jobs.db")
    results = []
    try:
        server.start(database)
        for name, scenario in [
            ("a job interrupted by SIGKILL completes, reported once", lambda: crash_and_recovery(args, server, token, database)),
            ("a lost history gives replay_incomplete and a refetch", lambda: lost_history(args, server, token, os.path.join(args.work, "new.db"))),
            ("an expired token is renewed, and the stream resumes without a loss", lambda: expiring_token(args, server, token, os.path.join(args.work, "renew.db"))),
        ]:
            print(f"== clients: {name}")
            try:
                failures = scenario()
            except (CheckFailed, OSError) as failure:
                failures = [str(failure)]
            for failure in failures:
                print(f"FAILED: {failure}")
            results.append(not failures)
    finally:
        server.kill()
    if not all(results):
        print("-- the server's log:")
        with open(server.log_path) as log:
            print(log.read())
    print(f"clients: {sum(results)} passed, {len(results) - sum(results)} failed")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
