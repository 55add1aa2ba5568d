"""OpenTelemetry traces and metrics of the daemon, when configured; nothing when not.

Configured by the standard ``OTEL_*`` variables (containerd's environment reaches
the shim) or, at the first Create that carries them, by the runtime options'
``OtelEnv`` table (same names; shimv2.options). Export is OTLP over HTTP/protobuf
(the only protocol containerd's own exporter defaults to). This module imports
only the standard library: the OpenTelemetry SDK is imported by :func:`configure`
once tracing is on, so with tracing off nothing of it is ever loaded.

Spans:

* one per Task RPC (kind SERVER), the child of the ``traceparent`` containerd
  sends in the ttrpc metadata (2.x with its tracing plugin on), else a root;
* one per runc invocation and per ``binary://`` logger start-up, children of
  the RPC that drives them. Their context goes to the child as ``TRACEPARENT``
  / ``TRACESTATE`` in its environment (OTEP 258); runc runs OCI hooks that have
  no ``env`` of their own with its environment, so they see the span of the
  runc invocation that runs them.

Metrics come from the daemon's own counters (:func:`set_stats_source`), read
only when the exporter collects; RPC durations are recorded per call.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, TypeVar, cast

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "containerd-shim-pyshim-v2"
#: How long the daemon waits at exit for the last spans and metrics to go out.
SHUTDOWN_TIMEOUT = 2.0
_DEFAULT_ENDPOINT = "http://localhost:4318"
_TRUE = {"true", "1", "t", "yes", "on"}

#: name -> (kind, unit, description) of what :func:`set_stats_source` reports.
STATS: dict[str, tuple[str, str, str]] = {
    "pyshim.events.published": ("counter", "{event}", "task events queued for containerd"),
    "pyshim.events.journaled": ("counter", "{event}", "task events written to a journal"),
    "pyshim.events.retried": ("counter", "{attempt}", "failed deliveries, retried"),
    "pyshim.events.dropped": ("counter", "{event}", "task events never delivered"),
    "pyshim.events.queued": ("gauge", "{event}", "task events waiting for containerd"),
    "pyshim.spool.held": ("gauge", "By", "output spooled, waiting for a reader"),
    "pyshim.spool.delivered": ("counter", "By", "spooled output delivered to its reader"),
    "pyshim.spool.dropped": ("counter", "By", "spooled output dropped at the spool limit"),
    "pyshim.exits.reaped": ("counter", "{process}", "child exits reaped"),
    "process.memory.usage": ("gauge", "By", "resident set size of the shim daemon"),
    "process.open_file_descriptor.count": ("gauge", "{fd}", "open fds of the shim daemon"),
}

Stats = Callable[[], Mapping[str, int]]


class Span:
    """A span, or nothing (tracing off). ``env``: TRACEPARENT/TRACESTATE for a child."""

    env: Mapping[str, str] = MappingProxyType({})

    def end(self, error: BaseException | None = None) -> None:
        pass

    def __enter__(self) -> Span:
        return self

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        self.end(error)


NO_SPAN = Span()


class _Otel:
    """The SDK objects, once configured."""

    def __init__(self, settings: dict[str, str], stats: Stats | None) -> None:
        # Imported here only: this is the one place the SDK enters the process.
        from opentelemetry import context, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.trace import Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.context = context
        self.trace = trace
        self.status = Status
        self.error_code = StatusCode.ERROR
        self.kind_server = trace.SpanKind.SERVER
        self.propagator = TraceContextTextMapPropagator()
        # process.pid tells the shims apart (one daemon per container or pod).
        resource = Resource.create(
            {"service.name": settings["service_name"], "process.pid": os.getpid()}
        )
        self.tracer_provider: Any = None
        self.meter_provider: Any = None
        self.tracer: Any = None
        self.rpc_duration: Any = None
        timeout = float(settings["timeout"])
        if settings["traces"]:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            # Exports run in the processor's thread: a slow or absent collector
            # never holds up an RPC (spans past its queue are dropped instead).
            self.tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
            exporter = OTLPSpanExporter(endpoint=settings["traces"], timeout=timeout)
            self.tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
            self.tracer = self.tracer_provider.get_tracer("pyshim")
        if settings["metrics"]:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            reader = PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=settings["metrics"], timeout=timeout),
                export_interval_millis=float(settings["interval"]),
            )
            self.meter_provider = MeterProvider([reader], resource=resource, shutdown_on_exit=False)
            meter = self.meter_provider.get_meter("pyshim")
            self.rpc_duration = meter.create_histogram(
                "rpc.server.duration", unit="ms", description="Task API calls, by method"
            )
            if stats is not None:
                _observe(meter, stats)

    def start(
        self, name: str, *, parent: Any = None, start_time: int | None = None, server: bool = False
    ) -> Any:
        kind = self.kind_server if server else self.trace.SpanKind.INTERNAL
        return self.tracer.start_span(name, context=parent, kind=kind, start_time=start_time)

    def env_of(self, span: Any) -> dict[str, str]:
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=self.trace.set_span_in_context(span))
        return {key.upper(): value for key, value in carrier.items()}

    def finish(self, span: Any, error: BaseException | None) -> None:
        if error is not None:
            span.set_status(self.status(self.error_code, str(error)[:200] or type(error).__name__))
        span.end()

    def shutdown(self) -> None:
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                try:
                    provider.shutdown()
                except Exception:
                    log.exception("tracing: shutdown failed")


def _observe(meter: Any, stats: Stats) -> None:
    """One observable instrument per entry of STATS, read at collection time."""
    from opentelemetry.metrics import Observation

    def callback_for(name: str) -> Callable[[Any], list[Any]]:
        def callback(options: Any) -> list[Any]:
            try:
                value = stats().get(name)
            except Exception:  # in the reader's thread: never let it die
                return []
            return [] if value is None else [Observation(value)]

        return callback

    for name, (kind, unit, description) in STATS.items():
        create = (
            meter.create_observable_counter if kind == "counter" else meter.create_observable_gauge
        )
        create(name, callbacks=[callback_for(name)], unit=unit, description=description)


_otel: _Otel | None = None
_stats: Stats | None = None
_unavailable = False  # configured but the SDK is missing: warned once


def enabled() -> bool:
    return _otel is not None


def set_stats_source(stats: Stats) -> None:
    """What the metrics report (the daemon's counters); read only when exported."""
    global _stats
    _stats = stats


def settings(environ: Mapping[str, str]) -> dict[str, str] | None:
    """Exporter settings from ``OTEL_*`` variables; None when nothing is to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return None
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()

    def endpoint(signal: str) -> str:
        exporter = environ.get(f"OTEL_{signal.upper()}_EXPORTER", "otlp").strip().lower()
        if exporter == "none":
            return ""
        own = environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT", "").strip()
        if own:
            return own  # used as is, by the specification
        if base:
            return f"{base.rstrip('/')}/v1/{signal}"
        return ""

    traces, metrics = endpoint("traces"), endpoint("metrics")
    if not traces and not metrics:
        return None
    for signal in ("", "_TRACES", "_METRICS"):
        protocol = environ.get(f"OTEL_EXPORTER_OTLP{signal}_PROTOCOL", "").strip()
        if protocol not in ("", "http/protobuf"):
            raise ValueError(f"OTEL_EXPORTER_OTLP{signal}_PROTOCOL={protocol}: only http/protobuf")
    try:
        timeout = float(environ.get("OTEL_EXPORTER_OTLP_TIMEOUT", "") or 10000) / 1000
        interval = float(environ.get("OTEL_METRIC_EXPORT_INTERVAL", "") or 60000)
    except ValueError as exc:
        raise ValueError(f"bad OTEL_* number: {exc}") from None
    return {
        "traces": traces,
        "metrics": metrics,
        "service_name": environ.get("OTEL_SERVICE_NAME", "").strip() or DEFAULT_SERVICE_NAME,
        "timeout": str(timeout),
        "interval": str(interval),
    }


def configure(environ: Mapping[str, str], overrides: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on if ``environ`` (with ``overrides`` on top) asks for it; True if on.

    The first configuration wins: the daemon's providers are process-wide.
    """
    global _otel, _unavailable
    if _otel is not None:
        return True
    if _unavailable:
        return False
    merged = {**environ, **(overrides or {})}
    try:
        wanted = settings(merged)
    except ValueError as exc:
        _unavailable = True
        log.warning("tracing: not exporting: %s", exc)
        return False
    if wanted is None:
        return False
    try:
        _otel = _Otel(wanted, _stats)
    except ImportError as exc:
        _unavailable = True
        log.warning(
            "tracing is configured (%s) but the OpenTelemetry SDK is missing (%s): "
            "running untraced; install pyshim[otel]",
            wanted["traces"] or wanted["metrics"],
            exc,
        )
        return False
    log.info("tracing: exporting traces to %r, metrics to %r", wanted["traces"], wanted["metrics"])
    rpc = _RPC.get(None)
    if rpc is not None:  # configured by a Create's options: its span starts when it came in
        rpc.begin()
    return True


async def shutdown() -> None:
    """At daemon exit: send what is left, for at most SHUTDOWN_TIMEOUT seconds."""
    global _otel
    otel, _otel = _otel, None
    if otel is None:
        return
    import trio

    with trio.move_on_after(SHUTDOWN_TIMEOUT):
        await trio.to_thread.run_sync(otel.shutdown, abandon_on_cancel=True)


# -- spans ---------------------------------------------------------------------


class _LiveSpan(Span):
    def __init__(self, otel: _Otel, span: Any) -> None:
        self._otel = otel
        self._span = span
        self.env = MappingProxyType(otel.env_of(span))

    def end(self, error: BaseException | None = None) -> None:
        if self._span is not None:
            span, self._span = self._span, None
            self._otel.finish(span, error)


def start_span(name: str, **attributes: str | int) -> Span:
    """A child of the current RPC's span (a root outside one); NO_SPAN when off."""
    otel = _otel
    if otel is None or otel.tracer is None:
        return NO_SPAN
    span = otel.start(name)
    for key, value in attributes.items():
        span.set_attribute(key, value)
    return _LiveSpan(otel, span)


class _Rpc:
    """The span and timing of one Task RPC."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.started_ns = time.time_ns()
        self.started = time.perf_counter()
        self.span: Any = None
        self._token: Any = None
        if _otel is not None:
            self.begin()

    def begin(self) -> None:
        otel = _otel
        if otel is None or otel.tracer is None or self.span is not None:
            return
        # containerd >= 2.0 puts its span's traceparent/tracestate in the metadata.
        parent = otel.propagator.extract(self.ctx.metadata)
        self.span = otel.start(
            f"{self.ctx.service}/{self.ctx.method}",
            parent=parent,
            start_time=self.started_ns,
            server=True,
        )
        self.span.set_attribute("rpc.system", "ttrpc")
        self.span.set_attribute("rpc.service", self.ctx.service)
        self.span.set_attribute("rpc.method", self.ctx.method)
        self._token = otel.context.attach(otel.trace.set_span_in_context(self.span))

    def finish(self, error: BaseException | None) -> None:
        otel = _otel
        if otel is None:
            return
        if self._token is not None:
            otel.context.detach(self._token)
        if self.span is not None:
            otel.finish(self.span, error)
        if otel.rpc_duration is not None:
            attributes = {"rpc.service": self.ctx.service, "rpc.method": self.ctx.method}
            if error is not None:
                attributes["rpc.outcome"] = "error"
            otel.rpc_duration.record((time.perf_counter() - self.started) * 1000, attributes)


_RPC: contextvars.ContextVar[_Rpc] = contextvars.ContextVar("pyshim_rpc")

Handler = TypeVar("Handler", bound=Callable[..., Any])


def traced(handler: Handler, *, may_configure: bool = False) -> Handler:
    """Wrap a ttrpc handler ``(request, ctx)``, ``async def`` or plain: a span per
    call while tracing is on.

    ``may_configure``: the handler may turn tracing on (Create, from its options);
    its own span then starts at the time the call came in.
    """

    def off() -> bool:
        return _otel is None and (not may_configure or _unavailable)

    if inspect.iscoroutinefunction(handler):

        @functools.wraps(handler)
        async def run(request: Any, ctx: Any) -> Any:
            if off():
                return await handler(request, ctx)
            with _rpc(ctx):
                return await handler(request, ctx)

        return cast(Handler, run)

    @functools.wraps(handler)
    def run_now(request: Any, ctx: Any) -> Any:
        if off():
            return handler(request, ctx)
        with _rpc(ctx):
            return handler(request, ctx)

    return cast(Handler, run_now)


@contextlib.contextmanager
def _rpc(ctx: Any) -> Iterator[None]:
    rpc = _Rpc(ctx)
    token = _RPC.set(rpc)
    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        error = exc
        raise
    finally:
        _RPC.reset(token)
        rpc.finish(error)
