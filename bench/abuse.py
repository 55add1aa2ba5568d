#!/usr/bin/env python3
"""A shim under abuse, pyshim vs the Go reference shim (issue 13).

A benchmark, not a test: nothing here asserts. One private containerd per
pyshim build (tests/e2e/harness.py) runs a ``sleep`` container for each runtime;
against each shim's ttrpc socket we measure:

1. flood    a client writes Task/State requests as fast as the shim takes them
            and never reads an answer, for --seconds: what the shim accepted
            (MiB of requests), its RSS growth (peak, and 1 s after the client
            left), and the latency of State on another connection meanwhile
            (one call every 10 ms: median, p99, max).
2. connects --connects clients connect at once (non-blocking connect(2), no
            retries) then each asks State: how many were refused (EAGAIN, the
            listen backlog was full) and the time until all were answered.

    .venv/bin/python bench/abuse.py
    .venv/bin/python bench/abuse.py --pyshim before=/tmp/pyshim-before/bin --pyshim after=.venv/bin
    .venv/bin/python bench/abuse.py --json out.json

``--pyshim NAME=DIR`` (repeatable) names a directory holding a
``containerd-shim-pyshim-v2`` (e.g. a ``git worktree`` of an older commit with
its launcher written by ``python -m shimv2.launcher``); the Go shim is measured
in the first containerd.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import select
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO))

import harness  # noqa: E402  (tests/e2e/harness.py)

from shimv2.api.containerd.task.v2 import shim_pb2 as api  # noqa: E402
from shimv2.tools.containerd import PrivateContainerd  # noqa: E402
from shimv2.ttrpc.wire import Frame, FrameDecoder, encode_request  # noqa: E402

TASK = "containerd.task.v2.Task"
FLOOD_CAP = 512 << 20  # never send more than this, whatever the shim takes


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    return 0


def state_frame(cid: str, stream_id: int = 1) -> bytes:
    return encode_request(stream_id, TASK, "State", api.StateRequest(id=cid).SerializeToString())


def read_frame(sock: socket.socket, decoder: FrameDecoder) -> Frame:
    while (event := decoder.next_event()) is None:
        data = sock.recv(1 << 16)
        if not data:
            raise EOFError("closed")
        decoder.feed(data)
    assert isinstance(event, Frame)
    return event


class Prober(threading.Thread):
    """State on its own connection every 10 ms, timing each call."""

    def __init__(self, path: str, cid: str) -> None:
        super().__init__(daemon=True)
        self.path, self.cid = path, cid
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.errors = 0

    def run(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(self.path)
            decoder = FrameDecoder()
            sid = 1
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    sock.sendall(state_frame(self.cid, sid))
                    read_frame(sock, decoder)
                except OSError:
                    self.errors += 1
                    return
                self.latencies.append(time.monotonic() - t0)
                sid += 2
                self.stop.wait(0.01)


def ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return 1000 * values[min(len(values) - 1, int(q * len(values)))]


def flood(path: str, cid: str, shim: int, seconds: float) -> dict[str, Any]:
    before = rss(shim)
    peak = before
    prober = Prober(path, cid)
    prober.start()
    time.sleep(0.3)  # a few quiet probes first
    quiet = len(prober.latencies)
    batch = state_frame(cid) * 512
    sent = 0
    stalled_at = None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.setblocking(False)
    t0 = time.monotonic()
    next_sample = t0
    try:
        while (now := time.monotonic()) - t0 < seconds and sent < FLOOD_CAP:
            if now >= next_sample:
                peak = max(peak, rss(shim))
                next_sample = now + 0.05
            try:
                sent += sock.send(batch)
            except BlockingIOError:
                if stalled_at is None:
                    stalled_at = sent
                select.select([], [sock], [], 0.05)
        peak = max(peak, rss(shim))
        during = prober.latencies[quiet:]
        prober.stop.set()
        prober.join(30)
    finally:
        sock.close()
    time.sleep(1.0)
    return {
        "accepted_MiB": sent / (1 << 20),
        "accepted_requests": sent // len(state_frame(cid)),
        "first_stall_KiB": None if stalled_at is None else stalled_at / 1024,
        "rss_before_MiB": before / (1 << 20),
        "rss_growth_peak_MiB": (peak - before) / (1 << 20),
        "rss_growth_after_close_MiB": (rss(shim) - before) / (1 << 20),
        "state_p50_ms": ms(during, 0.5),
        "state_p99_ms": ms(during, 0.99),
        "state_max_ms": ms(during, 1.0),
        "state_calls": len(during),
        "prober_errors": prober.errors,
    }


def connects(path: str, cid: str, count: int) -> dict[str, Any]:
    socks: list[socket.socket] = []
    refused = 0
    t0 = time.monotonic()
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                s.connect(path)
            except OSError as exc:
                s.close()
                if exc.errno != errno.EAGAIN:
                    raise
                refused += 1
                continue
            socks.append(s)
        for s in socks:
            s.setblocking(True)
            s.settimeout(30)
            s.sendall(state_frame(cid))
        answered = 0
        for s in socks:
            with contextlib.suppress(OSError, EOFError):
                read_frame(s, FrameDecoder())
                answered += 1
        elapsed = time.monotonic() - t0
    finally:
        for s in socks:
            s.close()
    return {"refused_EAGAIN": refused, "answered": answered, "all_answered_ms": 1000 * elapsed}


def measure(c: PrivateContainerd, rootfs: Path, runtime: str, args: argparse.Namespace) -> dict:
    cid = c.new_id(prefix="abuse")
    c.ctr("run", "-d", "--runtime", runtime, "--rootfs", str(rootfs), cid, "/bin/sleep", "600")
    try:
        c.wait_task_status(cid, {harness.RUNNING}, timeout=20)
        [shim] = c.shim_processes(cid)
        path = c.shim_address(cid).removeprefix("unix://")
        out = {"flood": flood(path, cid, shim.pid, args.seconds)}
        out["connects"] = connects(path, cid, args.connects)
        out["pid_unchanged"] = [p.pid for p in c.shim_processes(cid)] == [shim.pid]
        return out
    finally:
        with contextlib.suppress(Exception):
            c.ctr("task", "kill", "-s", "SIGKILL", cid, timeout=10)
            c.wait_task_status(cid, {harness.STOPPED}, timeout=10)
        c.ctr("task", "rm", "-f", cid, timeout=15)
        c.ctr("container", "rm", cid, timeout=15)


ROWS = [
    ("flood", "accepted_MiB", "accepted by the shim (MiB)", "{:.2f}"),
    ("flood", "rss_growth_peak_MiB", "RSS growth, peak (MiB)", "{:.1f}"),
    ("flood", "rss_growth_after_close_MiB", "RSS growth, 1 s after close (MiB)", "{:.1f}"),
    ("flood", "state_p50_ms", "State elsewhere, median (ms)", "{:.2f}"),
    ("flood", "state_p99_ms", "State elsewhere, p99 (ms)", "{:.2f}"),
    ("flood", "state_max_ms", "State elsewhere, max (ms)", "{:.2f}"),
    ("connects", "refused_EAGAIN", "connects refused (EAGAIN)", "{}"),
    ("connects", "answered", "of those, State answered", "{}"),
    ("connects", "all_answered_ms", "all answered after (ms)", "{:.1f}"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pyshim", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--seconds", type=float, default=2.0, help="flood duration")
    ap.add_argument("--connects", type=int, default=200)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    builds = [tuple(spec.split("=", 1)) for spec in args.pyshim] or [
        ("pyshim", str(harness.venv_bin_dir()))
    ]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pyshim-abuse-") as tmp:
        rootfs = harness.busybox_rootfs(Path(tmp) / "rootfs")
        for i, (name, directory) in enumerate(builds):
            path = f"{os.path.abspath(directory)}:{harness.SYSTEM_PATH}"
            c = PrivateContainerd(path=path, dir_prefix="pyshim-abuse-", log_level="info")
            try:
                c.start()
                if i == 0:
                    results["go"] = measure(c, rootfs, harness.RUNTIMES["go"], args)
                results[name] = measure(c, rootfs, harness.RUNTIMES["pyshim"], args)
            finally:
                c.stop()
    names = list(results)
    print(f"flood {args.seconds:.1f} s, {args.connects} simultaneous connects")
    print(f"{'':36}" + "".join(f"{n:>14}" for n in names))
    for group, key, label, fmt in ROWS:
        cells = [fmt.format(results[n][group][key]) for n in names]
        print(f"{label:36}" + "".join(f"{cell:>14}" for cell in cells))
    print(
        f"{'shim pid unchanged':36}"
        + "".join(f"{results[n]['pid_unchanged']!s:>14}" for n in names)
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
