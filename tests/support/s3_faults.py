"""A fault-injecting S3 endpoint for tests: an HTTP proxy on loopback in front of a real S3 server
(moto's), which passes every request through unless a rule picks it, and then answers it the way S3 or
the network fails: 503 SlowDown, 500 InternalError, 403 AccessDenied or InvalidAccessKeyId (a revoked or
wrong credential), 404 NoSuchBucket, a reset connection, or a delay before passing it on.

A rule picks requests by method and key (a regular expression on the path, bucket included) and then by
chance (`fraction`, from a seeded generator) or by count (`first`: the first N it matches, per key;
`after`: every one once N have matched, over all keys, or N of those matching `after_key`; `every`:
every N-th of each key). Each
rule counts the faults it injected, by key. `moto_behind_proxy` starts both, for the tests and the
benchmark's chaos suite (moto comes with the test and bench extras).

Test code: it lives here, out of the package, so neither the wheel nor the image carries it. The chaos
suite (app/bench/chaos.py) loads this file from the checkout it runs in.
"""

import contextlib
import http.client
import os
import subprocess
import sys
import http.server
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

SLOW_DOWN = "SlowDown"
INTERNAL_ERROR = "InternalError"
ACCESS_DENIED = "AccessDenied"
INVALID_ACCESS_KEY = "InvalidAccessKeyId"
NO_SUCH_BUCKET = "NoSuchBucket"
RESET = "reset"
DELAY = "delay"
# S3's answers: HTTP status and message, by error code.
ERROR_BODIES = {
    SLOW_DOWN: (503, "Please reduce your request rate."),
    INTERNAL_ERROR: (500, "We encountered an internal error. Please try again."),
    ACCESS_DENIED: (403, "Access Denied"),
    INVALID_ACCESS_KEY: (403, "The AWS Access Key Id you provided does not exist in our records."),
    NO_SUCH_BUCKET: (404, "The specified bucket does not exist"),
}
# Headers that belong to one hop of a connection, not to the request or response.
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class Rule:
    """Which requests fail and how: `fault` is an error code of ERROR_BODIES, RESET or DELAY (`delay_s`,
    then passed on). `key` is a regular expression searched in the request's path (/bucket/key)."""

    fault: str
    methods: tuple[str, ...] = ("GET",)
    key: str = ".*"
    fraction: float = 1.0
    first: Optional[int] = None  # only the first N matching requests of each key
    after: Optional[int] = None  # only once N matching requests (of any key) have passed...
    after_key: Optional[str] = None  # ... of those whose path this regular expression finds, when set
    every: Optional[int] = None  # only every N-th matching request of each key: the 1st, the N+1-th, ...
    delay_s: float = 0.0
    seed: int = 0
    injected: Counter = field(default_factory=Counter)  # faults by path
    seen: Counter = field(default_factory=Counter)  # matching requests by path

    def __post_init__(self):
        self.random = random.Random(self.seed)

    def picks(self, method: str, path: str) -> bool:
        if method not in self.methods or not re.search(self.key, path):
            return False
        self.seen[path] += 1
        if self.first is not None and self.seen[path] > self.first:
            return False
        if self.after is not None:
            counted = sum(n for seen, n in self.seen.items() if self.after_key is None or re.search(self.after_key, seen))
            if counted <= self.after:
                return False
        if self.every is not None and (self.seen[path] - 1) % self.every:
            return False
        if self.fraction < 1.0 and self.random.random() >= self.fraction:
            return False
        self.injected[path] += 1
        return True


class FaultProxy:
    """The proxy: `FaultProxy(upstream_port)`, its `endpoint` to give clients, `rules` to change at any time."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.rules: list[Rule] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_request(self):
                body = self.read_body()
                path = self.path.split("?", 1)[0]
                with proxy.lock:
                    rule = next((rule for rule in proxy.rules if rule.picks(self.command, path)), None)
                if rule is not None and rule.fault == RESET:
                    # SO_LINGER with a zero timeout: close() sends a TCP reset instead of a clean close.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if rule is not None and rule.fault in ERROR_BODIES:
                    return self.send_error_response(rule.fault)
                if rule is not None and rule.fault == DELAY:
                    time.sleep(rule.delay_s)
                self.pass_on(body)

            def read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []
                while True:  # HTTP/1.1 chunked transfer coding: hex size line, data, CRLF; size 0 ends it
                    size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline().strip():  # trailers, up to an empty line
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()

            def send_error_response(self, code: str):
                status, message = ERROR_BODIES[code]
                xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
                       f"<RequestId>fault-proxy</RequestId></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)

            def pass_on(self, body: bytes):
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {key: value for key, value in self.headers.items()
                           if key.lower() not in HOP_HEADERS and key.lower() != "content-length"}
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_HEADERS and key.lower() != "content-length":
                        self.send_header(key, value)
                # A HEAD's length is that of the object it describes, not of its (empty) body.
                length = response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_request

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def injected(self) -> Counter:
        """Faults injected so far, by path, over every rule."""
        with self.lock:
            return sum((rule.injected for rule in self.rules), Counter())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def moto_process(bucket: str):
    """moto's S3 server in a process of its own on loopback (a client that holds the GIL while it waits for
    an answer, as deltalake's does, would block a server thread of this process), with `bucket` created.
    Yields its port and a boto3 client that talks to it."""
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                              aws_access_key_id="test", aws_secret_access_key="test")
        deadline = time.monotonic() + 60
        while not bucket_created(client, bucket):
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto's S3 server did not answer on port {port} within 60 s")
            time.sleep(0.3)
        yield port, client
    finally:
        server.kill()


@contextlib.contextmanager
def moto_behind_proxy(bucket: str, keys: tuple[str, str] = ("test-key", "test-secret")):
    """moto's S3 server on loopback with `bucket` created, and a FaultProxy in front of it. The AWS
    variables point every client at the proxy while the context lasts (this process's, and those of Ray
    workers started meanwhile), with `keys` (access key id, secret). Yields the proxy and a boto3 client
    that talks to moto directly, never faulted (for putting the test's objects)."""
    with moto_process(bucket) as (port, client):
        proxy = FaultProxy(port)
        # Dummy keys for the stand-in endpoint, set the way a user sets real ones: in the environment.
        env = {"AWS_ACCESS_KEY_ID": keys[0], "AWS_SECRET_ACCESS_KEY": keys[1], "AWS_ENDPOINT_URL": proxy.endpoint,
               "AWS_REGION": "us-east-1"}
        try:
            with environment(env):
                yield proxy, client
        finally:
            proxy.close()


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """These environment variables set while the context lasts; each put back as it was after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def bucket_created(client, bucket: str) -> bool:
    try:
        client.create_bucket(Bucket=bucket)
    except Exception:  # the server is not up yet: connection refused, or an answer from a half-started server
        return False
    return True
