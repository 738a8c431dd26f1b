"""A webhook receiver that verifies every request with the `standardwebhooks` package (PyPI),
an implementation of the Standard Webhooks specification independent of this server's.

Protocol with the test that runs it: it binds 127.0.0.1:0 and prints `port <n>`; it then reads
the secret (`whsec_...`) as one line on stdin; for each request it answers 204 and prints
`verified <the payload as JSON>` if the signature verifies, else 401 and `refused <reason>`.
It exits when stdin closes.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from standardwebhooks.webhooks import Webhook

secret = None


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            payload = Webhook(secret).verify(body, headers)
        except Exception as error:  # the library raises its own WebhookVerificationError
            self.send_response(401)
            self.end_headers()
            print("refused", type(error).__name__, error, flush=True)
            return
        self.send_response(204)
        self.end_headers()
        print("verified", json.dumps(payload), flush=True)

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", 0), Handler)
print("port", server.server_address[1], flush=True)
secret = sys.stdin.readline().strip()
threading.Thread(target=server.serve_forever, daemon=True).start()
sys.stdin.read()
