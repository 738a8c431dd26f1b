"""Follows one artifact job over the event stream until it ends, with the README's recovery
recipe ("Recovery, for client authors"), on httpx and httpx-sse:

    TOKEN=<JWT> JOB_ID=<job id> [SERVER_URL=http://127.0.0.1:8000] [TIMEOUT_SECS=120] \
        [TOKEN_COMMAND='a shell command that prints a fresh token'] python client.py

Prints one line per job event it handles. Exit status: 0 once the job completed, failed or was
cancelled; 1 when TIMEOUT_SECS pass first; 2 for bad arguments; 3 when the server refuses the
token or does not know the job, or the token expired without TOKEN_COMMAND.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse

import httpx
from httpx_sse import connect_sse

TERMINAL = {"completed", "failed", "cancelled"}
# Connecting and fetching a job must each be quick; a stream must only hear something (an
# event or a keepalive, every 30 s by default) within READ_TIMEOUT_SECS.
CONNECT_TIMEOUT_SECS = 10
READ_TIMEOUT_SECS = 75


def say(line):
    print(line, flush=True)


class Done(Exception):
    """The client has its answer; `status` is the exit status."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


class TokenExpired(Exception):
    """The server ended the stream because its token expired (step 5 of the recipe)."""


def kind_of(event):
    """The kind of a job event: the stream has no `event:` line, so the fields tell."""
    if "result" in event:
        return "completed"
    if "error" in event:
        return "failed"
    if event.get("status") == "cancelled":
        return "cancelled"
    if "progress" in event:
        return f"progress {event['progress']}"
    if event.get("status") == "running":
        return "started"
    return None


class JobFollower:
    """The recipe's state: the last event id, what was reported, and whether to refetch."""

    def __init__(self, client, job_id):
        self.client = client
        self.job_id = job_id
        # The id of the last event handled: a reconnect asks for everything after it.
        self.last_event_id = None
        # What has been reported, as (job id, kind): after a refetch, or when a job is rerun
        # after a server restart, the stream repeats kinds that were already reported.
        self.reported = set()
        # Set while a fetch of the job's state was needed (events may have been missed) and
        # has not succeeded yet.
        self.must_refetch = False

    def report(self, kind, how):
        if (self.job_id, kind) in self.reported:
            return
        self.reported.add((self.job_id, kind))
        say(f"job {self.job_id}: {kind} {how}")
        if kind in TERMINAL:
            raise Done(0)

    def refetch(self, why):
        """Brings the job's state up to date when the stream cannot vouch for what was missed."""
        say(f"{why}: fetching job {self.job_id}")
        self.must_refetch = True
        try:
            response = self.client.get(f"/ai/artifact/jobs/{urllib.parse.quote(self.job_id, safe='')}")
            body = response.json()
        except (httpx.HTTPError, ValueError) as error:
            say(f"fetching job {self.job_id} failed ({error!r}); will fetch again on the next connect")
            return
        if response.status_code in (401, 403, 404):
            say(f"job {self.job_id}: the server answered {response.status_code}: {body.get('error')}")
            raise Done(3)
        if response.status_code != 200:
            say(f"fetching job {self.job_id} answered {response.status_code}; will fetch again on the next connect")
            return
        self.must_refetch = False
        if body["status"] in TERMINAL:
            self.report(body["status"], "(fetched)")
        else:
            say(f"job {self.job_id}: {body['status']} (fetched)")

    def handle(self, sse):
        event = json.loads(sse.data)
        if event.get("type") == "connected":
            say(f"connected, resuming after {self.last_event_id}" if self.last_event_id else "connected")
            # Without a last id the stream brings only what happens from now on.
            if self.last_event_id is None:
                self.refetch("no last event id")
            elif self.must_refetch:
                self.refetch("an earlier fetch failed")
            return
        if event.get("type") == "token_expired":
            raise TokenExpired()
        if event.get("type") == "replay_incomplete":
            self.refetch(f"replay_incomplete after {event['last_event_id']}")
            return
        if sse.id:
            self.last_event_id = sse.id
        if event.get("job_id") != self.job_id:
            return
        kind = kind_of(event)
        if kind:
            self.report(kind, f"[id {sse.id}]")

    def follow(self):
        """Streams until the job ends, reconnecting with Last-Event-ID after every failure."""
        retry_ms = 2000
        while True:
            headers = {"Accept": "text/event-stream"}
            if self.last_event_id:
                headers["Last-Event-ID"] = self.last_event_id
            try:
                with connect_sse(self.client, "GET", "/ai/artifact/events/stream", headers=headers) as source:
                    status = source.response.status_code
                    if status in (401, 403):
                        say(f"the server refused the token ({status})")
                        raise Done(3)
                    if status != 200:
                        say(f"the server answered {status}; reconnecting in {retry_ms} ms")
                    else:
                        for sse in source.iter_sse():
                            if sse.retry:
                                retry_ms = sse.retry
                            if sse.data:
                                self.handle(sse)
                        say(f"the server ended the stream; reconnecting in {retry_ms} ms")
            except httpx.TransportError as error:
                say(f"connection lost ({type(error).__name__}); reconnecting in {retry_ms} ms")
            except TokenExpired:
                self.renew_token()
                continue
            time.sleep(retry_ms / 1000)

    def renew_token(self):
        """Gets a fresh token from TOKEN_COMMAND; the next connect asks for what came since."""
        command = os.environ.get("TOKEN_COMMAND")
        if not command:
            say("the token expired; set TOKEN_COMMAND to renew it")
            raise Done(3)
        renewed = subprocess.run(command, shell=True, capture_output=True, text=True)
        if renewed.returncode != 0 or not renewed.stdout.strip():
            say(f"the token expired, and TOKEN_COMMAND failed (exit {renewed.returncode})")
            raise Done(3)
        self.client.headers["Authorization"] = f"Bearer {renewed.stdout.strip()}"
        say("the token expired; renewed it with TOKEN_COMMAND, resuming")


def main():
    server_url = os.environ.get("SERVER_URL", "http://127.0.0.1:8000").rstrip("/")
    token = os.environ.get("TOKEN")
    job_id = os.environ.get("JOB_ID")
    try:
        timeout_secs = int(os.environ.get("TIMEOUT_SECS", "120"))
    except ValueError:
        timeout_secs = 0
    if not token or not job_id or timeout_secs <= 0:
        print("usage: TOKEN=<JWT> JOB_ID=<job id> [SERVER_URL=URL] [TIMEOUT_SECS=120] python client.py", file=sys.stderr)
        sys.exit(2)
    # One deadline for the whole run, however the time is spent (reading, fetching, waiting).
    def give_up(_signal, _frame):
        say(f"gave up: no final event for job {job_id} within {timeout_secs} s")
        os._exit(1)

    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(timeout_secs)
    timeout = httpx.Timeout(CONNECT_TIMEOUT_SECS, read=READ_TIMEOUT_SECS)
    with httpx.Client(base_url=server_url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout) as client:
        try:
            JobFollower(client, job_id).follow()
        except Done as done:
            sys.exit(done.status)


if __name__ == "__main__":
    main()
