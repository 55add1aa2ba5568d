"""A small OTLP/HTTP receiver for the tests: an http.server on 127.0.0.1 that
decodes opentelemetry-proto ExportTraceServiceRequest / ExportMetricsServiceRequest.

``delay`` makes every answer late (a slow collector); ``close()`` then a new
``Receiver(port=...)`` is a collector that went away and came back.
"""

from __future__ import annotations

import gzip
import http.server
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    service: str
    scope: str  # "pyshim" for the shim's spans
    resource: dict[str, Any]
    attributes: dict[str, Any]
    error: bool
    start_ns: int
    end_ns: int


@dataclass
class Point:
    name: str
    value: float  # the sum or gauge value; a histogram's count
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


class Receiver:
    def __init__(self, delay: float = 0.0, port: int = 0) -> None:
        self.delay = delay
        self.spans: list[Span] = []
        self.points: list[Point] = []
        self.requests = 0
        self._cond = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if receiver.delay:
                    time.sleep(receiver.delay)
                if self.path == "/v1/traces":
                    receiver._traces(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                    answer = trace_service_pb2.ExportTraceServiceResponse()
                elif self.path == "/v1/metrics":
                    receiver._metrics(
                        metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
                    )
                    answer = metrics_service_pb2.ExportMetricsServiceResponse()
                else:
                    self.send_error(404)
                    return
                data = answer.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _traces(self, req: Any) -> None:
        spans = []
        for rs in req.resource_spans:
            resource = _attrs(rs.resource.attributes)
            service = str(resource.get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        Span(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            service=service,
                            scope=ss.scope.name,
                            resource=resource,
                            attributes=_attrs(s.attributes),
                            error=s.status.code == 2,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                        )
                    )
        with self._cond:
            self.requests += 1
            self.spans += spans
            self._cond.notify_all()

    def _metrics(self, req: Any) -> None:
        points = []
        for rm in req.resource_metrics:
            resource = _attrs(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    for dp in getattr(m, kind).data_points:
                        if kind == "histogram":
                            value: float = dp.count
                        else:
                            value = (
                                dp.as_int if dp.WhichOneof("value") == "as_int" else dp.as_double
                            )
                        points.append(Point(m.name, value, _attrs(dp.attributes), resource))
        with self._cond:
            self.requests += 1
            self.points += points
            self._cond.notify_all()

    def wait_for(self, check: Callable[[Receiver], bool], timeout: float = 30.0) -> bool:
        """Poll ``check`` on every export until it holds (False if it never did)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not check(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def metric(self, name: str, pid: int | None = None, **attributes: Any) -> float | None:
        """The latest value of ``name`` with these attributes (from process ``pid``);
        None if never seen."""
        with self._cond:
            matches = [
                p
                for p in self.points
                if p.name == name
                and all(p.attributes.get(k) == v for k, v in attributes.items())
                and (pid is None or p.resource.get("process.pid") == pid)
            ]
        return matches[-1].value if matches else None

    def spans_named(self, name: str, scope: str | None = None) -> list[Span]:
        with self._cond:
            return [s for s in self.spans if s.name == name and scope in (None, s.scope)]
