"""shimv2.tracing: nothing of OpenTelemetry when off; spans, context propagation and
metrics through a real OTLP/HTTP receiver when on."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from shimv2 import options, tracing
from tests.otlp_receiver import Receiver

PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


def otel_modules_after(code: str, env: dict[str, str] | None = None) -> list[str]:
    probe = (
        f"{code}\nimport json, sys\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('opentelemetry'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env
    )
    return list(json.loads(out.stdout.splitlines()[-1]))


def test_off_imports_nothing_of_opentelemetry() -> None:
    # The daemon's whole module set, a configure() without OTEL_* and a traced call.
    code = (
        "import os, trio\n"
        "import shimv2.daemon, shimv2.service, shimv2.debug, shimv2.runc, shimv2.stdio\n"
        "from shimv2 import tracing\n"
        "assert not tracing.configure({'PATH': '/bin'})\n"
        "async def handler(req, ctx):\n"
        "    with tracing.start_span('runc create') as span:\n"
        "        assert not span.env\n"
        "    return req\n"
        "class Ctx: service='s'; method='Create'; metadata={}\n"
        "assert trio.run(tracing.traced(handler, may_configure=True), 1, Ctx()) == 1\n"
    )
    assert otel_modules_after(code, env={"PATH": "/usr/bin:/bin"}) == []


def test_settings_follow_the_otel_variables() -> None:
    assert tracing.settings({}) is None
    assert tracing.settings({"OTEL_SERVICE_NAME": "x"}) is None
    s = tracing.settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318/"})
    assert s is not None
    assert s["traces"] == "http://h:4318/v1/traces"
    assert s["metrics"] == "http://h:4318/v1/metrics"
    assert s["service_name"] == tracing.DEFAULT_SERVICE_NAME
    s = tracing.settings(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_SERVICE_NAME": "shim",
        }
    )
    assert s is not None
    assert (s["traces"], s["metrics"], s["service_name"]) == ("http://t/x", "", "shim")
    assert (
        tracing.settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h", "OTEL_SDK_DISABLED": "true"})
        is None
    )
    with pytest.raises(ValueError, match="http/protobuf"):
        tracing.settings(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
        )


def test_missing_sdk_warns_once_and_runs_untraced() -> None:
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format='W %(message)s')\n"
        "sys.modules['opentelemetry'] = None  # as if pyshim[otel] were not installed\n"
        "from shimv2 import tracing\n"
        "env = {'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://127.0.0.1:9'}\n"
        "assert not tracing.configure(env)\n"
        "assert not tracing.configure(env, {'OTEL_SERVICE_NAME': 'again'})\n"
        "assert tracing.start_span('runc start') is tracing.NO_SPAN\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    warnings = [line for line in out.stdout.splitlines() if line.startswith("W ")]
    assert len(warnings) == 1, out.stdout
    assert "pyshim[otel]" in warnings[0]


def test_runtime_option_otel_env() -> None:
    opts = options.from_toml('[OtelEnv]\nOTEL_EXPORTER_OTLP_ENDPOINT = "http://127.0.0.1:4318"\n')
    assert opts.otel_env == {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert options.ShimOptions.from_json(opts.to_json()).otel_env == opts.otel_env
    with pytest.raises(ValueError, match="OTEL_"):
        options.from_toml('[OtelEnv]\nPATH = "/bin"\n')


# -- on, against a receiver -------------------------------------------------------


@dataclass
class Ctx:
    method: str
    metadata: dict[str, list[str]] = field(default_factory=dict)
    service: str = "containerd.task.v2.Task"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
def fresh_tracing() -> Iterator[None]:
    yield
    if tracing._otel is not None:
        tracing._otel.shutdown()
    tracing._otel = None
    tracing._unavailable = False
    tracing._stats = None


def env_for(receiver: Receiver) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "unit"}


async def test_rpc_span_continues_the_callers_trace(
    receiver: Receiver, fresh_tracing: None
) -> None:
    counts = {"pyshim.events.published": 3, "pyshim.exits.reaped": 2}
    tracing.set_stats_source(lambda: counts)
    assert tracing.configure(env_for(receiver))
    seen: dict[str, str] = {}

    async def handler(request: int, ctx: Ctx) -> int:
        with tracing.start_span("runc create", **{"runc.args": "create x"}) as span:
            seen.setdefault("TRACEPARENT", span.env["TRACEPARENT"])
        return request

    traceparent = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"
    await tracing.traced(handler)(1, Ctx("Create", {"traceparent": [traceparent]}))
    await tracing.traced(handler)(2, Ctx("Start"))  # no context: a root
    await tracing.shutdown()

    rpc = receiver.spans_named("containerd.task.v2.Task/Create")[0]
    assert (rpc.trace_id, rpc.parent_id) == (PARENT_TRACE, PARENT_SPAN)
    assert rpc.service == "unit"
    assert rpc.attributes["rpc.method"] == "Create"
    runc = next(s for s in receiver.spans_named("runc create") if s.trace_id == PARENT_TRACE)
    assert runc.parent_id == rpc.span_id
    # What runc (and its hooks) got: the runc span itself, sampled.
    assert seen["TRACEPARENT"].startswith(f"00-{PARENT_TRACE}-{runc.span_id}-")
    start = receiver.spans_named("containerd.task.v2.Task/Start")[0]
    assert start.parent_id == "" and start.trace_id != PARENT_TRACE

    assert receiver.metric("pyshim.events.published") == 3
    assert receiver.metric("pyshim.exits.reaped") == 2
    assert receiver.metric("rpc.server.duration", **{"rpc.method": "Create"}) == 1


async def test_failed_call_marks_its_span(receiver: Receiver, fresh_tracing: None) -> None:
    assert tracing.configure(env_for(receiver))

    async def handler(request: int, ctx: Ctx) -> int:
        raise RuntimeError("runc said no")

    with pytest.raises(RuntimeError):
        await tracing.traced(handler)(1, Ctx("Kill"))
    await tracing.shutdown()
    assert receiver.spans_named("containerd.task.v2.Task/Kill")[0].error


async def test_create_options_turn_tracing_on_for_that_create(
    receiver: Receiver, fresh_tracing: None, caplog: pytest.LogCaptureFixture
) -> None:
    async def create(request: int, ctx: Ctx) -> int:
        # What TaskService.create does with OtelEnv from the runtime options.
        assert tracing.configure({}, env_for(receiver))
        with tracing.start_span("runc create"):
            pass
        return request

    caplog.set_level(logging.INFO)
    await tracing.traced(create, may_configure=True)(1, Ctx("Create"))
    await tracing.shutdown()
    rpc = receiver.spans_named("containerd.task.v2.Task/Create")[0]
    assert receiver.spans_named("runc create")[0].parent_id == rpc.span_id


async def test_receiver_down_costs_nothing_but_the_spans(fresh_tracing: None) -> None:
    with Receiver() as gone:
        endpoint = gone.endpoint  # a port nobody listens on any more
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_TIMEOUT": "500"}
    assert tracing.configure(env)

    async def handler(request: int, ctx: Ctx) -> int:
        with tracing.start_span("runc start"):
            return request

    for i in range(50):
        assert await tracing.traced(handler)(i, Ctx("State")) == i
    await tracing.shutdown()  # bounded by SHUTDOWN_TIMEOUT
