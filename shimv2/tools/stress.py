"""Kill containerd with SIGKILL again and again while containers live, and check
that every task comes out right.

    python -m shimv2.tools.stress --runtime io.containerd.pyshim.v2 --cycles 100
    python -m shimv2.tools.stress --runtime io.containerd.runc.v2 --cycles 100   # compare

Needs root, containerd, ctr, runc and a static busybox. Everything runs in a
private containerd (`shimv2.tools.containerd`: own root, state, sockets,
config and namespace under ``/tmp/pyshim-stress-*``); the system containerd
and other shims are never touched. The shim binary for ``--runtime`` is
looked up next to this Python (a venv's ``bin``), then on ``PATH``, then in
the system dirs, and its directory goes first on containerd's ``PATH``.

One cycle
---------
Containers in different phases are in flight when containerd is killed
(``--containers-per-cycle``, default one of each role):

``start``        ``ctr run -d`` issued shortly before the kill: the kill lands
                 somewhere in container create, shim start, task create or
                 start (or just after); the process writes, then exits.
``exec``         a running container gets ``ctr task exec`` shortly before the
                 kill; the exec writes, then waits for a trigger that comes
                 during the outage or after the restart (so its ``ctr`` dies
                 with containerd and the exit is checked through the shim).
``output``       writes 240 KiB paced over ~0.6 s, started just before the
                 kill, so the output spans the outage.
``exit-down``    exits while containerd is down.
``exit-before``  exits just before the kill (its events are in flight).

Plus one ``long`` container that lives through every cycle and writes a chunk
every 0.1 s. After ``kill -9`` containerd stays down for a random outage
(``--max-outage``), is restarted with the same dirs, and the tool checks:

* every task seen before the kill is still there, same pid, same shim
  process(es), state only moved forward (CREATED→RUNNING→STOPPED); no task
  appeared that nobody created;
* every process that ran exits exactly once with its chosen code, and every
  process that provably never ran (an interrupted create/exec) reports nothing;
* every output byte arrived: stdout and stderr go to a ``file://`` log URI per
  process, so the reader (the shim's file) is independent of ``ctr``, which
  dies with containerd (see ctr-quirks);
* after deletion: no shim process of this containerd (identified by
  ``-address <private socket>``), no socket in /run/containerd/s, no runc state,
  no bundle left.

How exits are counted
---------------------
*received* means the exit status came back through an authoritative path:
``ctr task rm`` for an init (containerd asks the shim; ctr prints a non-zero
status), ``ctr task exec``'s own exit code when that ``ctr`` survived, else the
shim's ``State`` for the exec over ttrpc. *Exit events* are counted twice:
``ctr events`` subscribers (one per containerd incarnation, restarted after
each restart; a subscriber cannot see what was published while it was down)
attribute each ``/tasks/exit`` to its process, and two of them for one
process is a duplicate; and containerd's own debug log, which survives the
restarts, says how many ``/tasks/exit`` events the shims forwarded in our
namespace over the whole run: that number must equal the number of exits
(fewer = lost, more = duplicated). ``/tasks/exit`` events containerd made up
itself (it does that for a shim it lost) are failures too.

The summary goes to stdout (``--json`` for machines); progress to stderr.
The exit status is 0 only if everything was consistent (1: inconsistencies,
2: could not run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shimv2.tools.containerd import (
    CREATED,
    PAUSED,
    RUNNING,
    STOPPED,
    ContainerdError,
    EventWatcher,
    PrivateContainerd,
    busybox_rootfs,
    exit_code_from_task_rm,
    shim_binary_name,
    system_path,
)

__all__ = [
    "Observations",
    "Output",
    "ProcRecord",
    "StressOptions",
    "Summary",
    "attach_exit_events",
    "count_log_exit_events",
    "evaluate",
    "format_summary",
    "main",
    "output_problem",
    "run_stress",
]

ROLES = ("start", "exec", "output", "exit-down", "exit-before")
PYSHIM_RUNTIME = "io.containerd.pyshim.v2"

#: one output line: 63 pattern bytes and a newline (stdout "o", stderr "e")
LINE_LEN = 64
OUT_LINE = b"o" * (LINE_LEN - 1)
ERR_LINE = b"e" * (LINE_LEN - 1)

#: exit status of a SIGKILLed process (an interrupted create we kill ourselves)
SIGKILL_STATUS = 128 + signal.SIGKILL
#: ``ctr`` and containerd need a moment to settle; nothing waits longer than this
OP_TIMEOUT = 20.0
TASK_TOPIC_EXIT = "/tasks/exit"


# =========================================================================== model
# Pure data and the consistency rules; no I/O (unit-tested with made-up data).


@dataclass
class Output:
    """Output a process is expected to write: *out_lines* pattern lines on stdout,
    *err_lines* on stderr (interleaved in any way in the shared log file), then
    *trailer* at the very end."""

    out_lines: int = 0
    err_lines: int = 0
    trailer: str = ""

    @property
    def size(self) -> int:
        return (self.out_lines + self.err_lines) * LINE_LEN + len(self.trailer.encode())


def output_problem(expected: Output | None, data: bytes) -> str | None:
    """None if *data* is exactly the expected output (``None``: nothing at all)."""
    if expected is None:
        return None if not data else f"{len(data)} bytes from a process that never ran"
    body = data
    if expected.trailer:
        trailer = expected.trailer.encode()
        if not data.endswith(trailer):
            return (
                f"missing trailer {expected.trailer!r} (got {len(data)} bytes, ends {data[-20:]!r})"
            )
        body = data[: -len(trailer)]
    o, e, nl = body.count(b"o"), body.count(b"e"), body.count(b"\n")
    other = len(body) - o - e - nl
    want = (expected.out_lines * (LINE_LEN - 1), expected.err_lines * (LINE_LEN - 1))
    want_nl = expected.out_lines + expected.err_lines
    if (o, e, nl, other) == (*want, want_nl, 0):
        return None
    return (
        f"got {len(data)} bytes, expected {expected.size}: stdout bytes {o}/{want[0]}, "
        f"stderr bytes {e}/{want[1]}, newlines {nl}/{want_nl}, foreign bytes {other}"
    )


@dataclass
class ProcRecord:
    """One process (an init or an exec) and what was observed about it."""

    cycle: int
    cid: str
    exec_id: str = ""
    role: str = ""
    #: exit status the process must report; None: it provably never ran, so no
    #: exit (and no output) may be reported for it
    expected_code: int | None = None
    #: what it must have written (None: nothing)
    output: Output | None = None
    #: exit status seen through an authoritative path (task rm, ctr exec, shim State)
    received_code: int | None = None
    code_source: str = ""
    received_bytes: int = 0
    #: None = output as expected, else what is wrong with it
    output_error: str | None = None
    #: exit_status of every /tasks/exit event the subscribers attributed to this process
    exit_events: list[int] = field(default_factory=list)
    #: how the run went for this process (human-readable, for failure reports)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.cid}/{self.exec_id}" if self.exec_id else self.cid

    @property
    def event_key(self) -> tuple[str, str]:
        """(container_id, id) of its /tasks/exit events (id = container id for the init)."""
        return (self.cid, self.exec_id or self.cid)


@dataclass
class Observations:
    """Everything a run saw; `evaluate` turns it into a `Summary`."""

    runtime: str
    cycles: int
    containers: int = 0
    restarts: int = 0
    seed: int = 0
    duration_s: float = 0.0
    records: list[ProcRecord] = field(default_factory=list)
    #: task state after a restart that does not match the state before it
    inconsistencies: list[str] = field(default_factory=list)
    stray_shims: list[str] = field(default_factory=list)
    leaked_sockets: list[str] = field(default_factory=list)
    leaked_runc_state: list[str] = field(default_factory=list)
    leaked_bundles: list[str] = field(default_factory=list)
    #: /tasks/exit events a subscriber saw for no process we know of (or one that never ran)
    unexpected_exit_events: list[str] = field(default_factory=list)
    #: /tasks/exit events forwarded by shims to containerd (its log); None = not countable
    forwarded_exit_events: int | None = None
    #: /tasks/exit events containerd published itself (for a shim it lost)
    synthesized_exit_events: int | None = None
    #: operations that failed outside the kill window (a ctr that should have worked)
    errors: list[str] = field(default_factory=list)


@dataclass
class Summary:
    runtime: str
    cycles: int
    containers: int
    restarts: int
    seed: int
    duration_s: float
    processes: int
    #: processes whose start/exec the kill interrupted before they ran
    processes_not_run: int
    exits_expected: int
    exits_received: int
    exits_lost: int
    exits_wrong_code: int
    exits_duplicate: int
    exits_unexpected: int
    exit_events_seen: int
    exit_events_wrong_code: int
    exit_events_forwarded: int | None
    exit_events_synthesized: int | None
    bytes_expected: int
    bytes_received: int
    stray_shims: list[str]
    leaked_sockets: list[str]
    leaked_runc_state: list[str]
    leaked_bundles: list[str]
    inconsistencies: list[str]
    failures: list[str]
    #: failure kind (the module's constants) -> how many
    failure_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def attach_exit_events(
    records: Iterable[ProcRecord], events: Iterable[dict[str, Any]]
) -> list[str]:
    """Give each record the exit_status of its ``/tasks/exit`` events (the event
    ``data`` dicts, as ``ctr events`` prints them); returns descriptions of
    exit events that belong to no record."""
    by_key = {r.event_key: r for r in records}
    unknown = []
    for data in events:
        cid = str(data.get("container_id", ""))
        key = (cid, str(data.get("id") or cid))
        status = int(data.get("exit_status", 0))  # proto3: absent = 0
        rec = by_key.get(key)
        if rec is None:
            unknown.append(f"/tasks/exit for unknown process {key[0]}/{key[1]} status {status}")
        else:
            rec.exit_events.append(status)
    return unknown


_FORWARDED_RE = re.compile(r'msg="event (forwarded|published)" ns=(\S+) topic=(\S+)')


def count_log_exit_events(log_text: str, namespace: str) -> tuple[int, int]:
    """(forwarded, published) ``/tasks/exit`` events in *namespace* according to
    containerd's debug log: *forwarded* came from shims (``Events.Forward``),
    *published* were made up by containerd itself."""
    forwarded = published = 0
    for m in _FORWARDED_RE.finditer(log_text):
        kind, ns, topic = m.groups()
        if ns != namespace or topic != TASK_TOPIC_EXIT:
            continue
        if kind == "forwarded":
            forwarded += 1
        else:
            published += 1
    return forwarded, published


#: failure kinds (`Summary.failure_kinds`), so callers can tell known limitations apart
EXIT_LOST = "exit status lost"
EXIT_WRONG = "wrong exit status"
EXIT_UNEXPECTED = "exit of a process that never ran"
EVENT_DUPLICATE = "duplicate exit event"
EVENT_WRONG = "exit event with a wrong status"
EVENTS_LOST = "exit events lost"
EVENTS_DUPLICATED = "exit events duplicated"
EVENTS_MADE_UP = "exit events made up by containerd"
OUTPUT = "output"
INCONSISTENT = "inconsistent after restart"
STRAY_SHIM = "stray shim"
LEAK = "leaked socket/runc state/bundle"
INTERRUPTED_CREATE_LEFTOVER = "leftover of a create the kill interrupted"
ERROR = "error"
#: marks a leftover that belongs to a container whose create the kill interrupted
INTERRUPTED_MARK = "create interrupted by the kill"


def evaluate(obs: Observations) -> Summary:
    """Apply the consistency rules to what a run observed."""
    failures: list[str] = []
    kinds: dict[str, int] = {}

    def fail(kind: str, msg: str) -> None:
        failures.append(msg)
        kinds[kind] = kinds.get(kind, 0) + 1

    expected = received = lost = wrong = dup = unexpected = 0
    ev_seen = ev_wrong = 0
    bytes_expected = bytes_received = 0
    for r in obs.records:
        where = f"cycle {r.cycle} {r.role} {r.name}"
        notes = f" [{'; '.join(r.notes)}]" if r.notes else ""
        if r.expected_code is None:
            if r.received_code is not None:
                unexpected += 1
                fail(
                    EXIT_UNEXPECTED,
                    f"{where}: never ran, yet exit {r.received_code} ({r.code_source}){notes}",
                )
            if r.exit_events:
                unexpected += 1
                fail(EXIT_UNEXPECTED, f"{where}: never ran, yet /tasks/exit {r.exit_events}{notes}")
        else:
            expected += 1
            if r.received_code is None:
                lost += 1
                fail(
                    EXIT_LOST,
                    f"{where}: exit status never received (want {r.expected_code}){notes}",
                )
            else:
                received += 1
                if r.received_code != r.expected_code:
                    wrong += 1
                    fail(
                        EXIT_WRONG,
                        f"{where}: exit {r.received_code} ({r.code_source}), "
                        f"want {r.expected_code}{notes}",
                    )
            if r.exit_events:
                ev_seen += 1
            if len(r.exit_events) > 1:
                dup += len(r.exit_events) - 1
                fail(EVENT_DUPLICATE, f"{where}: {len(r.exit_events)} /tasks/exit {r.exit_events}")
            bad = [s for s in r.exit_events if s != r.expected_code]
            if bad:
                ev_wrong += len(bad)
                fail(EVENT_WRONG, f"{where}: /tasks/exit with status {bad}, want {r.expected_code}")
            if r.output is not None:
                bytes_expected += r.output.size
        bytes_received += r.received_bytes
        if r.output_error is not None:
            fail(OUTPUT, f"{where}: output: {r.output_error}{notes}")
    if obs.forwarded_exit_events is not None and obs.forwarded_exit_events != expected:
        diff = obs.forwarded_exit_events - expected
        if diff > 0:
            dup = max(dup, diff)
        fail(
            EVENTS_DUPLICATED if diff > 0 else EVENTS_LOST,
            f"containerd got {obs.forwarded_exit_events} /tasks/exit events from shims for "
            f"{expected} exits ({'duplicated' if diff > 0 else 'lost'}: {abs(diff)})",
        )
    if obs.synthesized_exit_events:
        fail(
            EVENTS_MADE_UP,
            f"containerd made up {obs.synthesized_exit_events} /tasks/exit event(s) itself "
            "(it lost the shim)",
        )
    unexpected += len(obs.unexpected_exit_events)
    for x in obs.unexpected_exit_events:
        fail(EXIT_UNEXPECTED, x)
    for x in obs.inconsistencies:
        fail(INCONSISTENT, f"after restart: {x}")
    for label, items, kind in (
        ("stray shim", obs.stray_shims, STRAY_SHIM),
        ("leaked socket", obs.leaked_sockets, LEAK),
        ("leaked runc state", obs.leaked_runc_state, LEAK),
        ("leaked bundle", obs.leaked_bundles, LEAK),
    ):
        for x in items:
            fail(INTERRUPTED_CREATE_LEFTOVER if INTERRUPTED_MARK in x else kind, f"{label}: {x}")
    for x in obs.errors:
        fail(ERROR, f"error: {x}")
    return Summary(
        runtime=obs.runtime,
        cycles=obs.cycles,
        containers=obs.containers,
        restarts=obs.restarts,
        seed=obs.seed,
        duration_s=round(obs.duration_s, 1),
        processes=len(obs.records),
        processes_not_run=sum(1 for r in obs.records if r.expected_code is None),
        exits_expected=expected,
        exits_received=received,
        exits_lost=lost,
        exits_wrong_code=wrong,
        exits_duplicate=dup,
        exits_unexpected=unexpected,
        exit_events_seen=ev_seen,
        exit_events_wrong_code=ev_wrong,
        exit_events_forwarded=obs.forwarded_exit_events,
        exit_events_synthesized=obs.synthesized_exit_events,
        bytes_expected=bytes_expected,
        bytes_received=bytes_received,
        stray_shims=list(obs.stray_shims),
        leaked_sockets=list(obs.leaked_sockets),
        leaked_runc_state=list(obs.leaked_runc_state),
        leaked_bundles=list(obs.leaked_bundles),
        inconsistencies=list(obs.inconsistencies),
        failures=failures,
        failure_kinds=kinds,
    )


def format_summary(s: Summary, max_failures: int = 30) -> str:
    """The human-readable table."""

    def na(v: int | None) -> str:
        return "n/a" if v is None else str(v)

    rows = [
        ("runtime", s.runtime),
        ("cycles (containerd kill -9 + restart)", f"{s.cycles} ({s.restarts} restarts)"),
        ("containers / processes (never ran)",
         f"{s.containers} / {s.processes} ({s.processes_not_run})"),
        ("exits expected / received", f"{s.exits_expected} / {s.exits_received}"),
        ("exits lost / wrong code", f"{s.exits_lost} / {s.exits_wrong_code}"),
        ("exits duplicate / unexpected", f"{s.exits_duplicate} / {s.exits_unexpected}"),
        ("exit events seen by ctr events",
         f"{s.exit_events_seen} (wrong code {s.exit_events_wrong_code})"),
        ("exit events forwarded to containerd", na(s.exit_events_forwarded)),
        ("exit events made up by containerd", na(s.exit_events_synthesized)),
        ("bytes expected / received", f"{s.bytes_expected} / {s.bytes_received}"),
        ("stray shims", str(len(s.stray_shims))),
        ("leaked sockets / runc state / bundles",
         f"{len(s.leaked_sockets)} / {len(s.leaked_runc_state)} / {len(s.leaked_bundles)}"),
        ("inconsistent tasks after restart", str(len(s.inconsistencies))),
        ("seed / duration", f"{s.seed} / {s.duration_s:.1f} s"),
        ("result", "OK" if s.ok else f"FAILED ({len(s.failures)} problems)"),
    ]  # fmt: skip
    if s.failure_kinds:
        rows.append(
            ("problems by kind", ", ".join(f"{k}: {v}" for k, v in s.failure_kinds.items()))
        )
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    if s.failures:
        lines.append("failures:")
        lines += [f"  - {f}" for f in s.failures[:max_failures]]
        if len(s.failures) > max_failures:
            lines.append(f"  ... and {len(s.failures) - max_failures} more (see --json)")
    return "\n".join(lines)


# =========================================================================== scripts


def _emit(out_lines: int, err_lines: int) -> str:
    parts = []
    if out_lines:
        parts.append(f"yes {OUT_LINE.decode()} | head -n {out_lines}")
    if err_lines:
        parts.append(f"yes {ERR_LINE.decode()} | head -n {err_lines} >&2")
    return "; ".join(parts) or ":"


def _wait_for(trigger: str) -> str:
    return f"while [ ! -e /tmp/stress/{trigger} ]; do sleep 0.02; done"


# =========================================================================== the run


@dataclass
class StressOptions:
    runtime: str = PYSHIM_RUNTIME
    cycles: int = 10
    containers_per_cycle: int = len(ROLES)
    seed: int | None = None
    max_outage: float = 0.4
    #: pause after each restart before anything is checked or deleted (lets
    #: shims whose event retry is slow deliver what they queued during the outage)
    settle: float = 0.0
    keep: bool = False
    containerd: str | None = None
    ctr: str | None = None
    base_dir: str = "/tmp"
    #: progress lines (stderr); None = quiet
    progress: Callable[[str], None] | None = None


@dataclass
class _Plan:
    """One container of a cycle: its role, scripts, codes and trigger times."""

    role: str
    cid: str
    init: ProcRecord
    script: str
    exec_rec: ProcRecord | None = None
    exec_script: str = ""
    #: seconds relative to the kill (negative: before it)
    launch_at: float | None = None
    go_at: float | None = None
    exec_go_at: float | None = None
    popen: subprocess.Popen[str] | None = None
    #: its ``ctr run -d`` failed before any kill: nothing is expected of it
    failed: bool = False
    exec_popen: subprocess.Popen[str] | None = None
    go_written: bool = False
    exec_go_written: bool = False


class StressRun:
    def __init__(self, opts: StressOptions) -> None:
        self.opts = opts
        self.seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(10**9)
        self.rng = random.Random(self.seed)
        self.obs = Observations(runtime=opts.runtime, cycles=opts.cycles, seed=self.seed)
        self.c: PrivateContainerd | None = None
        self.rootfs = Path()
        self.logs = Path()
        self.watchers: list[EventWatcher] = []
        self.addresses: set[str] = set()
        self.long: _Plan | None = None
        self.all_cids: list[str] = []
        #: container id -> role (for reports)
        self.roles: dict[str, str] = {}

    # ------------------------------------------------------------------ helpers

    def say(self, msg: str) -> None:
        if self.opts.progress is not None:
            self.opts.progress(msg)

    @property
    def ctrd(self) -> PrivateContainerd:
        assert self.c is not None
        return self.c

    def trigger(self, name: str) -> None:
        (self.rootfs / "tmp" / "stress" / name).touch()

    def log_uri(self, name: str) -> str:
        return f"file://{self.logs / name}.log"

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def code(self) -> int:
        return self.rng.randint(2, 125)

    def run_args(self, cid: str, script: str) -> list[str]:
        return [
            "run", "--runtime", self.opts.runtime, "-d", "--log-uri", self.log_uri(cid),
            "--rootfs", str(self.rootfs), cid, "/bin/sh", "-c", script,
        ]  # fmt: skip

    def tasks(self) -> dict[str, tuple[int, str]]:
        """``ctr task ls``, retried while containerd settles after a restart."""
        last: Exception | None = None
        for _ in range(20):
            try:
                return self.ctrd.tasks()
            except ContainerdError as e:
                last = e
                time.sleep(0.2)
        raise ContainerdError(f"ctr task ls keeps failing: {last}")

    def shim_pids(self, cids: Iterable[str]) -> dict[str, set[int]]:
        wanted = set(cids)
        out: dict[str, set[int]] = {c: set() for c in wanted}
        for p in self.ctrd.shim_processes():
            cmd = p.info.get("cmdline") or []
            for i, arg in enumerate(cmd[:-1]):
                if arg == "-id" and cmd[i + 1] in wanted:
                    out[cmd[i + 1]].add(p.pid)
        return out

    def finish(self, p: subprocess.Popen[str], timeout: float) -> tuple[int | None, str, str]:
        """Wait for a ctr started with ctr_popen; (rc or None if killed, stdout, stderr)."""
        try:
            out, err = p.communicate(timeout=timeout)
            return p.returncode, out, err
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            return None, out, err

    def record_address(self, cid: str) -> None:
        with contextlib.suppress(OSError):
            addr = self.ctrd.shim_address(cid).strip()
            if addr.startswith("unix://"):
                self.addresses.add(addr[len("unix://") :])

    # ------------------------------------------------------------------ run

    def run(self) -> Summary:
        t0 = time.monotonic()
        c = PrivateContainerd(
            base_dir=self.opts.base_dir,
            path=containerd_path_for(self.opts.runtime),
            containerd_bin=self.opts.containerd,
            ctr_bin=self.opts.ctr,
            dir_prefix="pyshim-stress-",
            namespace_prefix="stress",
        )
        self.c = c
        self.rootfs = busybox_rootfs(c.dir / "rootfs", path=c.path)
        (self.rootfs / "tmp" / "stress").mkdir(parents=True, exist_ok=True)
        self.logs = c.dir / "logs"
        self.logs.mkdir()
        try:
            c.start()
            self.say(
                f"private containerd pid {c.pid}, dir {c.dir}, namespace {c.namespace}, "
                f"runtime {self.opts.runtime}, seed {self.seed}"
            )
            self.watchers.append(c.events())
            self.start_long()
            for n in range(1, self.opts.cycles + 1):
                self.cycle(n)
            self.finish_long()
            self.final_checks()
        except ContainerdError as e:
            self.obs.errors.append(f"aborted: {e}")
        except Exception as e:  # a bug or an unexpected environment: still report
            self.obs.errors.append(f"aborted: {type(e).__name__}: {e}")
            self.say("".join(traceback.format_exception(e)))
        finally:
            for w in self.watchers:
                w.stop()
            self.collect_events()
            self.count_log_events()
            notes = c.stop(remove=not self.opts.keep)
            if notes:
                self.say(f"teardown had to clean up: {notes}")
            if self.opts.keep:
                self.say(f"kept {c.dir}")
        self.obs.containers = len(self.all_cids)
        self.obs.duration_s = time.monotonic() - t0
        return evaluate(self.obs)

    # ------------------------------------------------------------------ the long container

    def start_long(self) -> None:
        cid = self.ctrd.new_id("long")
        self.all_cids.append(cid)
        self.roles[cid] = "long"
        code = self.code()
        script = (
            f"i=0; while [ ! -e /tmp/stress/{cid}.go ]; do "
            f"yes {OUT_LINE.decode()} | head -n 16; i=$((i+1)); sleep 0.1; done; "
            f'echo "END $i"; exit {code}'
        )
        rec = ProcRecord(cycle=0, cid=cid, role="long", expected_code=code, output=Output())
        self.obs.records.append(rec)
        self.long = _Plan("long", cid, rec, script)
        r = self.ctrd.ctr(*self.run_args(cid, script), timeout=OP_TIMEOUT)
        if r.returncode != 0:
            raise ContainerdError(f"could not start the long container: {r.stderr.strip()}")
        self.ctrd.wait_task_status(cid, RUNNING, timeout=OP_TIMEOUT)
        self.record_address(cid)

    def finish_long(self) -> None:
        assert self.long is not None
        cid = self.long.cid
        self.trigger(f"{cid}.go")
        self.ctrd.wait_task_status(cid, STOPPED, timeout=OP_TIMEOUT)
        self.delete(self.long.init)
        r = self.ctrd.ctr("container", "rm", cid, timeout=OP_TIMEOUT)
        if r.returncode != 0:
            self.obs.errors.append(f"ctr container rm {cid}: {r.stderr.strip()}")
        data = self.read_log(cid)
        m = re.search(rb"END (\d+)\n\Z", data)
        chunks = int(m.group(1)) if m else 0
        assert self.long.init.output is not None
        self.long.init.output = Output(out_lines=16 * chunks, trailer=f"END {chunks}\n")
        self.check_output(self.long.init, data)

    # ------------------------------------------------------------------ one cycle

    def roles_for(self, n: int) -> list[str]:
        k = self.opts.containers_per_cycle
        return [ROLES[((n - 1) * k + j) % len(ROLES)] for j in range(k)]

    def plan(self, n: int, role: str) -> _Plan:
        cid = self.ctrd.new_id(f"c{n}")
        self.all_cids.append(cid)
        self.roles[cid] = role
        code = self.code()
        rng = self.rng
        rec = ProcRecord(cycle=n, cid=cid, role=role, expected_code=code)
        p = _Plan(role, cid, rec, "")
        if role == "start":
            rec.output = Output(40, 8)
            p.script = f"{_emit(40, 8)}; sleep {rng.uniform(0, 0.3):.2f}; exit {code}"
            p.launch_at = -rng.uniform(0.0, 0.35)
        elif role == "exec":
            rec.output = Output()
            p.script = f"{_wait_for(cid + '.go')}; exit {code}"
            eid = f"x{n}"
            p.exec_rec = ProcRecord(
                cycle=n, cid=cid, exec_id=eid, role="exec", expected_code=self.code(),
                output=Output(30, 6),
            )  # fmt: skip
            p.exec_script = (
                f"{_emit(30, 6)}; {_wait_for(cid + '.x.go')}; exit {p.exec_rec.expected_code}"
            )
            p.launch_at = -rng.uniform(0.0, 0.15)
            if rng.random() < 0.5:  # exit during the outage (else after the restart)
                p.exec_go_at = rng.uniform(0.0, 0.8)
        elif role == "output":
            rec.output = Output(16 * 192, 16 * 48)  # 240 KiB
            p.script = (
                f"{_wait_for(cid + '.go')}; i=0; while [ $i -lt 16 ]; do {_emit(192, 48)}; "
                f"sleep 0.03; i=$((i+1)); done; exit {code}"
            )
            p.go_at = -rng.uniform(0.0, 0.3)
        elif role == "exit-down":
            rec.output = Output(20, 4)
            p.script = f"{_emit(20, 4)}; {_wait_for(cid + '.go')}; exit {code}"
            p.go_at = rng.uniform(0.0, 0.8)  # fraction of the outage
        elif role == "exit-before":
            rec.output = Output(20, 4)
            p.script = f"{_emit(20, 4)}; {_wait_for(cid + '.go')}; exit {code}"
            p.go_at = -rng.uniform(0.0, 0.1)
        else:
            raise ValueError(role)
        self.obs.records.append(rec)
        if p.exec_rec is not None:
            self.obs.records.append(p.exec_rec)
        return p

    def cycle(self, n: int) -> None:
        c = self.ctrd
        rng = self.rng
        seen = {k: len(v) for k, v in self._problem_lists().items()}
        plans = [self.plan(n, role) for role in self.roles_for(n)]
        early = [p for p in plans if p.role != "start"]
        cycle_cids = [p.cid for p in plans]

        # 1. containers that must be running before the kill
        for p in early:
            p.popen = c.ctr_popen(*self.run_args(p.cid, p.script))
        for p in list(early):
            assert p.popen is not None
            rc, _out, err = self.finish(p.popen, OP_TIMEOUT)
            p.popen = None
            if rc != 0:
                self.obs.errors.append(
                    f"cycle {n}: ctr run -d {p.cid} failed before any kill: {err.strip()}"
                )
                p.init.expected_code = None
                p.init.output = None
                if p.exec_rec is not None:
                    p.exec_rec.expected_code = None
                    p.exec_rec.output = None
                p.failed = True
                early.remove(p)
        try:
            wait_for_states(self.tasks, {p.cid for p in early}, {RUNNING}, OP_TIMEOUT)
        except ContainerdError as e:
            self.obs.errors.append(f"cycle {n}: {e}")
        for p in early:
            self.record_address(p.cid)

        # 2. the timeline around the kill
        outage = rng.uniform(0.05, max(0.05, self.opts.max_outage))
        kill_at = time.monotonic() + rng.uniform(0.25, 0.5)
        before: list[tuple[float, str, Callable[[], None]]] = []
        after: list[tuple[float, str, Callable[[], None]]] = []
        for p in plans:
            if p.failed:
                continue
            if p.role == "start":
                assert p.launch_at is not None
                before.append((kill_at + p.launch_at, f"start {p.cid}", self._launcher(p)))
            if p.exec_rec is not None and p.launch_at is not None and p.role == "exec":
                before.append((kill_at + p.launch_at, f"exec {p.cid}", self._exec_launcher(p)))
            if p.exec_go_at is not None:
                after.append((kill_at + p.exec_go_at * outage, "exec go", self._go(p, exec_=True)))
            if p.go_at is not None:
                if p.go_at < 0:
                    before.append((kill_at + p.go_at, f"go {p.cid}", self._go(p)))
                else:
                    after.append((kill_at + p.go_at * outage, f"go {p.cid}", self._go(p)))
        snapshot: dict[str, Any] = {}

        def take_snapshot() -> None:
            snapshot["tasks"] = self.tasks()
            snapshot["shims"] = self.shim_pids(snapshot["tasks"])

        before.append((kill_at - 0.08, "snapshot", take_snapshot))
        run_timeline(before)
        killed_at = time.monotonic()
        c.kill(signal.SIGKILL)
        for w in self.watchers:
            if w.proc.poll() is None:
                w.stop()
        run_timeline(after)
        _sleep_until(killed_at + outage)
        down = time.monotonic() - killed_at
        c.start()
        restart_ms = (time.monotonic() - killed_at - down) * 1000
        self.obs.restarts += 1
        self.watchers.append(c.events())

        if self.opts.settle > 0:
            time.sleep(self.opts.settle)
        # 3. consistency right after the restart
        self.check_consistency(n, snapshot, {p.cid for p in plans if p.role == "start"})

        # 4. resolve what the kill interrupted, then let everything exit
        for p in plans:
            if p.role == "start":
                self.resolve_start(p)
        for p in plans:
            if p.role == "exec" and not p.failed:
                self.resolve_exec(p)
        for p in plans:
            if p.role != "start" and not p.go_written:
                self.trigger(f"{p.cid}.go")
                p.go_written = True
        live = {cid for cid, _ in self.tasks().items() if cid in cycle_cids}
        try:
            wait_for_states(self.tasks, live, {STOPPED}, OP_TIMEOUT)
        except ContainerdError as e:
            self.obs.errors.append(f"cycle {n}: {e}")

        # 5. delete, collect, check for leftovers
        for p in plans:
            if p.init.expected_code is not None or p.cid in self.tasks():
                self.delete(p.init)
        with contextlib.suppress(ContainerdError):
            existing = set(c.containers())
            for cid in cycle_cids:
                if cid in existing:
                    r = c.ctr("container", "rm", cid, timeout=OP_TIMEOUT)
                    if r.returncode != 0:
                        self.obs.errors.append(f"ctr container rm {cid}: {r.stderr.strip()}")
        for p in plans:
            self.check_output(p.init, self.read_log(p.cid))
            if p.exec_rec is not None:
                self.check_output(p.exec_rec, self.read_log(f"{p.cid}-{p.exec_rec.exec_id}"))
        self.check_leaks(n, cycle_cids)

        def ran(r: ProcRecord) -> str:
            return "ran" if r.expected_code is not None else "not-run"

        outcome = ", ".join(
            f"{p.role}={ran(p.init)}"
            + (f"/{p.exec_rec.exec_id}:{ran(p.exec_rec)}" if p.exec_rec is not None else "")
            for p in plans
        )
        # problems of this cycle alone (exit events are attributed at the end)
        mine = Observations(
            self.obs.runtime, 1, records=[r for r in self.obs.records if r.cycle == n]
        )
        for k, v in self._problem_lists(mine).items():
            v += getattr(self.obs, k)[seen[k] :]
        bad = len(evaluate(mine).failures)
        self.say(
            f"cycle {n}/{self.opts.cycles}: down {down * 1000:.0f} ms, restart "
            f"{restart_ms:.0f} ms; {outcome}; problems: {bad}"
        )

    def _problem_lists(self, obs: Observations | None = None) -> dict[str, list[str]]:
        o = obs or self.obs
        return {
            "inconsistencies": o.inconsistencies,
            "stray_shims": o.stray_shims,
            "leaked_sockets": o.leaked_sockets,
            "leaked_runc_state": o.leaked_runc_state,
            "leaked_bundles": o.leaked_bundles,
            "errors": o.errors,
        }

    def _launcher(self, p: _Plan) -> Callable[[], None]:
        def go() -> None:
            p.popen = self.ctrd.ctr_popen(*self.run_args(p.cid, p.script))

        return go

    def _exec_launcher(self, p: _Plan) -> Callable[[], None]:
        assert p.exec_rec is not None
        eid = p.exec_rec.exec_id
        args = [
            "task", "exec", "--exec-id", eid, "--log-uri", self.log_uri(f"{p.cid}-{eid}"),
            p.cid, "/bin/sh", "-c", p.exec_script,
        ]  # fmt: skip

        def go() -> None:
            p.exec_popen = self.ctrd.ctr_popen(*args)

        return go

    def _go(self, p: _Plan, exec_: bool = False) -> Callable[[], None]:
        def go() -> None:
            if exec_:
                self.trigger(f"{p.cid}.x.go")
                p.exec_go_written = True
            else:
                self.trigger(f"{p.cid}.go")
                p.go_written = True

        return go

    # ------------------------------------------------------------------ checks

    def check_consistency(self, n: int, snapshot: dict[str, Any], in_flight: set[str]) -> None:
        if "tasks" not in snapshot:
            self.obs.errors.append(f"cycle {n}: no task snapshot before the kill")
            return
        pre: dict[str, tuple[int, str]] = snapshot["tasks"]
        post = self.tasks()
        order = {CREATED: 0, RUNNING: 1, PAUSED: 1, STOPPED: 2}
        for cid, (pid, state) in pre.items():
            if cid not in post:
                self.obs.inconsistencies.append(
                    f"cycle {n}: task {cid} ({state}, pid {pid}) gone after the restart"
                )
                continue
            pid2, state2 = post[cid]
            if pid2 != pid and not (state == CREATED and cid in in_flight):
                self.obs.inconsistencies.append(
                    f"cycle {n}: task {cid} pid {pid} became {pid2} after the restart"
                )
            if order.get(state2, -1) < order.get(state, 99):
                self.obs.inconsistencies.append(
                    f"cycle {n}: task {cid} went from {state} to {state2} across the restart"
                )
        for cid in post:
            if cid not in pre and cid not in in_flight:
                self.obs.inconsistencies.append(
                    f"cycle {n}: task {cid} appeared after the restart ({post[cid][1]})"
                )
        shims_before: dict[str, set[int]] = snapshot["shims"]
        shims_after = self.shim_pids(shims_before)
        for cid, pids in shims_before.items():
            if cid in post and pids != shims_after.get(cid, set()):
                self.obs.inconsistencies.append(
                    f"cycle {n}: shim of {cid} changed across the restart: "
                    f"{sorted(pids)} -> {sorted(shims_after.get(cid, set()))}"
                )

    def resolve_start(self, p: _Plan) -> None:
        """Find out how far the interrupted ``ctr run -d`` got."""
        rec = p.init
        rc: int | None = None
        err = ""
        if p.popen is not None:
            rc, _out, err = self.finish(p.popen, OP_TIMEOUT)
        state = self.tasks().get(p.cid)
        status = None if state is None else state[1]
        rec.notes.append(f"ctr run -d rc={rc}, task after restart: {status}")
        if status in (RUNNING, STOPPED):
            self.record_address(p.cid)
            return  # it ran: exit code and output as planned
        rec.output = None
        if status is None:
            rec.expected_code = None
            if rc == 0:
                self.obs.inconsistencies.append(
                    f"{p.cid}: `ctr run -d` succeeded but the task is gone after the restart"
                )
            return
        if status == CREATED:
            # created, never started: kill it; the init (runc's) exits with SIGKILL
            rec.expected_code = SIGKILL_STATUS
            self.record_address(p.cid)
            r = self.ctrd.ctr("task", "kill", "-s", "SIGKILL", p.cid, timeout=OP_TIMEOUT)
            if r.returncode != 0:
                self.obs.errors.append(f"ctr task kill {p.cid} (CREATED): {r.stderr.strip()}")
            return
        self.obs.inconsistencies.append(
            f"{p.cid}: task in state {status} after an interrupted start ({err.strip()})"
        )
        rec.expected_code = None

    def resolve_exec(self, p: _Plan) -> None:
        """Find out whether the interrupted ``ctr task exec`` started its process
        and, if so, get its exit status."""
        rec = p.exec_rec
        assert rec is not None
        if p.exec_popen is None:
            rec.expected_code = None
            rec.output = None
            rec.notes.append("exec never launched")
            return
        proc = p.exec_popen
        # a ctr that was still dialing when containerd died may have reached the
        # new one: it is then running the exec and waiting for it
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
        survived = proc.poll() is None
        if survived and not p.exec_go_written:
            self.trigger(f"{p.cid}.x.go")
            p.exec_go_written = True
        rc, _out, _err = self.finish(proc, OP_TIMEOUT)
        rec.notes.append(f"ctr task exec rc={rc}" + (" (survived the restart)" if survived else ""))
        if rc == rec.expected_code:
            # ctr reached the new containerd and saw the exit itself (ctr's own
            # failures exit 1, our codes are 2..125); it deleted the exec since
            rec.received_code, rec.code_source = rc, "ctr task exec"
            return
        address = self.shim_address_or_none(p.cid)
        if address is None:
            self.obs.errors.append(f"{p.cid}: no shim address to ask for exec {rec.exec_id}")
            return
        try:
            st = shim_state(address, p.cid, rec.exec_id, self.ctrd.task_service(p.cid))
        except Exception as e:
            self.obs.errors.append(f"{p.cid}: State({rec.exec_id}) over ttrpc failed: {e!r}")
            return
        rec.notes.append(f"shim State: {st}")
        if st is None or st[0] == CREATED:
            rec.expected_code = None  # never started: nothing may show up for it
            rec.output = None
            return
        if st[0] != STOPPED:
            if not p.exec_go_written:
                self.trigger(f"{p.cid}.x.go")
                p.exec_go_written = True
            deadline = time.monotonic() + OP_TIMEOUT
            while st is not None and st[0] != STOPPED and time.monotonic() < deadline:
                time.sleep(0.05)
                st = shim_state(address, p.cid, rec.exec_id, self.ctrd.task_service(p.cid))
        if st is not None and st[0] == STOPPED:
            rec.received_code, rec.code_source = st[1], "shim State"
        else:
            rec.notes.append(f"exec did not stop: {st}")

    def shim_address_or_none(self, cid: str) -> str | None:
        try:
            addr = self.ctrd.shim_address(cid).strip()
        except OSError:
            return None
        return addr or None

    def delete(self, rec: ProcRecord) -> None:
        """``ctr task rm``: the init's exit status as containerd reports it."""
        c = self.ctrd
        status = self.tasks().get(rec.cid)
        if status is None:
            if rec.expected_code is not None:
                rec.notes.append("no task to delete")
            return
        if status[1] != STOPPED:
            if rec.expected_code is not None:
                self.obs.errors.append(f"{rec.cid}: task {status[1]} instead of STOPPED at delete")
            c.ctr("task", "kill", "-s", "SIGKILL", rec.cid, timeout=OP_TIMEOUT)
            with contextlib.suppress(ContainerdError):
                c.wait_task_status(rec.cid, {STOPPED, None}, timeout=10)
        r = c.ctr("task", "rm", rec.cid, timeout=OP_TIMEOUT)
        if r.returncode != 0:
            self.obs.errors.append(f"ctr task rm {rec.cid}: {r.stderr.strip()}")
            return
        rec.received_code, rec.code_source = exit_code_from_task_rm(r.stderr), "ctr task rm"

    def read_log(self, name: str) -> bytes:
        try:
            return self.log_path(name).read_bytes()
        except FileNotFoundError:
            return b""

    def check_output(self, rec: ProcRecord, data: bytes) -> None:
        rec.received_bytes = len(data)
        rec.output_error = output_problem(
            rec.output if rec.expected_code is not None else None, data
        )

    def check_leaks(self, n: int, cids: Sequence[str], timeout: float = 3.0) -> None:
        """Nothing of *cids* may be left once they are deleted (polls: shims exit
        asynchronously after the last delete)."""
        deadline = time.monotonic() + timeout
        while True:
            problems = self.leftovers(cids)
            if not any(problems.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.report_leftovers(f"cycle {n}", problems)

    def report_leftovers(self, when: str, problems: dict[str, list[tuple[str, str]]]) -> None:
        known = {
            "shims": self.obs.stray_shims,
            "sockets": self.obs.leaked_sockets,
            "runc": self.obs.leaked_runc_state,
            "bundles": self.obs.leaked_bundles,
        }
        for kind, found in problems.items():
            for cid, what in found:
                if any(k.endswith(what) for k in known[kind]):
                    continue  # already reported for its cycle
                label = f"{self.roles.get(cid, 'unknown container')} {cid}".strip()
                if self.never_ran(cid):
                    label += f", {INTERRUPTED_MARK}"
                known[kind].append(f"{when} ({label}): {what}")

    def never_ran(self, cid: str) -> bool:
        """*cid* is an interrupted ``start`` whose process provably never ran."""
        return any(
            r.cid == cid and not r.exec_id and r.role == "start" and r.expected_code is None
            for r in self.obs.records
        )

    def leftovers(self, cids: Iterable[str] | None) -> dict[str, list[tuple[str, str]]]:
        """What is left of *cids* (None: of anything of this run) as (cid, description)."""
        c = self.ctrd
        names = set(cids) if cids is not None else set(self.all_cids)
        shims = []
        for p in c.shim_processes():
            cmd = p.info.get("cmdline") or []
            ids = [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == "-id"]
            cid = ids[0] if ids else ""
            if cids is None or cid in names:
                shims.append((cid, f"pid {p.pid}: {' '.join(cmd)}"))
        sockets = [(cid, c.shim_socket_path(cid)) for cid in sorted(names)]
        if cids is None:
            sockets += [("", Path(a)) for a in sorted(self.addresses)]
        runc: list[tuple[str, str]] = []
        with contextlib.suppress(OSError):
            runc = [
                (e.name, str(e))
                for e in sorted(c.runc_root.iterdir())
                if cids is None or e.name in names
            ]
        return {
            "shims": shims,
            "sockets": sorted({(cid, str(s)) for cid, s in sockets if s.exists()}),
            "runc": runc,
            "bundles": [
                (b, str(c.bundle_dir(b))) for b in c.bundle_ids() if cids is None or b in names
            ],
        }

    def final_checks(self) -> None:
        leftover_tasks = self.tasks()
        if leftover_tasks:
            self.obs.inconsistencies.append(f"tasks left at the end: {sorted(leftover_tasks)}")
        deadline = time.monotonic() + 3.0
        while True:
            problems = self.leftovers(None)
            if not any(problems.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.report_leftovers("end", problems)
        time.sleep(0.3)  # late (duplicate) events still reach the last subscriber

    def collect_events(self) -> None:
        exits = [
            e.data
            for w in self.watchers
            for e in w.snapshot()
            if e.topic == TASK_TOPIC_EXIT and e.namespace == self.ctrd.namespace
        ]
        self.obs.unexpected_exit_events += attach_exit_events(self.obs.records, exits)

    def count_log_events(self) -> None:
        try:
            text = self.ctrd.log_path.read_text(errors="replace")
        except OSError:
            return
        forwarded, published = count_log_exit_events(text, self.ctrd.namespace)
        if forwarded == 0 and "event forwarded" not in text:
            return  # not a debug log (or a containerd that words it differently)
        self.obs.forwarded_exit_events = forwarded
        self.obs.synthesized_exit_events = published


# =========================================================================== I/O helpers


def shim_state(
    address: str, cid: str, exec_id: str, service: str = "containerd.task.v2.Task"
) -> tuple[str, int] | None:
    """(status, exit_status) of a process straight from its shim (Task.State over
    ttrpc); None if the shim does not know it."""
    import trio

    from shimv2.api.containerd.task.v2 import shim_pb2 as api
    from shimv2.ttrpc import Code, TTRPCError, connect

    names = {1: CREATED, 2: RUNNING, 3: STOPPED, 4: PAUSED}

    async def ask() -> tuple[str, int] | None:
        async with connect(address) as client:
            try:
                r = await client.call(
                    service,
                    "State",
                    api.StateRequest(id=cid, exec_id=exec_id),
                    api.StateResponse,
                    timeout=5,
                )
            except TTRPCError as e:
                if e.code == Code.NOT_FOUND:
                    return None
                raise
            return names.get(int(r.status), f"UNKNOWN({int(r.status)})"), int(r.exit_status)

    return trio.run(ask)


def wait_for_states(
    tasks: Callable[[], dict[str, tuple[int, str]]],
    cids: set[str],
    states: set[str],
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        now = tasks()
        waiting = {
            c: now.get(c, (0, None))[1] for c in cids if now.get(c, (0, None))[1] not in states
        }
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise ContainerdError(f"tasks not {sorted(states)} after {timeout}s: {waiting}")
        time.sleep(0.05)


def run_timeline(actions: list[tuple[float, str, Callable[[], None]]]) -> None:
    """Run each action at its (monotonic) time, in time order; late ones at once."""
    for at, _label, fn in sorted(actions, key=lambda a: a[0]):
        _sleep_until(at)
        fn()


def _sleep_until(at: float) -> None:
    left = at - time.monotonic()
    if left > 0:
        time.sleep(left)


def find_shim(runtime: str) -> Path | None:
    """The shim binary containerd would run for *runtime*: next to this Python,
    in the ``PYSHIM_E2E_CONTAINERD`` build, on PATH, or in the system dirs."""
    name = shim_binary_name(runtime)
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    build = os.environ.get("PYSHIM_E2E_CONTAINERD", "")
    for path in (build, os.environ.get("PATH", ""), system_path()):
        found = shutil.which(name, path=path)
        if found:
            return Path(found)
    return None


def containerd_path_for(runtime: str) -> str:
    """containerd's PATH: the shim's dir first, then the system dirs."""
    shim = find_shim(runtime)
    if shim is None:
        raise ContainerdError(
            f"{shim_binary_name(runtime)} (runtime {runtime}) not found next to "
            f"{sys.executable}, on PATH or in {system_path()}; for pyshim run "
            "`pip install -e .` (or `make venv`) and use that environment's python"
        )
    dirs = [str(shim.parent)]
    return ":".join([*dirs, system_path()])


def run_stress(opts: StressOptions) -> Summary:
    """Run the stress loop; raises `ContainerdError` if it cannot even start."""
    if opts.cycles < 1 or opts.containers_per_cycle < 1:
        raise ContainerdError("--cycles and --containers-per-cycle must be at least 1")
    containerd_path_for(opts.runtime)  # fail early with a clear message
    return StressRun(opts).run()


# =========================================================================== CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m shimv2.tools.stress",
        description=(
            "Kill a private containerd with SIGKILL while containers are being created, "
            "exec'd, writing output and exiting; restart it and check that every task "
            "is consistent (exits, exit codes, output bytes, leftovers)."
        ),
    )
    ap.add_argument("--runtime", default=PYSHIM_RUNTIME, help="runtime type (default %(default)s)")
    ap.add_argument(
        "--cycles", type=int, default=10, help="kill/restart cycles (default %(default)s)"
    )
    ap.add_argument(
        "--containers-per-cycle", type=int, default=len(ROLES),
        help=f"containers in flight per cycle, roles rotate through {', '.join(ROLES)} "
        "(default %(default)s)",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    ap.add_argument(
        "--max-outage", type=float, default=0.4,
        help="containerd stays down a random 0.05..MAX s (default %(default)s)",
    )  # fmt: skip
    ap.add_argument(
        "--settle", type=float, default=0.0,
        help="wait this long after each restart before checking and deleting "
        "(default %(default)s: delete at once, as a user would)",
    )  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, config)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--containerd", default=None, help="containerd binary (default: from PATH)")
    ap.add_argument("--ctr", default=None, help="ctr binary (default: from PATH)")
    ap.add_argument("--base-dir", default="/tmp", help="where the temp dir goes (default /tmp)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def progress(msg: str) -> None:
        print(f"[stress] {msg}", file=sys.stderr, flush=True)

    opts = StressOptions(
        runtime=args.runtime,
        cycles=args.cycles,
        containers_per_cycle=args.containers_per_cycle,
        seed=args.seed,
        max_outage=args.max_outage,
        settle=args.settle,
        keep=args.keep,
        containerd=args.containerd,
        ctr=args.ctr,
        base_dir=args.base_dir,
        progress=None if args.quiet else progress,
    )
    try:
        summary = run_stress(opts)
    except (ContainerdError, ValueError) as e:
        print(f"stress: cannot run: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(format_summary(summary))
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
