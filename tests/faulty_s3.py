"""A fault-injecting HTTP proxy in front of the local S3 server: the first attempt of every distinct
request fails (HTTP 503 SlowDown, HTTP 500 InternalError or a connection reset, in turn); a retry of the
same request goes through. Code that works through it retries every single S3 call it makes.

Written by hand because the point is to misbehave in controlled ways, which no proxy library offers.
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import http.server
import socket
import struct
import threading
from urllib.parse import urlparse

FAULTS = ("503", "500", "reset")


class FaultyS3Proxy:
    def __init__(self, upstream: str):
        self.upstream = urlparse(upstream)
        self.injected: collections.Counter = collections.Counter()
        self.forwarded = 0
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._fault_for(self.command, self.path, body)
                if fault == "reset":
                    # RST instead of FIN: the client sees "connection reset by peer"
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault:
                    code = int(fault)
                    name = "SlowDown" if code == 503 else "InternalError"
                    payload = f"<Error><Code>{name}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD answer has headers only
                        self.wfile.write(payload)
                    return
                self._forward(body)

            def _forward(self, body: bytes) -> None:
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # HEAD: the object's length as upstream reported it (there is no body to measure)
                length = response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(payload))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                conn.close()
                with proxy._lock:
                    proxy.forwarded += 1

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # clients dropping connections after an injected reset are expected

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _fault_for(self, method: str, path: str, body: bytes) -> str | None:
        identity = hashlib.sha256(method.encode() + path.encode() + body).hexdigest()
        with self._lock:
            if identity in self._seen:
                return None
            self._seen.add(identity)
            fault = FAULTS[len(self._seen) % len(FAULTS)]
            self.injected[fault] += 1
            return fault

    def __enter__(self) -> "FaultyS3Proxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
