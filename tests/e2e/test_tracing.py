"""Observability end to end (issue 15): OpenTelemetry traces and metrics of the shim
through a real OTLP/HTTP receiver, the debug view of a live shim, SIGUSR1 dumps.

containerd sends its trace context to shims only from 2.0 on (containerd PR
#10186; never backported to 1.7), and only with its own tracing plugin on: under
1.6/1.7 the shim's RPC spans are roots. PYSHIM_E2E_CONTAINERD=/opt/ctrd/v2.2.7
runs the continuation check.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import trio

from tests.otlp_receiver import Receiver, Span

from .harness import RUNNING, STOPPED, Containerd, HarnessError, wait_until
from .test_spool import _read_to_eof

PYSHIM = "io.containerd.pyshim.v2"
TASK = "containerd.task.v2.Task"


class TracedContainerd(Containerd):
    """A private containerd whose own tracing plugins are on (the harness turns them
    off): 2.x then exports its spans and sends their context to the shims."""

    def write_config(self) -> None:
        super().write_config()
        text = self.config_path.read_text()
        for plugin in (
            "io.containerd.tracing.processor.v1.otlp",
            "io.containerd.internal.v1.tracing",
        ):
            text = text.replace(f'  "{plugin}",\n', "")
        self.config_path.write_text(text)


def otel_env(receiver: Receiver, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        # the shim's name even where containerd 2.x would give it its own ("containerd")
        "OTEL_SERVICE_NAME": "pyshim-e2e",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        **extra,
    }


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture(scope="module")
def traced(e2e_tools: None, receiver: Receiver) -> Iterator[Containerd]:
    c = TracedContainerd(extra_env=otel_env(receiver))
    try:
        c.start()
    except HarnessError as exc:
        c.stop()
        pytest.fail(f"private containerd did not start: {exc}", pytrace=False)
    yield c
    c.stop()


def ctr_ok(c: Containerd, *args: str, timeout: float = 30) -> str:
    r = c.ctr(*args, timeout=timeout)
    assert r.returncode == 0, f"ctr {' '.join(args)}: rc={r.returncode} {r.stderr!r}"
    return r.stdout


def shim_spans(receiver: Receiver, cid: str) -> dict[str, Span]:
    """The shim's spans of container ``cid``: its RPCs and the runc calls under them."""
    spans = [s for s in receiver.spans if s.scope == "pyshim"]
    ours = {s.trace_id for s in spans if cid in str(s.attributes.get("runc.args", ""))}
    return {s.name: s for s in spans if s.trace_id in ours}


def wait_spans(receiver: Receiver, cid: str, *names: str) -> dict[str, Span]:
    assert receiver.wait_for(lambda r: set(names) <= set(shim_spans(r, cid))), (
        f"spans of {cid} never arrived; have {sorted(shim_spans(receiver, cid))}"
    )
    return shim_spans(receiver, cid)


def assert_traceparent_of(seen: Path, span: Span, who: str) -> None:
    """The TRACEPARENT that ``who`` wrote to ``seen`` names ``span``."""
    traceparent = seen.read_text().strip()
    assert traceparent.startswith(f"00-{span.trace_id}-{span.span_id}-"), (
        f"{who} saw TRACEPARENT {traceparent!r}, not the span {span.name!r}"
    )


def run_detached(c: Containerd, rootfs: Path, cid: str, *cmd: str) -> psutil.Process:
    """``ctr run -d`` under pyshim; the container's shim daemon (its metrics' process.pid)."""
    ctr_ok(c, "run", "-d", "--runtime", PYSHIM, "--rootfs", str(rootfs), cid, *cmd)
    [shim] = c.shim_processes(cid)
    return shim


def test_span_tree_of_ctr_run(traced: Containerd, receiver: Receiver, rootfs: Path) -> None:
    cid = traced.new_id()
    out = ctr_ok(
        traced,
        "run",
        "--rm",
        "--runtime",
        PYSHIM,
        "--rootfs",
        str(rootfs),
        cid,
        "/bin/echo",
        "hello",
    )
    assert out.strip() == "hello"
    spans = wait_spans(
        receiver,
        cid,
        f"{TASK}/Create",
        f"{TASK}/Start",
        f"{TASK}/Delete",
        "runc create",
        "runc start",
        "runc delete",
    )
    for rpc, runc in (("Create", "create"), ("Start", "start"), ("Delete", "delete")):
        parent = spans[f"{TASK}/{rpc}"]
        child = spans[f"runc {runc}"]
        assert child.parent_id == parent.span_id, f"runc {runc} is not under {rpc}"
        assert child.trace_id == parent.trace_id
        assert parent.service == "pyshim-e2e"
        assert parent.start_ns <= child.start_ns <= child.end_ns <= parent.end_ns
    if traced.version[:2] < (2, 0):
        # containerd < 2.0 sends no trace context: the RPC spans are roots.
        for rpc in ("Create", "Start", "Delete"):
            assert spans[f"{TASK}/{rpc}"].parent_id == ""


def test_continues_containerds_trace(traced: Containerd, receiver: Receiver, rootfs: Path) -> None:
    version = ".".join(map(str, traced.version))
    if traced.version[:2] < (2, 0):
        pytest.skip(
            f"containerd {version} sends no trace context to shims (PR #10186 is in 2.0+, "
            "not in 1.7.x); run with PYSHIM_E2E_CONTAINERD=<a 2.x build dir>"
        )
    cid = traced.new_id()
    ctr_ok(traced, "run", "--rm", "--runtime", PYSHIM, "--rootfs", str(rootfs), cid, "/bin/true")
    create = wait_spans(receiver, cid, f"{TASK}/Create")[f"{TASK}/Create"]
    assert create.parent_id, "the shim's Create span is a root: no traceparent arrived"

    def parent_seen(r: Receiver) -> bool:
        return any(s.span_id == create.parent_id for s in r.spans)

    assert receiver.wait_for(parent_seen), "containerd never exported the parent span"
    parent = next(s for s in receiver.spans if s.span_id == create.parent_id)
    assert parent.trace_id == create.trace_id
    assert parent.scope != "pyshim"  # containerd's own ttrpc client span


def test_hooks_see_the_span_of_their_runc_call(
    traced: Containerd, receiver: Receiver, rootfs: Path, tmp_path: Path
) -> None:
    cid = traced.new_id()
    spec = json.loads(ctr_ok(traced, "oci", "spec"))
    spec["root"] = {"path": str(rootfs), "readonly": True}
    spec["process"]["args"] = ["/bin/true"]
    spec["process"]["terminal"] = False
    spec["linux"]["cgroupsPath"] = f"/{traced.namespace}/{cid}"

    def hook(name: str) -> dict[str, object]:
        # No "env": runc runs the hook with its own environment (Go's exec.Cmd with
        # a nil Env), where the shim put TRACEPARENT.
        out = tmp_path / name
        return {"path": "/bin/sh", "args": ["sh", "-c", f'echo "$TRACEPARENT" > {out}']}

    spec["hooks"] = {"createRuntime": [hook("createRuntime")], "poststop": [hook("poststop")]}
    config = tmp_path / "config.json"
    config.write_text(json.dumps(spec))
    ctr_ok(traced, "run", "--rm", "--runtime", PYSHIM, "--config", str(config), cid)
    spans = wait_spans(receiver, cid, "runc create", "runc delete")
    for hook_name, runc in (("createRuntime", "runc create"), ("poststop", "runc delete")):
        assert_traceparent_of(tmp_path / hook_name, spans[runc], f"the {hook_name} hook")


#: binary:// logger: fd 3 = stdout, fd 4 = stderr, ready once fd 5 is closed. Its
#: environment is the shim's choice (no PATH): what it sees of the trace is kept.
TRACE_LOGGER = """\
#!/bin/sh
out="$2"
echo "$TRACEPARENT" > "$out/traceparent"
/bin/cat <&3 >> "$out/output" 4<&- 5>&- &
/bin/cat <&4 >> "$out/output" 3<&- 5>&- &
exec 3<&- 4<&- 5>&-
wait
"""


def test_binary_logger_sees_its_span(
    traced: Containerd, receiver: Receiver, rootfs: Path, tmp_path: Path
) -> None:
    logger = tmp_path / "trace-logger"
    logger.write_text(TRACE_LOGGER)
    logger.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    uri = f"binary://{logger}?dir={out}"
    cid = traced.new_id()
    ctr_ok(
        traced, "run", "--rm", "--runtime", PYSHIM, "--log-uri", uri,
        "--rootfs", str(rootfs), cid, "/bin/echo", "logged",
    )  # fmt: skip
    name = f"logger {logger.name}"
    spans = wait_spans(receiver, cid, f"{TASK}/Create", name)
    create, span = spans[f"{TASK}/Create"], spans[name]
    assert (span.trace_id, span.parent_id) == (create.trace_id, create.span_id), (
        f"{name} is not under the Create of {cid}"
    )
    assert span.attributes.get("log.uri") == uri
    assert create.start_ns <= span.start_ns <= span.end_ns <= create.end_ns
    assert_traceparent_of(out / "traceparent", span, "the logger")
    output = out / "output"  # its copy of the container's output, once it got there
    wait_until(lambda: output.is_file() and output.read_bytes() == b"logged\n", 30, what="output")


def test_metrics_move(traced: Containerd, receiver: Receiver, rootfs: Path) -> None:
    cid = traced.new_id()
    shim = run_detached(traced, rootfs, cid, "/bin/sleep", "600")
    traced.wait_task_status(cid, RUNNING, timeout=10)

    def published(r: Receiver) -> float:
        return r.metric("pyshim.events.published", pid=shim.pid) or 0

    assert receiver.wait_for(lambda r: published(r) >= 2)  # create, start
    before = published(receiver)
    assert (receiver.metric("process.memory.usage", pid=shim.pid) or 0) > 0
    assert (receiver.metric("process.open_file_descriptor.count", pid=shim.pid) or 0) > 3
    assert receiver.metric("rpc.server.duration", pid=shim.pid, **{"rpc.method": "Create"}) == 1
    ctr_ok(traced, "task", "kill", "-s", "SIGKILL", cid)
    ctr_ok(traced, "task", "delete", cid)
    ctr_ok(traced, "container", "delete", cid)
    # The daemon's last export, at its exit: the exit and delete events, the exits reaped.
    assert receiver.wait_for(lambda r: published(r) >= before + 2)
    assert (receiver.metric("pyshim.exits.reaped", pid=shim.pid) or 0) >= 1
    assert receiver.metric("pyshim.events.dropped", pid=shim.pid) == 0
    assert receiver.metric("rpc.server.duration", pid=shim.pid, **{"rpc.method": "Delete"}) == 1


def test_spool_metrics_move(traced: Containerd, receiver: Receiver, rootfs: Path) -> None:
    """Output nobody reads is spooled (pyshim.spool.held); a reader drains it (delivered)."""
    cid = traced.new_id()
    # ctr -d is gone once the task started: nobody reads its stdout FIFO from then on,
    # which takes 64 KiB; the rest of the 3 MiB goes to the spool.
    shim = run_detached(traced, rootfs, cid, "/bin/head", "-c", str(3 << 20), "/dev/zero")

    def spool(r: Receiver, name: str) -> float:
        return r.metric(f"pyshim.spool.{name}", pid=shim.pid) or 0

    assert receiver.wait_for(lambda r: spool(r, "held") > 0), "nothing spooled"
    traced.wait_task_status(cid, STOPPED, timeout=30)  # the spool let it finish
    held, before = spool(receiver, "held"), spool(receiver, "delivered")
    [container] = shim_debug(traced, cid)["containers"]  # type: ignore[misc]
    stdout = Path(container["processes"][0]["stdio"]["stdout"])
    output = trio.run(_read_to_eof, stdout, 60)  # the reader is back: it gets the rest
    assert output and not output.strip(b"\0"), len(output)

    def drained(r: Receiver) -> bool:
        delivered = spool(r, "delivered")
        return delivered > before and delivered >= held and spool(r, "held") == 0

    assert receiver.wait_for(drained), (
        f"spool: held {spool(receiver, 'held')}, delivered {spool(receiver, 'delivered')}"
    )
    assert receiver.metric("pyshim.spool.dropped", pid=shim.pid) == 0
    ctr_ok(traced, "task", "delete", cid)
    ctr_ok(traced, "container", "delete", cid)


@pytest.mark.parametrize("collector", ["down", "slow"])
def test_collector_down_or_slow_costs_no_event(
    e2e_tools: None, rootfs: Path, collector: str
) -> None:
    receiver = Receiver(delay=3600 if collector == "slow" else 0)
    if collector == "down":
        receiver.close()  # its port now refuses connections
    c = Containerd(extra_env=otel_env(receiver, OTEL_METRIC_EXPORT_INTERVAL="100"))
    try:
        c.start()
        watcher = c.events()
        cid = c.new_id()
        for _ in range(3):
            out = ctr_ok(
                c,
                "run",
                "--rm",
                "--runtime",
                PYSHIM,
                "--rootfs",
                str(rootfs),
                cid,
                "/bin/echo",
                "through",
            )
            assert out.strip() == "through"
        topics = ("/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete")
        assert wait_until(
            lambda: all(
                sum(e.topic == t and cid in json.dumps(e.data) for e in watcher.events) == 3
                for t in topics
            ),
            timeout=30,
        ), f"events lost: {[e.topic for e in watcher.events]}"
        watcher.stop()
        if collector == "slow":
            assert receiver.requests == 0  # nothing got through, and nothing waited for it
    finally:
        c.stop()
        if collector == "slow":
            receiver.close()


# -- the debug view and SIGUSR1, with tracing off ----------------------------------------


def shim_debug(c: Containerd, cid: str) -> dict[str, object]:
    argv = [
        sys.executable,
        "-m",
        "shimv2.cli",
        "debug",
        "-id",
        cid,
        "-namespace",
        c.namespace,
        "-bundle",
        str(c.bundle_dir(cid)),
    ]
    r = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=30,
        env=c.env | {"PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert isinstance(data, dict)
    return data


def test_debug_view_of_a_live_shim(containerd: Containerd, rootfs: Path, cid: str) -> None:
    ctr_ok(
        containerd,
        "run",
        "-d",
        "--runtime",
        PYSHIM,
        "--rootfs",
        str(rootfs),
        cid,
        "/bin/sleep",
        "600",
    )
    containerd.wait_task_status(cid, RUNNING, timeout=10)
    pid = containerd.task_pid(cid)
    ctr_ok(containerd, "task", "exec", "--exec-id", "ex1", cid, "/bin/true")
    view = shim_debug(containerd, cid)
    [container] = view["containers"]  # type: ignore[misc]
    assert container["id"] == cid
    init = container["processes"][0]
    assert (init["state"], init["pid"], init["exit_status"]) == ("running", pid, None)
    assert init["stdio"]["terminal"] is False
    events = view["events"]
    # create, start, and the exec's added, started, exit (ctr deleted it since)
    assert events["counts"]["published"] >= 5  # type: ignore[index]
    assert cid in events["journals"]  # type: ignore[operator]
    assert view["connections"], "containerd's connection is not listed"
    # Tracing is off here: nothing of OpenTelemetry was ever imported by the daemon.
    assert view["tracing"] == {"enabled": False, "otel_modules": []}
    debug_socket = Path(str(containerd.shim_socket_path(cid)) + ".debug")
    assert stat.S_IMODE(os.stat(debug_socket).st_mode) == 0o600

    [shim] = containerd.shim_processes(cid)
    offset = containerd.log_size()
    os.kill(shim.pid, signal.SIGUSR1)
    assert wait_until(lambda: "SIGUSR1: trio tasks" in containerd.log_since(offset), timeout=10)
    dump = containerd.log_since(offset, max_lines=2000)
    assert "thread MainThread" in dump
    ctr_ok(containerd, "task", "kill", "-s", "SIGKILL", cid)
    containerd.wait_task_status(cid, STOPPED, timeout=10)
    ctr_ok(containerd, "task", "delete", cid)
    assert wait_until(lambda: not debug_socket.exists(), timeout=10)
