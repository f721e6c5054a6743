"""S3 faults below botocore's retry handler: proof that its retries really happen.

Two ways to put the same :class:`FaultPlan` between fleece and an S3 server:

- :func:`inject_http_faults` hooks one :class:`~fleece.repo.s3_backend.S3Backend`'s
  botocore client at ``before-send`` (in-process tests). Each HTTP attempt
  botocore makes passes the hook, so retried attempts are counted one by one.
- :class:`S3FaultProxy` is an HTTP proxy on loopback in front of a real
  endpoint (moto); point ``AWS_ENDPOINT_URL`` at it and a ``fleece``
  subprocess meets real TCP resets, stalls and error statuses.

Faults a plan can hold: 5xx/4xx statuses with an S3 error code, connection
resets, read timeouts, replies lost after the server acted, GET bodies cut
off halfway, one bit flipped in a response body (after the server computed
its checksum) or in a request body (after botocore computed its), slowness,
and an outage that fails everything until it is switched off.
"""

from __future__ import annotations

import http.client
import io
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    from botocore.awsrequest import AWSResponse

    from fleece.repo.backends.s3 import S3Backend

CODES = {400: "BadRequest", 403: "AccessDenied", 409: "Conflict", 500: "InternalError",
         501: "NotImplemented", 502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout"}
"""The S3 error code a bare status stands for (S3 itself says ``SlowDown`` for throttling)."""
_KINDS = ("resets", "timeouts", "lost_replies", "body_resets", "corrupt_responses", "corrupt_requests")


@dataclass
class FaultPlan:
    """Which HTTP attempts misbehave, and what was seen.

    Each matching attempt (operation in ``ops``, e.g. ``{"PutObject"}``;
    None: all) takes the next fault: first ``statuses`` one by one (``503``
    or ``(503, "SlowDown")``), then ``resets``, ``timeouts``,
    ``lost_replies``, ``body_resets``, ``corrupt_responses``,
    ``corrupt_requests`` (counts). Then attempts pass untouched. ``outage``
    (a status, ``"reset"`` or, for the hook, ``"refused"``) fails every
    matching attempt while set; ``slow`` delays each matching attempt. All
    attributes may be changed while the plan is in use. ``empty_messages``
    sends error documents the way Ceph RGW does, with an empty message.
    """

    statuses: deque[tuple[int, str]] = field(default_factory=deque)
    resets: int = 0
    timeouts: int = 0
    lost_replies: int = 0
    body_resets: int = 0
    corrupt_responses: int = 0
    corrupt_requests: int = 0
    outage: int | str | None = None
    slow: float = 0.0
    ops: frozenset[str] | None = None
    empty_messages: bool = False
    """Error documents carry an empty ``<Message/>``, as Ceph RGW sends them."""
    requests: Counter[str] = field(default_factory=Counter)
    """HTTP attempts per S3 operation name (``PutObject``…), injected ones included."""
    injected: Counter[str] = field(default_factory=Counter)
    """Faults injected, by kind: ``status``, ``outage``, ``resets``, ``timeouts``, ``lost_replies``…"""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def of(cls, *, statuses: Sequence[int | tuple[int, str]] = (), resets: int = 0, timeouts: int = 0,
           lost_replies: int = 0, body_resets: int = 0, corrupt_responses: int = 0,
           corrupt_requests: int = 0, outage: int | str | None = None, slow: float = 0.0,
           ops: Collection[str] | None = None) -> FaultPlan:
        """A plan from plain arguments (statuses as ints or ``(status, code)`` pairs)."""
        return cls(deque((s, CODES.get(s, "InternalError")) if isinstance(s, int) else s for s in statuses),
                   resets, timeouts, lost_replies, body_resets, corrupt_responses, corrupt_requests,
                   outage, slow, frozenset(ops) if ops is not None else None)

    def matches(self, op: str) -> bool:
        """Whether faults apply to operation ``op``."""
        return self.ops is None or op in self.ops

    def next_fault(self, op: str) -> tuple[str, tuple[int, str] | None] | None:
        """Count one attempt of ``op``; return the fault it gets, if any."""
        with self._lock:
            self.requests[op] += 1
            if not self.matches(op):
                return None
            if self.outage is not None:
                self.injected["outage"] += 1
                return "outage", None
            if self.statuses:
                self.injected["status"] += 1
                return "status", self.statuses.popleft()
            for kind in _KINDS:
                if getattr(self, kind):
                    setattr(self, kind, getattr(self, kind) - 1)
                    self.injected[kind] += 1
                    return kind, None
            return None

    def outage_status(self) -> tuple[int, str]:
        """The (status, code) an outage answers with."""
        status = self.outage if isinstance(self.outage, int) else 503
        return status, CODES.get(status, "InternalError")


def error_body(status: int, code: str, method: str, empty_message: bool = False) -> bytes:
    """An S3 error document (HEAD responses carry none); ``empty_message``: ``<Message/>``."""
    if method == "HEAD":
        return b""
    message = "<Message/>" if empty_message else f"<Message>injected {status}</Message>"
    return (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
            f"{message}</Error>").encode()


def flip_a_bit(data: bytes) -> bytes:
    """``data`` with one bit in the middle flipped."""
    if not data:
        return data
    out = bytearray(data)
    out[len(out) // 2] ^= 0x01
    return bytes(out)


# -- in process: a botocore before-send hook --------------------------------------------
class _Body(io.BytesIO):
    """A response body for botocore: urllib3's ``stream``, and a reset after ``fail_at`` bytes."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        super().__init__(data)
        self.fail_at = fail_at

    def read(self, size: int | None = -1, /) -> bytes:
        if self.fail_at is not None:
            if self.tell() >= self.fail_at:
                from urllib3.exceptions import ProtocolError

                raise ProtocolError("Connection broken: injected reset")
            if size is None or size < 0 or self.tell() + size > self.fail_at:
                size = self.fail_at - self.tell()
        return super().read(size)

    def stream(self, amt: int = 1024, decode_content: bool | None = None) -> Iterator[bytes]:
        while chunk := self.read(amt):
            yield chunk


@dataclass
class HttpFaults(FaultPlan):
    """A :class:`FaultPlan` installed on one client by :func:`inject_http_faults`."""

    _unregister: Any = field(default=None, repr=False)
    _http: Any = field(default=None, repr=False)

    def remove(self) -> None:
        """Take the hook off the client again."""
        if self._unregister is not None:
            self._unregister()
            self._unregister = None

    def __enter__(self) -> HttpFaults:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def handle(self, request: Any, event_name: str, **_: Any) -> AWSResponse | None:
        """The ``before-send`` handler: None lets the real request go out."""
        from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

        op = event_name.rsplit(".", 1)[-1]
        fault = self.next_fault(op)
        if self.slow and self.matches(op):
            time.sleep(self.slow)
        if fault is None:
            return None
        kind, answer = fault
        if kind == "outage" and self.outage in ("reset", "refused"):
            if self.outage == "refused":
                raise EndpointConnectionError(endpoint_url=request.url, error="injected outage")
            raise ConnectionClosedError(endpoint_url=request.url)
        if kind in ("outage", "status"):
            status, code = answer or self.outage_status()
            return self._response(request, status, {"Content-Type": "application/xml"},
                                  error_body(status, code, request.method, self.empty_messages))
        if kind == "resets" or (kind == "body_resets" and not request.stream_output):
            # botocore reads small bodies itself and reports a reset there as this.
            raise ConnectionClosedError(endpoint_url=request.url)
        if kind == "timeouts":
            raise ReadTimeoutError(endpoint_url=request.url)
        if kind == "corrupt_requests":
            body = request.body.read() if hasattr(request.body, "read") else request.body
            request.body = flip_a_bit(body or b"")
            return None
        resp, data = self._send(request)
        if kind == "lost_replies":
            raise ConnectionClosedError(endpoint_url=request.url)
        if kind == "corrupt_responses":
            data = flip_a_bit(data)
        return self._response(request, resp.status_code, dict(resp.headers.items()), data,
                              len(data) // 2 if kind == "body_resets" else None)

    @staticmethod
    def _response(request: Any, status: int, headers: dict[str, str], body: bytes,
                  fail_at: int | None = None) -> AWSResponse:
        from botocore.awsrequest import AWSResponse

        if request.method != "HEAD":
            headers["Content-Length"] = str(len(body))
        hdrs: Any = headers
        return AWSResponse(request.url, status, hdrs, _Body(body, fail_at))

    def _send(self, request: Any) -> tuple[AWSResponse, bytes]:
        """Send ``request`` for real, on a connection pool of our own."""
        from botocore.httpsession import URLLib3Session

        with self._lock:
            if self._http is None:
                self._http = URLLib3Session()
        resp: AWSResponse = self._http.send(request)
        return resp, resp.raw.read() if request.method != "HEAD" else b""


def inject_http_faults(backend: S3Backend, *, statuses: Sequence[int | tuple[int, str]] = (),
                       resets: int = 0, timeouts: int = 0, lost_replies: int = 0, body_resets: int = 0,
                       corrupt_responses: int = 0, corrupt_requests: int = 0,
                       outage: int | str | None = None, slow: float = 0.0,
                       ops: Collection[str] | None = None, empty_messages: bool = False) -> HttpFaults:
    """Hook ``backend``'s S3 client so that its next HTTP attempts misbehave (see :class:`FaultPlan`).

    Returns the installed :class:`HttpFaults`: ``requests`` counts every
    HTTP attempt per operation, with no faults at all it is a request
    counter; ``remove()`` (or ``with``) uninstalls.
    """
    plan = FaultPlan.of(statuses=statuses, resets=resets, timeouts=timeouts, lost_replies=lost_replies,
                        body_resets=body_resets, corrupt_responses=corrupt_responses,
                        corrupt_requests=corrupt_requests, outage=outage, slow=slow, ops=ops)
    plan.empty_messages = empty_messages
    faults = HttpFaults(**{f: getattr(plan, f) for f in FaultPlan.__dataclass_fields__})
    events: Any = backend.client.meta.events
    uid = f"fleece-faults-{id(faults)}"
    events.register_first("before-send.s3", faults.handle, unique_id=uid)
    faults._unregister = lambda: events.unregister("before-send.s3", unique_id=uid)
    return faults


# -- out of process: an HTTP proxy on loopback -------------------------------------------
def s3_operation(method: str, target: str) -> str:
    """The S3 operation a path-style request is (for the operations fleece uses)."""
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    on_bucket = "/" not in parts.path.strip("/")
    if method == "POST" and "delete" in query:
        return "DeleteObjects"
    if on_bucket:
        if method == "GET" and "versions" in query:
            return "ListObjectVersions"
        if method == "GET" and "object-lock" in query:
            return "GetObjectLockConfiguration"
        return {"GET": "ListObjectsV2" if "list-type" in query else "ListObjects",
                "PUT": "CreateBucket", "HEAD": "HeadBucket", "DELETE": "DeleteBucket"}.get(method, method)
    if method == "PUT" and "retention" in query:
        return "PutObjectRetention"
    return {"GET": "GetObject", "PUT": "PutObject", "HEAD": "HeadObject",
            "DELETE": "DeleteObject"}.get(method, method)


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    plan: FaultPlan
    upstream: tuple[str, int]
    hang: float

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # resets we inject ourselves are no news


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._proxy()

    do_PUT = do_HEAD = do_POST = do_DELETE = do_GET

    def _reset(self) -> None:
        # SO_LINGER 0: close sends RST, what a dying middlebox or server does.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes, cut: bool = False) -> None:
        self.send_response_only(status)
        for name, value in headers:
            if name.lower() not in ("connection", "transfer-encoding", "keep-alive", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", headers_length(headers, body, self.command))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body[: len(body) // 2] if cut else body)
        if cut:
            self.wfile.flush()
            self._reset()

    def _proxy(self) -> None:
        plan = self.server.plan
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        op = s3_operation(self.command, self.path)
        fault = plan.next_fault(op)
        if plan.slow and plan.matches(op):
            time.sleep(plan.slow)
        kind, answer = fault or ("", None)
        if (kind == "outage" and plan.outage in ("reset", "refused")) or kind == "resets":
            return self._reset()
        if kind in ("outage", "status"):
            status, code = answer or plan.outage_status()
            return self._reply(status, [("Content-Type", "application/xml")],
                               error_body(status, code, self.command, plan.empty_messages))
        if kind == "timeouts":
            time.sleep(self.server.hang)  # longer than the client's read timeout
            return self._reset()
        if kind == "corrupt_requests":
            body = flip_a_bit(body)
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            upstream_headers = resp.getheaders()
        finally:
            conn.close()
        if kind == "lost_replies":
            return self._reset()
        if kind == "corrupt_responses":
            data = flip_a_bit(data)
        self._reply(resp.status, upstream_headers, data, cut=kind == "body_resets" and bool(data))


def headers_length(headers: list[tuple[str, str]], body: bytes, method: str) -> str:
    """Content-Length to send: the upstream's for HEAD (the object's size), else the body's."""
    if method == "HEAD":
        return next((v for k, v in headers if k.lower() == "content-length"), "0")
    return str(len(body))


class S3FaultProxy:
    """An HTTP proxy on 127.0.0.1 that applies a :class:`FaultPlan` to requests for ``upstream``.

    Only for servers that do not check signatures (moto): requests are
    signed for the proxy's address. ``timeouts`` hold a request ``hang``
    seconds, then reset it; set the client's read timeout below that
    (``FLEECE_S3_READ_TIMEOUT``).
    """

    def __init__(self, upstream: str, plan: FaultPlan | None = None, *, hang: float = 3.0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"S3FaultProxy needs an http:// upstream, not {upstream!r}")
        self.plan = plan or FaultPlan()
        self._server = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.plan = self.plan
        self._server.upstream = (parts.hostname, parts.port or 80)
        self._server.hang = hang
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy",
                                        daemon=True)

    def start(self) -> S3FaultProxy:
        """Start serving; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
