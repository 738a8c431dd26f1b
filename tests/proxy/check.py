"""Checks the event stream through a reverse proxy, over real TCP, with the standard library.

    python3 tests/proxy/check.py --url http://127.0.0.1:PORT --user USER \
        --token USER_JWT --publisher-token PUBLISHER_JWT [--h2-url https://127.0.0.1:PORT]

The server behind the proxy must send keepalives every second (SSE_KEEPALIVE_SECS=1). Checks:

1. no buffering: each published event reaches the open stream within 100 ms of the publish
   (a proxy that buffers holds events back until its buffer fills or the stream ends);
2. keepalive comments pass through;
3. a reconnect with Last-Event-ID through the proxy replays exactly the missed events, in
   order, with their original ids (a sentinel published after the reconnect ends the replay);
4. with --h2-url, the same stream over HTTP/2 with TLS (curl): the replay after an id, a live
   event and a keepalive.

Prints one line per check and exits 1 on the first failure.
"""

import argparse
import http.client
import json
import subprocess
import sys
import time
import urllib.parse

STREAM_PATH = "/ai/artifact/events/stream"
PUBLISH_PATH = "/ai/events/publish"
# The bound that shows the proxy does not buffer; a correctness check, not a benchmark.
ARRIVAL_LIMIT_SECS = 0.1
# Longest any single read may block: several keepalive intervals of the server under test.
READ_TIMEOUT_SECS = 5


class CheckFailed(Exception):
    """A check found the proxy misbehaving."""


class Stream:
    """One SSE response, read frame by frame (data, id, comments; the proxy must not alter them)."""

    def __init__(self, base, token, last_event_id=None):
        parts = urllib.parse.urlsplit(base)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=READ_TIMEOUT_SECS)
        self.keepalives = 0
        # Ask for compression as browsers do: a proxy that compresses the stream holds events
        # back until its compressor's buffer fills.
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "text/event-stream",
            "Accept-Encoding": "gzip, deflate, br",
        }
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self.conn.request("GET", STREAM_PATH, headers=headers)
        self.response = self.conn.getresponse()
        if self.response.status != 200:
            raise CheckFailed(f"stream answered {self.response.status}: {self.response.read()!r}")
        content_type = self.response.getheader("Content-Type", "")
        if not content_type.startswith("text/event-stream"):
            raise CheckFailed(f"stream content type is {content_type!r}")
        encoding = self.response.getheader("Content-Encoding")
        if encoding is not None:
            raise CheckFailed(f"the proxy compressed the stream ({encoding})")

    def next_frame(self):
        """The next frame as (id, data, comments); data is None for a comment-only frame."""
        event_id, data, comments = None, [], []
        while True:
            line = self.response.readline()
            if not line:
                raise CheckFailed("the stream ended")
            line = line.decode("utf-8").rstrip("\r\n")
            if line == "":
                if data or comments:
                    return event_id, ("\n".join(data) if data else None), comments
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "":
                comments.append(value)
            elif field == "data":
                data.append(value)
            elif field == "id":
                event_id = value

    def next_event(self):
        """The next frame that carries data, as (id, parsed JSON), counting keepalives on the way."""
        while True:
            event_id, data, comments = self.next_frame()
            self.keepalives += comments.count("keepalive")
            if data is not None:
                return event_id, json.loads(data)

    def close(self):
        self.conn.close()


def publish(base, publisher_token, user, marker):
    """Publishes one event for `user` through the proxy, tagged with `marker`."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=READ_TIMEOUT_SECS)
    body = json.dumps({"event_type": "proxy.check", "event_data": {"user_id": user, "marker": marker}})
    conn.request(
        "POST",
        PUBLISH_PATH,
        body=body,
        headers={"Authorization": f"Bearer {publisher_token}", "Content-Type": "application/json"},
    )
    response = conn.getresponse()
    answer = response.read()
    conn.close()
    if response.status != 202:
        raise CheckFailed(f"publish answered {response.status}: {answer!r}")


def expect_connected(stream, user):
    _, data = stream.next_event()
    if data != {"type": "connected", "user_id": user}:
        raise CheckFailed(f"first frame is {data}, not the connected frame")


def check_no_buffering(args, stream):
    """Publishes five events one by one; returns {marker: id} of what arrived."""
    ids = {}
    for marker in range(1, 6):
        started = time.monotonic()
        publish(args.url, args.publisher_token, args.user, marker)
        event_id, data = stream.next_event()
        elapsed = time.monotonic() - started
        if data.get("marker") != marker:
            raise CheckFailed(f"expected event {marker}, got {data}")
        if elapsed > ARRIVAL_LIMIT_SECS:
            raise CheckFailed(f"event {marker} took {elapsed * 1000:.1f} ms from publish to arrival")
        print(f"  event {marker} arrived {elapsed * 1000:.1f} ms after its publish (id {event_id})")
        ids[marker] = event_id
    return ids


def check_keepalives(stream):
    seen_before = stream.keepalives
    while stream.keepalives < seen_before + 2:
        event_id, data, comments = stream.next_frame()
        if data is not None:
            raise CheckFailed(f"unexpected event {data} while waiting for keepalives")
        stream.keepalives += comments.count("keepalive")
    print(f"  {stream.keepalives - seen_before} keepalive comments arrived through the proxy")


def check_replay(args, ids):
    """Reconnects after event 2, with 6 to 8 published meanwhile: expects exactly 3 to 8."""
    for marker in (6, 7, 8):
        publish(args.url, args.publisher_token, args.user, marker)
    stream = Stream(args.url, args.token, last_event_id=ids[2])
    expect_connected(stream, args.user)
    publish(args.url, args.publisher_token, args.user, "sentinel")
    replayed = []
    while True:
        event_id, data = stream.next_event()
        if data.get("marker") == "sentinel":
            break
        replayed.append((data.get("marker", data.get("type")), event_id))
    stream.close()
    markers = [marker for marker, _ in replayed]
    if markers != [3, 4, 5, 6, 7, 8]:
        raise CheckFailed(f"reconnecting after event 2 replayed {markers}, not [3, 4, 5, 6, 7, 8]")
    for marker, event_id in replayed:
        if marker in ids and ids[marker] != event_id:
            raise CheckFailed(f"event {marker} came back with id {event_id}, first sent as {ids[marker]}")
    print(f"  Last-Event-ID {ids[2]} replayed exactly events {markers}, in order, then live events")
    return dict(replayed)


def check_http2(args, ids):
    """The stream over HTTP/2 with TLS, through curl (the standard library speaks only HTTP/1.1)."""
    command = [
        "curl", "--http2", "-k", "-sS", "-N", "-D", "-", "--max-time", "20",
        "-H", f"Authorization: Bearer {args.token}", "-H", f"Last-Event-ID: {ids[7]}",
        args.h2_url + STREAM_PATH,
    ]
    curl = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        status = curl.stdout.readline().strip()
        if not status.startswith("HTTP/2 200"):
            raise CheckFailed(f"over TLS the stream answered {status!r}, not HTTP/2 200")
        lines = []
        published = False
        while ": keepalive" not in lines or not any('"marker":"h2"' in line for line in lines):
            line = curl.stdout.readline()
            if not line:
                raise CheckFailed(f"the HTTP/2 stream ended early: {lines}")
            lines.append(line.rstrip("\n"))
            if not published and any('"marker":"sentinel"' in line for line in lines):
                publish(args.url, args.publisher_token, args.user, "h2")
                published = True
        data = [line for line in lines if line.startswith("data:")]
        markers = [json.loads(line[5:]).get("marker", "connected") for line in data]
        if markers != ["connected", 8, "sentinel", "h2"]:
            raise CheckFailed(f"over HTTP/2, Last-Event-ID {ids[7]} gave {markers}, not connected, 8, sentinel, h2")
        print(f"  over HTTP/2 (TLS): {status}, Last-Event-ID {ids[7]} replayed events 8 and sentinel, then a live event and a keepalive arrived")
    finally:
        curl.kill()
        curl.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the proxy, http://HOST:PORT")
    parser.add_argument("--user", required=True)
    parser.add_argument("--token", required=True, help="a token for --user")
    parser.add_argument("--publisher-token", required=True)
    parser.add_argument("--h2-url", help="the proxy's TLS side, https://HOST:PORT")
    args = parser.parse_args()
    try:
        stream = Stream(args.url, args.token)
        expect_connected(stream, args.user)
        print("(a) published events arrive at once:")
        ids = check_no_buffering(args, stream)
        print("(b) keepalives pass:")
        check_keepalives(stream)
        stream.close()
        print("(c) a reconnect with Last-Event-ID replays what was missed:")
        ids.update(check_replay(args, ids))
        if args.h2_url:
            print("(d) HTTP/2 towards the client:")
            check_http2(args, ids)
    except (CheckFailed, OSError, http.client.HTTPException) as failure:
        print(f"FAILED: {failure}")
        sys.exit(1)
    print(f"all checks passed through {args.url}")


if __name__ == "__main__":
    main()
