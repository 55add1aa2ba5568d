#!/usr/bin/env python3
"""Stdout throughput of pyshim vs the Go reference shim (a benchmark, not a test).

One private containerd (tests/e2e/harness.py) runs one long-lived detached
container per runtime. Each measured run plays containerd directly on the
shim's ttrpc socket: it creates its own stdout/stderr FIFOs, holds the readers,
sends ``Exec`` for a process that writes N MiB to stdout
(``head -c N /dev/zero``), then ``Start``, reads the stdout FIFO to EOF in a
thread (``readv`` into a reused buffer: as cheap a reader as Python allows),
``Wait`` and ``Delete``. That isolates the shim's copy loop from ctr's own
copying.

Per run:
* MiB/s        = bytes received / (time of the last byte - time Start was sent)
* CPU-s/GiB    = (user+system CPU of the shim process between Start and EOF,
                  psutil, threads included, children excluded) per GiB received
* lost         = bytes expected - bytes received

Runtimes run interleaved A B B A A B ... so drift (thermal, page cache, other
load on the machine) hits both alike. The summary gives per-runtime medians and
the median of the per-round ratios pyshim/go.

``--tty`` runs the same with ``terminal=true`` execs (the shim owns the console;
we still read the stdout FIFO). A runtime whose ``Exec`` answers UNIMPLEMENTED
is reported as "unsupported".

Run with the venv's interpreter (the harness puts the venv's bin dir, where
``containerd-shim-pyshim-v2`` lives, first on containerd's PATH), as root:

    .venv/bin/python bench/throughput.py --mib 256 --rounds 6
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import trio
from google.protobuf import any_pb2, empty_pb2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO))

import harness  # noqa: E402  (tests/e2e/harness.py)

from shimv2.api.containerd.task.v2 import shim_pb2 as api  # noqa: E402
from shimv2.ttrpc import Code, TTRPCError, connect  # noqa: E402

TASK = "containerd.task.v2.Task"
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
MIB = 1 << 20
GIB = 1 << 30
READ_BUF = 1 << 20
#: no byte for this long = the stream is stuck; give up on the run
STALL_TIMEOUT = 30.0

RUNTIME_NAMES = {"go": harness.RUNTIMES["go"], "pyshim": harness.RUNTIMES["pyshim"]}


class Unsupported(Exception):
    """The runtime answered UNIMPLEMENTED (e.g. terminal execs not written yet)."""


@dataclass
class Run:
    runtime: str
    round: int
    expected: int
    received: int
    seconds: float
    cpu_seconds: float
    exit_status: int | None
    error: str | None = None

    @property
    def lost(self) -> int:
        return self.expected - self.received

    @property
    def mib_per_s(self) -> float:
        return self.received / MIB / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_per_gib(self) -> float:
        return self.cpu_seconds / (self.received / GIB) if self.received else float("nan")


@dataclass
class Target:
    name: str  # go / pyshim
    runtime: str  # io.containerd.*
    cid: str
    address: str
    shim: list[psutil.Process]
    unsupported: str | None = None
    runs: list[Run] = field(default_factory=list)

    def cpu(self) -> float:
        total = 0.0
        for p in self.shim:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total


def process_spec(args: list[str], terminal: bool) -> any_pb2.Any:
    spec = {
        "args": args,
        "cwd": "/",
        "env": [],
        "user": {"uid": 0, "gid": 0},
        "terminal": terminal,
    }
    return any_pb2.Any(type_url=PROCESS_TYPE_URL, value=json.dumps(spec).encode())


def read_to_eof(fd: int, target: Target, t0: float) -> tuple[int, float, float, str | None]:
    """(bytes, time of last byte, shim CPU at EOF, error); fd is non-blocking."""
    buf = bytearray(READ_BUF)
    total = 0
    last = t0
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        try:
            n = os.readv(fd, [buf])
        except BlockingIOError:
            if not poller.poll(STALL_TIMEOUT * 1000):
                return total, last, target.cpu(), f"no data for {STALL_TIMEOUT:.0f}s"
            continue
        if n == 0:
            return total, last, target.cpu(), None
        total += n
        last = time.monotonic()


async def one_run(
    target: Target, rnd: int, nbytes: int, tty: bool, producer: str, fifo_dir: Path
) -> Run:
    exec_id = f"bench-{uuid.uuid4().hex[:10]}"
    stdout = fifo_dir / f"{exec_id}-stdout"
    stderr = fifo_dir / f"{exec_id}-stderr"
    os.mkfifo(stdout, 0o600)
    fds = [os.open(stdout, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)]
    if not tty:
        # non-tty execs need stderr too (the Go shim cannot serve stdout alone)
        os.mkfifo(stderr, 0o600)
        fds.append(os.open(stderr, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    if producer == "dd":
        args = ["/bin/dd", "if=/dev/zero", f"bs={MIB}", f"count={nbytes // MIB}"]
    else:
        args = ["/bin/head", "-c", str(nbytes), "/dev/zero"]
    try:
        async with connect(target.address) as client:
            try:
                await client.call(
                    TASK,
                    "Exec",
                    api.ExecProcessRequest(
                        id=target.cid,
                        exec_id=exec_id,
                        terminal=tty,
                        stdout=str(stdout),
                        stderr="" if tty else str(stderr),
                        spec=process_spec(args, tty),
                    ),
                    empty_pb2.Empty,
                    timeout=10,
                )
            except TTRPCError as exc:
                if exc.code == Code.UNIMPLEMENTED:
                    raise Unsupported(f"{exc.code.name}: {exc.message}") from None
                raise
            received, status, err = 0, None, None
            cpu0 = cpu1 = target.cpu()
            t0 = t_last = time.monotonic()
            try:
                try:
                    await client.call(
                        TASK,
                        "Start",
                        api.StartRequest(id=target.cid, exec_id=exec_id),
                        api.StartResponse,
                        timeout=30,
                    )
                except TTRPCError as exc:
                    if exc.code == Code.UNIMPLEMENTED:
                        raise Unsupported(f"{exc.code.name}: {exc.message}") from None
                    return Run(target.name, rnd, nbytes, 0, 0.0, 0.0, None, f"Start: {exc}")
                # the shim's writer is open once Start returned: EOF from now on is real
                received, t_last, cpu1, err = await trio.to_thread.run_sync(
                    read_to_eof, fds[0], target, t0
                )
                try:
                    w = await client.call(
                        TASK,
                        "Wait",
                        api.WaitRequest(id=target.cid, exec_id=exec_id),
                        api.WaitResponse,
                        timeout=30,
                    )
                    status = w.exit_status
                except TTRPCError as exc:
                    err = err or f"Wait: {exc}"
            finally:
                with contextlib.suppress(TTRPCError):
                    await client.call(
                        TASK,
                        "Kill",
                        api.KillRequest(id=target.cid, exec_id=exec_id, signal=9),
                        empty_pb2.Empty,
                        timeout=10,
                    )
                with contextlib.suppress(TTRPCError):
                    await client.call(
                        TASK,
                        "Wait",
                        api.WaitRequest(id=target.cid, exec_id=exec_id),
                        api.WaitResponse,
                        timeout=10,
                    )
                with contextlib.suppress(TTRPCError):
                    await client.call(
                        TASK,
                        "Delete",
                        api.DeleteRequest(id=target.cid, exec_id=exec_id),
                        api.DeleteResponse,
                        timeout=10,
                    )
    finally:
        for fd in fds:
            os.close(fd)
        for p in (stdout, stderr):
            with contextlib.suppress(OSError):
                p.unlink()
    return Run(
        runtime=target.name,
        round=rnd,
        expected=nbytes,
        received=received,
        seconds=t_last - t0,
        cpu_seconds=cpu1 - cpu0,
        exit_status=status,
        error=err,
    )


async def bench(targets: list[Target], args: argparse.Namespace, fifo_dir: Path) -> None:
    nbytes = args.mib * MIB
    if args.warmup:
        for t in targets:
            try:
                await one_run(t, -1, min(nbytes, 16 * MIB), args.tty, args.producer, fifo_dir)
            except Unsupported as exc:
                t.unsupported = str(exc)
    for rnd in range(args.rounds):
        order = targets if rnd % 2 == 0 else targets[::-1]
        for t in order:
            if t.unsupported:
                continue
            try:
                run = await one_run(t, rnd, nbytes, args.tty, args.producer, fifo_dir)
            except Unsupported as exc:
                t.unsupported = str(exc)
                continue
            t.runs.append(run)
            note = f"  ERROR {run.error}" if run.error else ""
            if run.exit_status not in (0, None):
                note += f"  exit {run.exit_status}"
            print(
                f"  round {rnd} {t.name:<7} {run.mib_per_s:9.1f} MiB/s "
                f"{run.cpu_per_gib:7.2f} CPU-s/GiB  lost {run.lost}{note}",
                flush=True,
            )


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(targets: list[Target], args: argparse.Namespace) -> None:
    mode = "tty" if args.tty else "pipe"
    print()
    print(f"mode={mode} size={args.mib} MiB rounds={args.rounds} producer={args.producer}")
    print(f"{'runtime':<8} {'runs':>4} {'MiB/s':>9} {'CPU-s/GiB':>10} {'bytes lost':>11}")
    for t in targets:
        if t.unsupported:
            print(f"{t.name:<8} unsupported ({t.unsupported})")
            continue
        print(
            f"{t.name:<8} {len(t.runs):>4} {median([r.mib_per_s for r in t.runs]):>9.1f} "
            f"{median([r.cpu_per_gib for r in t.runs]):>10.2f} "
            f"{sum(r.lost for r in t.runs):>11}"
        )
    by = {t.name: {r.round: r for r in t.runs} for t in targets if not t.unsupported}
    if "go" in by and "pyshim" in by:
        rounds = sorted(set(by["go"]) & set(by["pyshim"]))
        tp = [
            by["pyshim"][i].mib_per_s / by["go"][i].mib_per_s
            for i in rounds
            if by["go"][i].mib_per_s
        ]
        cpu = [
            by["pyshim"][i].cpu_per_gib / by["go"][i].cpu_per_gib
            for i in rounds
            if by["go"][i].cpu_per_gib
        ]
        print(
            f"pyshim/go, median of per-round ratios: throughput {median(tp):.2f}x, "
            f"CPU per GiB {median(cpu):.2f}x"
        )


def versions() -> str:
    def first_line(*cmd: str) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        except OSError:
            return "?"
        return out.splitlines()[0] if out else "?"

    return (
        f"date {datetime.datetime.now().isoformat(timespec='seconds')}, nproc {os.cpu_count()}, "
        f"{platform.system()} {platform.release()}, python {platform.python_version()}\n"
        f"{first_line(harness.which('containerd') or 'containerd', '--version')}\n"
        f"{first_line(harness.which('runc') or 'runc', '--version')}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024, help="MiB written per run (default 1024)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds; each runs every runtime once")
    ap.add_argument("--tty", action="store_true", help="terminal=true execs (console)")
    ap.add_argument(
        "--producer",
        choices=("head", "dd"),
        default="head",
        help="writer inside the container: busybox head -c (default) or dd bs=1M",
    )
    ap.add_argument("--runtimes", default="pyshim,go", help="comma-separated subset of: pyshim, go")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    args = ap.parse_args()
    names = [n.strip() for n in args.runtimes.split(",") if n.strip()]
    for n in names:
        if n not in RUNTIME_NAMES:
            ap.error(f"unknown runtime {n!r}")
    if args.producer == "dd" and args.mib < 1:
        ap.error("--mib must be >= 1")

    harness.require_tools()
    for n in names:
        if harness.shim_installed(RUNTIME_NAMES[n]) is None:
            print(
                f"{harness.shim_binary_name(RUNTIME_NAMES[n])} not on containerd's PATH "
                f"({harness.containerd_path()}); run with the venv's python",
                file=sys.stderr,
            )
            return 2
    print(versions())
    work = Path(tempfile.mkdtemp(prefix="pyshim-bench-"))
    try:
        rootfs = harness.busybox_rootfs(work / "rootfs")
        fifo_dir = work / "fifo"
        fifo_dir.mkdir()
        with harness.private_containerd() as c:
            targets = []
            for n in names:
                cid = c.new_id(prefix=f"bench-{n}")
                r = c.ctr(
                    "run", "--runtime", RUNTIME_NAMES[n], "-d", "--rootfs", str(rootfs),
                    cid, "/bin/sleep", "100000",
                    timeout=30,
                )  # fmt: skip
                if r.returncode != 0:
                    print(f"ctr run for {n} failed: {r.stderr}", file=sys.stderr)
                    return 1
                c.wait_task_status(cid, harness.RUNNING, timeout=10)
                shim = c.shim_processes(cid)
                targets.append(Target(n, RUNTIME_NAMES[n], cid, c.shim_address(cid).strip(), shim))
                print(f"{n}: container {cid}, shim pid(s) {[p.pid for p in shim]}")
            trio.run(bench, targets, args, fifo_dir)
            report(targets, args)
            for t in targets:
                c.ctr("task", "kill", "-s", "SIGKILL", t.cid, timeout=10)
                with contextlib.suppress(harness.HarnessError):
                    c.wait_task_status(t.cid, harness.STOPPED, timeout=10)
                c.ctr("task", "rm", t.cid, timeout=20)
                c.ctr("container", "rm", t.cid, timeout=20)
    finally:
        harness.unmount_all_under(work)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
