#!/usr/bin/env python3
"""Lifecycle latency, memory and scale of pyshim vs the Go reference shim.

A benchmark, not a test: nothing here asserts anything about speed. Private
containerds (shimv2.tools.containerd) host both runtimes,
``io.containerd.pyshim.v2`` and ``io.containerd.runc.v2`` (the Go shim of
the same containerd build); every figure is printed beside the Go shim's.

Figures (latencies are wall-clock around whole ``ctr`` invocations, so ctr's
own start-up, ~tens of ms, is included for both runtimes alike):

1. cold     ``ctr run --rm /bin/true``
2. start    ``ctr run -d ... /bin/sleep`` (create + start)
3. exec     ``ctr task exec --exec-id X ID /bin/true``
4. kill+rm  ``ctr task kill -s SIGKILL`` -> /tasks/exit seen -> ``ctr task rm`` -> ``ctr c rm``
5. exit->event  the container's init is SIGKILLed directly (os.kill, t0) and a
   ``ctr events`` subscriber stamps each line with time.monotonic() on arrival;
   figure = arrival of the /tasks/exit line - t0 (absolute ms)
6. memory   idle shims, RSS/PSS/USS from /proc/PID/smaps_rollup (USS =
   Private_Clean + Private_Dirty), median per shim and per container: N single
   containers (20 and 200), and pods (a pause container and 3 containers
   grouped in one shim by the ``io.kubernetes.cri.sandbox-id`` annotation, as
   CRI does); routes: the Go shim, pyshim, and pyshim with ``PYSHIM_KSM=1``
   (its daemons' private pages merged by ksmd; the bench switches KSM on for
   that round, measures ksmd's CPU and restores /sys/kernel/mm/ksm after)
7. burst    M containers started 8 at a time, then torn down 8 at a time
8. scale    K idle containers, one runtime at a time: failures, time, memory

Containerd builds: the system's (or ``PYSHIM_E2E_CONTAINERD=DIR``, as the
tests); ``PYSHIM_BENCH_CONTAINERDS=DIR1:DIR2`` (``system`` names the
system's) runs everything once per build, one set of tables each. Each DIR
holds ``containerd``, ``ctr`` and ``containerd-shim-runc-v2``.

    .venv/bin/python bench/suite.py                  # default (make bench)
    .venv/bin/python bench/suite.py --quick          # small counts
    .venv/bin/python bench/suite.py --only memory    # one phase (latency,memory,burst,scale)
    .venv/bin/python bench/suite.py --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO))

import harness  # noqa: E402  (tests/e2e/harness.py)

from shimv2.tools import containerd as pc  # noqa: E402

RUNTIMES = {"pyshim": harness.RUNTIMES["pyshim"], "go": harness.RUNTIMES["go"]}
NAMES = ["pyshim", "go"]
LATENCY_FIGURES = ["cold", "start", "exec", "kill+rm", "exit->event"]
PHASES = ["latency", "memory", "burst", "scale"]
POOL = 8
SETTLE = 3.0  # s after the last start before memory is read (daemons mark KSM pages after 2 s)
KSM_ENV = "PYSHIM_KSM"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
MiB = 1024.0


# --------------------------------------------------------------------------- events


class StampedEvents:
    """``ctr events`` with each line stamped by time.monotonic() as it arrives."""

    def __init__(self, c: harness.Containerd) -> None:
        # harness.EventWatcher does not stamp lines, so run our own ctr events and
        # bring the subscription up the same way (label the namespace until seen)
        self.c = c
        self.proc = c.ctr_popen("events", stderr=subprocess.STDOUT, bufsize=1)
        self.cond = threading.Condition()
        self.seen: dict[tuple[str, str], float] = {}  # (container_id, topic) -> first arrival
        self.probes: set[str] = set()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        probe = os.urandom(6).hex()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            c.ctr("namespaces", "label", c.namespace, f"e2e.probe={probe}", timeout=10)
            with self.cond:
                self.cond.wait(0.3)
                if probe in self.probes:
                    return
        raise harness.HarnessError("ctr events subscription did not come up")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.monotonic()
            ev = harness.parse_event_line(line)
            if ev is None:
                continue
            with self.cond:
                if ev.topic == "/namespaces/update":
                    p = (ev.data.get("labels") or {}).get("e2e.probe")
                    if p:
                        self.probes.add(p)
                cid = ev.data.get("container_id")
                if cid:
                    self.seen.setdefault((cid, ev.topic), now)
                self.cond.notify_all()

    def wait(self, cid: str, topic: str, timeout: float = 20.0) -> float | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while (cid, topic) not in self.seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.5))
            return self.seen[(cid, topic)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.thread.join(timeout=5)


# --------------------------------------------------------------------------- containerd builds


@dataclass
class Build:
    """A containerd build: its dir (containerd, ctr, containerd-shim-runc-v2) or the system's."""

    directory: str | None
    #: A/A calibration: a directory where containerd-shim-pyshim-v2 is this build's
    #: Go shim, used instead of the venv's bin: both columns then run the Go shim.
    aa_dir: str | None = None

    @property
    def path(self) -> str:
        system = os.environ.get("PYSHIM_E2E_PATH", pc.DEFAULT_SYSTEM_PATH)
        first = self.aa_dir or str(pc.venv_bin_dir())
        dirs = [first, *([self.directory] if self.directory else []), system]
        return ":".join(dirs)

    @property
    def label(self) -> str:
        return self.directory or "system"

    def which(self, tool: str) -> str | None:
        return pc.which(tool, self.path)

    def version(self) -> str:
        return first_line(self.which("containerd") or "containerd", "--version")

    def missing(self) -> list[str]:
        tools = ["containerd", "ctr", "containerd-shim-runc-v2", "runc", "busybox"]
        gone = [t for t in tools if self.which(t) is None]
        if self.which(harness.shim_binary_name(RUNTIMES["pyshim"])) is None:
            gone.append(
                f"{harness.shim_binary_name(RUNTIMES['pyshim'])} (run with the venv's python)"
            )
        return gone


def builds_from(args: argparse.Namespace) -> list[Build]:
    listed = args.containerd or [
        d for d in os.environ.get("PYSHIM_BENCH_CONTAINERDS", "").split(":") if d
    ]
    if not listed:
        listed = [os.environ.get("PYSHIM_E2E_CONTAINERD") or "system"]
    return [Build(None if d == "system" else str(Path(d).resolve())) for d in listed]


@contextlib.contextmanager
def private_containerd(build: Build, env: dict[str, str] | None = None) -> Iterator[Bench]:
    """A private containerd of ``build`` (log level info: the shims' debug logging
    would be measured too), with its ``ctr events`` subscriber and a warm fork
    server (the first pyshim ``start`` in a fresh directory launches it)."""
    c = pc.PrivateContainerd(
        log_level="info",
        extra_env=env,
        path=build.path,
        dir_prefix="pyshim-bench-",
        namespace_prefix="bench",
    )
    try:
        c.start()
        ev = StampedEvents(c)
        try:
            yield Bench(c, ROOTFS[0], ev)
        finally:
            ev.stop()
    finally:
        c.stop()


ROOTFS: list[Path] = []  # set in main


def warm_up(b: Bench) -> int | None:
    """Run one pyshim container so that its fork server exists; the server's pid."""
    cid = b.c.new_id("warm")
    ok, _, _ = b.ctr_ok(
        "run", "--rm", "--runtime", RUNTIMES["pyshim"], "--rootfs", b.rootfs, cid, "/bin/true"
    )
    if not ok:
        b.force_cleanup(cid)
    fs_dir = Path(b.c.env["PYSHIM_FORKSERVER_DIR"])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for pid_file in fs_dir.glob("forkserver-*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                if (fs_dir / pid_file.name.replace(".pid", ".sock")).exists():
                    return pid
        time.sleep(0.1)
    return None


def first_line(*cmd: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "?"
    return out.splitlines()[0] if out else "?"


# --------------------------------------------------------------------------- helpers


class Bench:
    def __init__(self, c: pc.PrivateContainerd, rootfs: Path, ev: StampedEvents) -> None:
        self.c = c
        self.rootfs = str(rootfs)
        self.ev = ev

    def ctr_ok(self, *args: str, timeout: float = 60) -> tuple[bool, float, str]:
        t0 = time.monotonic()
        try:
            r = self.c.ctr(*args, timeout=timeout)
        except harness.HarnessError as e:
            return False, time.monotonic() - t0, str(e)
        return r.returncode == 0, time.monotonic() - t0, r.stderr.strip()

    def run_detached(
        self, name: str, cid: str, annotations: dict[str, str] | None = None
    ) -> tuple[bool, float, str]:
        extra = [a for k, v in (annotations or {}).items() for a in ("--annotation", f"{k}={v}")]
        return self.ctr_ok(
            "run", "--runtime", RUNTIMES[name], "-d", *extra, "--rootfs", self.rootfs,
            cid, "/bin/sleep", "1000000",
        )  # fmt: skip

    def teardown(self, cid: str, kill: bool = True) -> tuple[bool, float, str]:
        """kill -9, wait for /tasks/exit, task rm, container rm; (ok, seconds, error)."""
        t0 = time.monotonic()
        errs = []
        if kill:
            ok, _, err = self.ctr_ok("task", "kill", "-s", "SIGKILL", cid)
            if not ok:
                errs.append(f"kill: {err}")
        if self.ev.wait(cid, "/tasks/exit", timeout=20) is None:
            errs.append("no /tasks/exit within 20s")
        for _ in range(50):
            ok, _, err = self.ctr_ok("task", "rm", cid)
            if ok:
                break
            time.sleep(0.1)
        else:
            errs.append(f"task rm: {err}")
        ok, _, err = self.ctr_ok("container", "rm", cid)
        if not ok:
            errs.append(f"container rm: {err}")
        return not errs, time.monotonic() - t0, "; ".join(errs)

    def force_cleanup(self, cid: str) -> None:
        with contextlib.suppress(harness.HarnessError):
            self.c.ctr("task", "kill", "-s", "SIGKILL", cid, timeout=10)
            time.sleep(0.2)
            self.c.ctr("task", "rm", "-f", cid, timeout=20)
            self.c.ctr("container", "rm", cid, timeout=20)


def smaps_rollup(pid: int) -> dict[str, int] | None:
    """RSS/PSS/USS and KSM-merged memory in KiB."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    kv: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":"):
            with contextlib.suppress(ValueError):
                kv[parts[0][:-1]] = int(parts[1])
    return {
        "rss": kv.get("Rss", 0),
        "pss": kv.get("Pss", 0),
        "uss": kv.get("Private_Clean", 0) + kv.get("Private_Dirty", 0),
        "ksm": kv.get("KSM", 0),
    }


def shim_pids(c: pc.PrivateContainerd) -> dict[str, list[int]]:
    """Shim processes of this containerd by the ``-id`` they were started with.

    Read from /proc directly: psutil's process_iter caches Process objects by
    pid and (since psutil 6) skips one whose pid was reused, which after a
    teardown of hundreds of shims hid a new one now and then."""
    by_id: dict[str, list[int]] = {}
    address = str(c.address)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmd = Path(entry.path, "cmdline").read_bytes().decode(errors="replace").split("\0")
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state == "Z" or not pc.has_flag(cmd, "-address", address):
            continue
        for i, arg in enumerate(cmd[:-1]):
            if arg == "-id":
                by_id.setdefault(cmd[i + 1], []).append(int(entry.name))
    return by_id


def shim_usage(c: pc.PrivateContainerd, groups: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Per shim (named by the id it was started with: a single container, or a
    pod's sandbox): its memory (summed over its processes, normally one) and how
    many containers it serves."""
    by_id = shim_pids(c)
    if any(gid not in by_id for gid in groups):
        time.sleep(1)  # a scan of /proc can miss one: look again
        by_id = shim_pids(c)
    out = []
    missing = []
    for gid, members in groups.items():
        pids = by_id.get(gid, [])
        if not pids:
            missing.append(gid)
            continue
        tot = {"rss": 0, "pss": 0, "uss": 0, "ksm": 0, "procs": len(pids)}
        for pid in pids:
            m = smaps_rollup(pid)
            if m:
                for k in m:
                    tot[k] += m[k]
        tot["containers"] = len(members)
        out.append(tot)
    if missing:
        print(f"  no shim process found for {len(missing)} of {len(groups)}: {missing[:5]}")
        if os.environ.get("PYSHIM_BENCH_DEBUG"):
            for gid in missing[:2]:
                print(subprocess.run(["pgrep", "-af", gid], capture_output=True, text=True).stdout)
                print(b_ctr_tasks(c, gid))
    return out


def b_ctr_tasks(c: pc.PrivateContainerd, gid: str) -> str:
    return "\n".join(line for line in c.ctr("task", "ls").stdout.splitlines() if gid in line)


def summarize(per: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per shim and per container, totals; KiB."""
    out: dict[str, Any] = {
        "shims": len(per),
        "containers": sum(m["containers"] for m in per),
        "procs_per_shim": median([m["procs"] for m in per]),
    }
    for k in ("rss", "pss", "uss", "ksm"):
        out[k + "_kib"] = median([m[k] for m in per])
        out[k + "_total_kib"] = sum(m[k] for m in per)
        out[k + "_per_ctr_kib"] = median([m[k] / m["containers"] for m in per])
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def bootstrap_ci(xs: list[float], level: float = 0.95, resamples: int = 2000) -> list[float]:
    """A percentile bootstrap interval for the median of ``xs``: how far this
    machine's noise alone moves the figure (on 2 busy cores, easily +-5 %)."""
    if len(xs) < 2:
        return [float("nan"), float("nan")]
    rng = random.Random(0)  # the same data gives the same interval
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    tail = (1 - level) / 2
    return [meds[int(tail * resamples)], meds[int((1 - tail) * resamples) - 1]]


def order(rnd: int) -> list[str]:
    return NAMES if rnd % 2 == 0 else NAMES[::-1]


# --------------------------------------------------------------------------- KSM


class Ksm:
    """Switches the node's KSM on for a round and always puts back what was there
    (run, pages_to_scan, sleep_millisecs), also when the bench fails."""

    DIR = Path("/sys/kernel/mm/ksm")
    SAVED = ("run", "pages_to_scan", "sleep_millisecs")

    def __init__(self, pages_to_scan: int, sleep_ms: int) -> None:
        self.pages_to_scan = pages_to_scan
        self.sleep_ms = sleep_ms
        self.saved: dict[str, str] = {}
        self.ksmd = self._ksmd_pid()

    @classmethod
    def unavailable(cls) -> str:
        """Why the KSM route cannot run here ("" if it can)."""
        if not (cls.DIR / "run").exists():
            return "no /sys/kernel/mm/ksm (a kernel without CONFIG_KSM)"
        if not os.access(cls.DIR / "run", os.W_OK):
            return "/sys/kernel/mm/ksm/run is not writable (root, and a writable /sys)"
        return ""

    def read(self, name: str) -> int:
        try:
            return int((self.DIR / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return -1

    def __enter__(self) -> Ksm:
        self.saved = {n: (self.DIR / n).read_text().strip() for n in self.SAVED}
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def on(self, pages_to_scan: int | None = None) -> None:
        (self.DIR / "pages_to_scan").write_text(str(pages_to_scan or self.pages_to_scan))
        (self.DIR / "sleep_millisecs").write_text(str(self.sleep_ms))
        (self.DIR / "run").write_text("1")

    def pause(self) -> None:
        """Stop ksmd (merged pages stay merged until written); ``restore`` follows."""
        (self.DIR / "run").write_text("0")

    def restore(self) -> None:
        if not self.saved:
            return
        # run first: 0 stops ksmd (merged pages stay merged until written)
        for name in ("run", "pages_to_scan", "sleep_millisecs"):
            with contextlib.suppress(OSError):
                (self.DIR / name).write_text(self.saved[name])
        self.saved = {}

    @staticmethod
    def _ksmd_pid() -> int | None:
        out = subprocess.run(["pgrep", "-x", "ksmd"], capture_output=True, text=True).stdout
        return int(out.split()[0]) if out.split() else None

    def cpu(self) -> float:
        """ksmd's utime + stime, seconds."""
        if self.ksmd is None:
            return float("nan")
        try:
            fields = Path(f"/proc/{self.ksmd}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def converge(self, timeout: float) -> dict[str, Any]:
        """Wait until ksmd merged what it will: at least 3 full scans after now, and
        pages_sharing moved by < 0.5 % over the last one. ksmd's CPU meanwhile."""
        t0, cpu0 = time.monotonic(), self.cpu()
        scans0, scanned0 = self.read("full_scans"), self.read("pages_scanned")
        last_scan, last_sharing, converged = scans0, -1, False
        while time.monotonic() - t0 < timeout:
            time.sleep(0.2)
            scans = self.read("full_scans")
            if scans == last_scan:
                continue
            sharing = self.read("pages_sharing")
            if scans - scans0 >= 3 and abs(sharing - last_sharing) <= max(16, sharing // 200):
                converged = True
                break
            last_scan, last_sharing = scans, sharing
        seconds = time.monotonic() - t0
        scans = self.read("full_scans") - scans0
        return {
            "converged": converged,
            "seconds": seconds,
            "cpu_s": self.cpu() - cpu0,
            "full_scans": scans,
            "pages_per_scan": (self.read("pages_scanned") - scanned0) / scans
            if scans > 0
            else None,
            "pages_shared": self.read("pages_shared"),
            "pages_sharing": self.read("pages_sharing"),
        }

    def rate(self, seconds: float) -> float:
        """ksmd's CPU, in % of one core, over ``seconds`` from now."""
        c0, t0 = self.cpu(), time.monotonic()
        time.sleep(seconds)
        return 100 * (self.cpu() - c0) / (time.monotonic() - t0)


# --------------------------------------------------------------------------- phases


def latency_rounds(b: Bench, rounds: int, res: dict[str, Any]) -> None:
    lat: dict[str, dict[str, list[float | None]]] = {
        n: {f: [] for f in LATENCY_FIGURES} for n in NAMES
    }
    errors: list[str] = []
    for rnd in range(-1, rounds):  # round -1 = warm-up, not recorded
        for name in order(rnd):
            row: dict[str, float | None] = dict.fromkeys(LATENCY_FIGURES)
            # 1. cold run --rm /bin/true
            cid = b.c.new_id(f"cold-{name}")
            ok, dt, err = b.ctr_ok(
                "run", "--rm", "--runtime", RUNTIMES[name], "--rootfs", b.rootfs, cid, "/bin/true"
            )
            row["cold"] = dt if ok else None
            if not ok:
                errors.append(f"{name} cold: {err}")
                b.force_cleanup(cid)
            # 2. create+start
            cid = b.c.new_id(f"lat-{name}")
            ok, dt, err = b.run_detached(name, cid)
            row["start"] = dt if ok else None
            if ok:
                # 4. exec
                ok2, dt2, err2 = b.ctr_ok("task", "exec", "--exec-id", "x1", cid, "/bin/true")
                row["exec"] = dt2 if ok2 else None
                if not ok2:
                    errors.append(f"{name} exec: {err2}")
                # 3. kill+delete
                ok3, dt3, err3 = b.teardown(cid)
                row["kill+rm"] = dt3 if ok3 else None
                if not ok3:
                    errors.append(f"{name} kill+rm: {err3}")
                    b.force_cleanup(cid)
            else:
                errors.append(f"{name} start: {err}")
                b.force_cleanup(cid)
            # 5. exit -> event: SIGKILL the init directly, t0 = just before os.kill
            cid = b.c.new_id(f"ev-{name}")
            ok, _, err = b.run_detached(name, cid)
            if ok:
                pid = None
                with contextlib.suppress(harness.HarnessError):
                    pid = b.c.task_pid(cid)
                if pid:
                    time.sleep(0.05)
                    t0 = time.monotonic()
                    os.kill(pid, signal.SIGKILL)
                    t1 = b.ev.wait(cid, "/tasks/exit", timeout=20)
                    row["exit->event"] = None if t1 is None else t1 - t0
                ok3, _, err3 = b.teardown(cid, kill=not pid)
                if not ok3:
                    b.force_cleanup(cid)
            else:
                errors.append(f"{name} start(ev): {err}")
                b.force_cleanup(cid)
            if rnd >= 0:
                for f in LATENCY_FIGURES:
                    lat[name][f].append(row[f])
            shown = "  ".join(
                f"{f} {'FAIL' if row[f] is None else f'{(row[f] or 0) * 1000:.0f}'}"
                for f in LATENCY_FIGURES
            )
            print(f"  round {rnd:>2} {name:<6} {shown} (ms)", flush=True)
    summary: dict[str, Any] = {}
    for f in LATENCY_FIGURES:
        s: dict[str, Any] = {}
        for n in NAMES:
            vals = [v for v in lat[n][f] if v is not None]
            s[n] = {"median_ms": median(vals) * 1000, "n": len(vals)}
        ratios = [p / g for p, g in zip(lat["pyshim"][f], lat["go"][f], strict=True) if p and g]
        s["ratio"] = median(ratios)
        s["ratio_ci95"] = bootstrap_ci(ratios)
        summary[f] = s
    res["latency"] = {"rounds": rounds, "figures": summary, "raw": lat, "errors": errors}


def start_many(b: Bench, names: list[str], count: int, pool: int) -> dict[str, Any]:
    """Start *count* containers of each runtime in *names* (interleaved), *pool* at a time."""
    jobs = [(n, b.c.new_id(f"m-{n}")) for i in range(count) for n in order(i) if n in names]
    t0 = time.monotonic()
    with ThreadPoolExecutor(pool) as ex:
        results = list(ex.map(lambda j: (j, b.run_detached(*j)), jobs))
    total = time.monotonic() - t0
    return {"results": results, "seconds": total}


def teardown_many(b: Bench, cids: list[str], pool: int) -> tuple[float, int, list[str]]:
    t0 = time.monotonic()
    with ThreadPoolExecutor(pool) as ex:
        results = list(ex.map(b.teardown, cids))
    errs = [e for ok, _, e in results if not ok]
    for (ok, _, _), cid in zip(results, cids, strict=True):
        if not ok:
            b.force_cleanup(cid)
    return time.monotonic() - t0, len(errs), errs[:5]


# --------------------------------------------------------------------------- memory


def start_singles(b: Bench, names: list[str], count: int) -> dict[str, list[str]]:
    """``count`` single containers per runtime (interleaved), POOL at a time;
    {runtime: started ids}."""
    st = start_many(b, names, count, POOL)
    out: dict[str, list[str]] = {n: [] for n in names}
    fails = [e for (_, _), (ok, _, e) in st["results"] if not ok]
    for (name, cid), (ok, _, _) in st["results"]:
        out[name].append(cid) if ok else b.force_cleanup(cid)
    if fails:
        print(f"  {len(fails)} failed starts: {fails[:3]}", flush=True)
    return out


def start_pods(b: Bench, name: str, pods: int, per_pod: int) -> dict[str, list[str]]:
    """Pods as CRI makes them, with ctr: a sandbox (pause) container and ``per_pod``
    containers annotated with its id, so one shim serves them all (both shims
    group by ``io.kubernetes.cri.sandbox-id``). {sandbox id: its container ids}."""

    def one_pod(index: int) -> tuple[str, list[str]]:
        sandbox = b.c.new_id(f"pod-{name}")
        ok, _, err = b.run_detached(name, sandbox, {SANDBOX_ID: sandbox, CONTAINER_TYPE: "sandbox"})
        if not ok:
            print(f"  {name} sandbox failed: {err}", flush=True)
            b.force_cleanup(sandbox)
            return sandbox, []
        members = [sandbox]
        for i in range(per_pod):
            cid = b.c.new_id(f"pod{i}-{name}")
            ok, _, err = b.run_detached(
                name, cid, {SANDBOX_ID: sandbox, CONTAINER_TYPE: "container"}
            )
            if ok:
                members.append(cid)
            else:
                print(f"  {name} container of pod {sandbox} failed: {err}", flush=True)
                b.force_cleanup(cid)
        return sandbox, members

    with ThreadPoolExecutor(POOL) as ex:
        return {sandbox: members for sandbox, members in ex.map(one_pod, range(pods)) if members}


def teardown_groups(b: Bench, groups: dict[str, list[str]]) -> None:
    """Containers before their sandbox: a pod's shim exits with its last task."""
    members = [cid for ids in groups.values() for cid in ids[1:]]
    teardown_many(b, members, POOL)
    teardown_many(b, list(groups), POOL)


def server_memory(b: Bench, server: int | None) -> dict[str, int] | None:
    return smaps_rollup(server) if server else None


def memory_row(
    b: Bench, layout: str, route: str, groups: dict[str, list[str]], server: int | None
) -> dict[str, Any]:
    row = {"layout": layout, "route": route, **summarize(shim_usage(b.c, groups))}
    row["server"] = server_memory(b, server) if route.startswith("pyshim") else None
    m = row
    print(
        f"  {layout:<30} {route:<11} {m['shims']:>4} shims {m['containers']:>4} containers: "
        f"PSS {m['pss_kib'] / MiB:.2f} USS {m['uss_kib'] / MiB:.2f} MiB/shim, "
        f"PSS {m['pss_per_ctr_kib'] / MiB:.2f} USS {m['uss_per_ctr_kib'] / MiB:.2f} MiB/container",
        flush=True,
    )
    return row


def memory(
    build: Build, counts: list[int], pods: int, per_pod: int, ksm: Ksm | None, res: dict[str, Any]
) -> None:
    """Idle memory per container: the Go shim and pyshim side by side in one
    containerd, then pyshim with PYSHIM_KSM=1 in another (its own fork server)
    while ksmd runs."""
    rows: list[dict[str, Any]] = []
    ksm_rounds: list[dict[str, Any]] = []
    layouts: list[tuple[str, int, int]] = [(f"{n} single", n, 0) for n in counts]
    if pods:
        layouts.append((f"{pods} pods (1+{per_pod})", pods, per_pod))
    with private_containerd(build) as b:
        server = warm_up(b)
        for layout, n, per in layouts:
            if per:
                by_name = {name: start_pods(b, name, n, per) for name in NAMES}
            else:
                ids = start_singles(b, NAMES, n)
                by_name = {name: {cid: [cid] for cid in ids[name]} for name in NAMES}
            time.sleep(SETTLE)
            for name in ("go", "pyshim"):
                rows.append(memory_row(b, layout, name, by_name[name], server))
            if polled(layout, n, per, counts):
                rows += poll_rounds(b, layout, {"go": by_name["go"], "pyshim": by_name["pyshim"]},
                                    server)  # fmt: skip
            for name in NAMES:
                teardown_groups(b, by_name[name])
    if ksm is not None:
        with private_containerd(build, {KSM_ENV: "1"}) as b, ksm:
            server = warm_up(b)
            largest = max(n for _, n, per in layouts if not per) if counts else 0
            for layout, n, per in layouts:
                if per:
                    groups = start_pods(b, "pyshim", n, per)
                else:
                    groups = {cid: [cid] for cid in start_singles(b, ["pyshim"], n)["pyshim"]}
                time.sleep(SETTLE)  # the daemons marked their pages (2 s idle)
                ksm.on()
                k = ksm.converge(timeout=KSM_TIMEOUT[0])
                k["layout"] = layout
                k["steady_pct"] = ksm.rate(5.0)
                if n == largest and not per:  # the kernel's default pace, for an operator
                    ksm.on(pages_to_scan=100)
                    k["default_pace_pct"] = ksm.rate(10.0)
                    ksm.on()
                rows.append(memory_row(b, layout, "pyshim+KSM", groups, server))
                rows[-1]["ksm_round"] = k
                ksm_rounds.append(k)
                print(
                    f"    ksmd: {'merged' if k['converged'] else 'NOT converged'} in "
                    f"{k['seconds']:.0f} s ({k['full_scans']} full scans), CPU {k['cpu_s']:.1f} s, "
                    f"then {k['steady_pct']:.1f} % of a core",
                    flush=True,
                )
                if polled(layout, n, per, counts):
                    cpu0, t0 = ksm.cpu(), time.monotonic()
                    rows += poll_rounds(b, layout, {"pyshim+KSM": groups}, server)
                    k["polled_pct"] = 100 * (ksm.cpu() - cpu0) / (time.monotonic() - t0)
                ksm.pause()  # the next round starts unmerged
                teardown_groups(b, groups)
    res["memory"] = {
        "counts": counts,
        "pods": pods,
        "per_pod": per_pod,
        "rows": rows,
        "ksm": None
        if ksm is None
        else {
            "pages_to_scan": ksm.pages_to_scan,
            "sleep_millisecs": ksm.sleep_ms,
            "rounds": ksm_rounds,
        },
        "ksm_skipped": KSM_SKIPPED[0],
    }


KSM_TIMEOUT = [300.0]
KSM_SKIPPED = [""]
POLL = [10.0, 3]  # seconds between Stats polls, polls (--poll, --poll-rounds)


def polled(layout: str, n: int, per: int, counts: list[int]) -> bool:
    """Poll the largest single layout and the pods (as kubelet's stats do on a node)."""
    return POLL[0] > 0 and POLL[1] > 0 and (bool(per) or n == max(counts, default=0))


def poll_rounds(
    b: Bench, layout: str, routes: dict[str, dict[str, list[str]]], server: int | None
) -> list[dict[str, Any]]:
    """Stats for every container every POLL[0] s (``ctr task metrics``: containerd
    asks the shim, as CRI's ListContainerStats does for the kubelet), POLL[1]
    times; memory right after the last poll and again POLL[0] s later (the best
    moment of the cycle: just before the next poll would come)."""
    interval, rounds = POLL[0], int(POLL[1])
    every = [cid for groups in routes.values() for ids in groups.values() for cid in ids]
    tag = f"Stats/{interval:.0f}s"
    rows = []
    for i in range(rounds):
        t0 = time.monotonic()
        with ThreadPoolExecutor(POOL) as ex:
            list(ex.map(lambda cid: b.ctr_ok("task", "metrics", cid), every))
        if i == rounds - 1:
            for route, groups in routes.items():
                rows.append(memory_row(b, f"{layout}, just {tag}", route, groups, server))
        time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    for route, groups in routes.items():
        rows.append(memory_row(b, f"{layout}, {tag}", route, groups, server))
    return rows


def burst(b: Bench, count: int, res: dict[str, Any]) -> None:
    out: dict[str, Any] = {"count": count, "pool": POOL}
    for n in NAMES:
        st = start_many(b, [n], count, POOL)
        cids = [cid for (_, cid), _ in st["results"]]
        start_fail = sum(1 for _, (ok, _, _) in st["results"] if not ok)
        td, td_fail, errs = teardown_many(b, cids, POOL)
        out[n] = {
            "start_s": st["seconds"],
            "teardown_s": td,
            "total_s": st["seconds"] + td,
            "start_failures": start_fail,
            "teardown_failures": td_fail,
            "errors": [e for _, (ok, _, e) in st["results"] if not ok][:5] + errs,
        }
        print(
            f"  {n:<6} start {st['seconds']:.1f}s teardown {td:.1f}s "
            f"failures {start_fail}+{td_fail}",
            flush=True,
        )
    res["burst"] = out


def scale(b: Bench, count: int, res: dict[str, Any]) -> None:
    out: dict[str, Any] = {"count": count, "pool": POOL}
    for n in NAMES:
        st = start_many(b, [n], count, POOL)
        ok_cids = [cid for (_, cid), (ok, _, _) in st["results"] if ok]
        fails = len(st["results"]) - len(ok_cids)
        time.sleep(2)
        mem = summarize(shim_usage(b.c, {cid: [cid] for cid in ok_cids}))
        cids = [cid for (_, cid), _ in st["results"]]
        td, td_fail, errs = teardown_many(b, cids, POOL)
        out[n] = {
            "start_s": st["seconds"],
            "teardown_s": td,
            "total_s": st["seconds"] + td,
            "start_failures": fails,
            "teardown_failures": td_fail,
            "errors": [e for _, (ok, _, e) in st["results"] if not ok][:5] + errs,
            **mem,
        }
        print(
            f"  {n:<6} start {st['seconds']:.1f}s teardown {td:.1f}s failures {fails}+{td_fail} "
            f"USS/shim {mem['uss_kib'] / 1024:.1f} MiB, PSS total "
            f"{mem['pss_total_kib'] / 1024:.0f} MiB",
            flush=True,
        )
    res["scale"] = out


# --------------------------------------------------------------------------- report


def fmt_ratio(p: float, g: float) -> str:
    return f"{p / g:.2f}x" if g and g == g and p == p else "-"


def report_memory(m: dict[str, Any]) -> list[str]:
    lines = [
        "Idle memory, MiB: median per shim, and per container (a pod's shim serves its "
        "pause container and the others)",
        f"{'layout':<30} {'route':<11} {'shims':>5} {'ctrs':>5} {'RSS':>6} {'PSS':>6} "
        f"{'USS':>6} {'KSM':>6} {'PSS/ctr':>8} {'USS/ctr':>8} {'vs go PSS':>10} "
        f"{'vs go USS':>10} {'PSS/ctr+srv':>12}",
    ]
    go_rows = {r["layout"]: r for r in m["rows"] if r["route"] == "go"}
    servers: dict[str, dict[str, int]] = {}
    for r in m["rows"]:
        g = go_rows.get(r["layout"])
        srv = r.get("server")
        if srv:
            servers.setdefault(r["route"], srv)
        with_server = (
            (r["pss_total_kib"] + srv["pss"]) / r["containers"] if srv and r["containers"] else None
        )
        lines.append(
            f"{r['layout']:<30} {r['route']:<11} {r['shims']:>5} {r['containers']:>5} "
            f"{r['rss_kib'] / MiB:>6.1f} {r['pss_kib'] / MiB:>6.2f} {r['uss_kib'] / MiB:>6.2f} "
            f"{r['ksm_kib'] / MiB:>6.2f} {r['pss_per_ctr_kib'] / MiB:>8.2f} "
            f"{r['uss_per_ctr_kib'] / MiB:>8.2f} "
            f"{fmt_ratio(r['pss_per_ctr_kib'], g['pss_per_ctr_kib']) if g else '-':>10} "
            f"{fmt_ratio(r['uss_per_ctr_kib'], g['uss_per_ctr_kib']) if g else '-':>10} "
            f"{'' if with_server is None else f'{with_server / MiB:.2f}':>12}"
        )
    if servers:
        shown = "; ".join(
            f"{route} PSS {srv['pss'] / MiB:.1f} MiB, USS {srv['uss'] / MiB:.1f} MiB"
            for route, srv in servers.items()
        )
        lines.append(
            f"fork server (one per node, its pages shared with the daemons): {shown}; "
            "PSS/ctr+srv adds its PSS, spread over the containers"
        )
    k = m.get("ksm")
    if k:
        lines.append(
            f"ksmd, pages_to_scan {k['pages_to_scan']}, sleep_millisecs {k['sleep_millisecs']} "
            "(only the pyshim+KSM rows; restored afterwards):"
        )
        for r in k["rounds"]:
            pace = (
                f", at the kernel's default pace (100 pages) {r['default_pace_pct']:.2f} %"
                if "default_pace_pct" in r
                else ""
            )
            if "polled_pct" in r:
                pace += f"; {r['polled_pct']:.1f} % while polled"
            per_scan = r.get("pages_per_scan")
            lines.append(
                f"  {r['layout']:<18} {'merged' if r['converged'] else 'NOT converged'} after "
                f"{r['seconds']:.0f} s ({r['full_scans']} full scans"
                f"{'' if per_scan is None else f' of {per_scan:.0f} pages'}): "
                f"CPU {r['cpu_s']:.1f} s; "
                f"then {r['steady_pct']:.1f} % of a core{pace}; pages_sharing "
                f"{r['pages_sharing']}, pages_shared {r['pages_shared']}"
            )
    elif m.get("ksm_skipped"):
        lines.append(f"pyshim+KSM not measured: {m['ksm_skipped']}")
    return lines


def report(res: dict[str, Any]) -> str:
    lines = [res["versions"], ""]
    if "latency" in res:
        lat = res["latency"]
        lines.append(
            f"Latency, ms (median of {lat['rounds']} interleaved rounds; "
            "ratio = median of per-round pyshim/go, with its 95 % bootstrap interval)"
        )
        lines.append(f"{'figure':<14} {'pyshim':>9} {'go':>9} {'pyshim/go':>10} {'95% CI':>13}")
        for f, s in lat["figures"].items():
            lo, hi = s.get("ratio_ci95", [float("nan")] * 2)
            lines.append(
                f"{f:<14} {s['pyshim']['median_ms']:>9.1f} {s['go']['median_ms']:>9.1f} "
                f"{s['ratio']:>9.2f}x {lo:>6.2f}-{hi:.2f}x"
            )
        if lat["errors"]:
            lines.append(f"latency errors: {len(lat['errors'])}: {lat['errors'][:3]}")
        lines.append("")
    if "memory" in res:
        lines += report_memory(res["memory"])
        lines.append("")
    if "burst" in res:
        bu = res["burst"]
        lines.append(f"Burst: {bu['count']} containers, {bu['pool']} at a time, seconds")
        lines.append(f"{'runtime':<8} {'start':>7} {'teardown':>9} {'total':>7} {'failures':>9}")
        for n in NAMES:
            x = bu[n]
            lines.append(
                f"{n:<8} {x['start_s']:>7.1f} {x['teardown_s']:>9.1f} {x['total_s']:>7.1f} "
                f"{x['start_failures'] + x['teardown_failures']:>9}"
            )
        lines.append("")
    if "scale" in res:
        sc = res["scale"]
        lines.append(
            f"Scale: {sc['count']} idle containers per runtime (one runtime at a time, "
            f"{sc['pool']} at a time); seconds, MiB"
        )
        lines.append(
            f"{'runtime':<8} {'start':>7} {'teardown':>9} {'failures':>9} "
            f"{'RSS/shim':>9} {'PSS/shim':>9} {'USS/shim':>9} {'PSS total':>10}"
        )
        for n in NAMES:
            x = sc[n]
            lines.append(
                f"{n:<8} {x['start_s']:>7.1f} {x['teardown_s']:>9.1f} "
                f"{x['start_failures'] + x['teardown_failures']:>9} "
                f"{x['rss_kib'] / 1024:>9.1f} {x['pss_kib'] / 1024:>9.1f} "
                f"{x['uss_kib'] / 1024:>9.1f} {x['pss_total_kib'] / 1024:>10.0f}"
            )
    return "\n".join(lines).rstrip()


def versions(build: Build) -> str:
    return (
        f"date {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}, "
        f"nproc {os.cpu_count()}, {platform.system()} {platform.release()}, "
        f"load {os.getloadavg()[0]:.2f}\n"
        f"{build.version()} ({build.label}; the Go shim: its containerd-shim-runc-v2)\n"
        f"{first_line(build.which('runc') or 'runc', '--version')}\n"
        + (
            "A/A calibration: the Go shim runs in the pyshim column too (--aa)"
            if build.aa_dir
            else f"pyshim on python {platform.python_version()} ({sys.executable})"
        )
    )


def parse_counts(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip() and int(x) > 0]


def run_build(build: Build, args: argparse.Namespace, res: dict[str, Any]) -> None:
    p = res["params"]
    ksm = None
    mem = "memory" in p["phases"] and (p["memory"] or p["pods"])
    if mem and args.ksm != "off":
        why = Ksm.unavailable()
        if why:
            KSM_SKIPPED[0] = why
        else:
            ksm = Ksm(args.ksm_pages_to_scan, args.ksm_sleep_ms)
    if "latency" in p["phases"] and p["rounds"]:
        print(f"latency, {p['rounds']} rounds (+1 warm-up)", flush=True)
        with private_containerd(build) as b:
            latency_rounds(b, p["rounds"], res)
    if mem:
        print(f"memory, {p['memory']} idle containers, {p['pods']} pods", flush=True)
        memory(build, p["memory"], p["pods"], p["per_pod"], ksm, res)
    if ("burst" in p["phases"] and p["burst"]) or ("scale" in p["phases"] and p["scale"]):
        with private_containerd(build) as b:
            warm_up(b)
            if "burst" in p["phases"] and p["burst"]:
                print(f"burst, {p['burst']} containers, {POOL} at a time", flush=True)
                burst(b, p["burst"], res)
            if "scale" in p["phases"] and p["scale"]:
                print(f"scale, {p['scale']} idle containers per runtime", flush=True)
                scale(b, p["scale"], res)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts (~1 min)")
    ap.add_argument("--only", help=f"comma-separated phases of {','.join(PHASES)}")
    ap.add_argument("--rounds", type=int, help="latency rounds (default 15, quick 5)")
    ap.add_argument(
        "--idle", help="idle single containers per memory round, e.g. 20,200 (quick 5,20)"
    )
    ap.add_argument("--pods", type=int, help="pods per runtime in the memory phase (10, quick 3)")
    ap.add_argument("--per-pod", type=int, default=3, help="containers per pod besides its pause")
    ap.add_argument("--burst", type=int, help="containers in the burst test (50/10)")
    ap.add_argument("--scale", type=int, help="idle containers per runtime, scale test (200/20)")
    ap.add_argument(
        "--ksm",
        choices=["auto", "off"],
        default="auto",
        help="the pyshim+KSM memory route (auto: where the kernel has KSM)",
    )
    ap.add_argument(
        "--ksm-pages-to-scan",
        type=int,
        default=1000,
        help="ksmd's pages per wake-up during the KSM rounds (kernel default 100)",
    )
    ap.add_argument("--ksm-sleep-ms", type=int, default=20, help="ksmd's sleep (kernel default 20)")
    ap.add_argument("--ksm-timeout", type=float, default=300, help="seconds to wait for merging")
    ap.add_argument(
        "--poll",
        type=float,
        default=10,
        help="seconds between Stats polls of the largest layout and the pods (0: no polling)",
    )
    ap.add_argument("--poll-rounds", type=int, default=3, help="Stats polls before measuring")
    ap.add_argument(
        "--containerd",
        action="append",
        metavar="DIR",
        help="a containerd build (containerd, ctr, containerd-shim-runc-v2); repeat for "
        "several; 'system' = the system's. Default: $PYSHIM_BENCH_CONTAINERDS (DIR:DIR), "
        "else $PYSHIM_E2E_CONTAINERD, else system",
    )
    ap.add_argument(
        "--aa",
        action="store_true",
        help="calibration: run the Go shim in both columns (latency only); a ratio away "
        "from 1.00x is the bench's own bias and noise",
    )
    ap.add_argument("--json", metavar="FILE", help="write machine-readable results")
    args = ap.parse_args()
    q = args.quick
    phases = [x for x in (args.only or ",".join(PHASES)).split(",") if x]
    if unknown := set(phases) - set(PHASES):
        ap.error(f"unknown phases {sorted(unknown)}; choose from {PHASES}")
    if args.aa and phases != ["latency"]:
        ap.error("--aa measures latency only: add --only latency")
    params = {
        "phases": phases,
        "rounds": args.rounds if args.rounds is not None else (5 if q else 15),
        "memory": parse_counts(args.idle)
        if args.idle is not None
        else ([5, 20] if q else [20, 200]),
        "pods": args.pods if args.pods is not None else (3 if q else 10),
        "per_pod": args.per_pod,
        "burst": args.burst if args.burst is not None else (10 if q else 50),
        "scale": args.scale if args.scale is not None else (20 if q else 200),
    }
    KSM_TIMEOUT[0] = args.ksm_timeout
    POLL[:] = [args.poll, args.poll_rounds]
    builds = builds_from(args)
    for build in builds:
        if missing := build.missing():
            print(f"containerd build {build.label}: missing {', '.join(missing)}", file=sys.stderr)
            return 2
    if os.geteuid() != 0:
        print("run as root (private containerds, runc, /proc of other processes)", file=sys.stderr)
        return 2
    # SIGTERM runs the clean-up too (containers, containerd, the node's KSM settings)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="pyshim-suite-"))
    t_all = time.monotonic()
    results: list[dict[str, Any]] = []
    try:
        ROOTFS[:] = [harness.busybox_rootfs(work / "rootfs")]
        if args.aa:
            for i, build in enumerate(builds):
                build.aa_dir = str(work / f"aa{i}")
                os.mkdir(build.aa_dir)
                go_shim = build.which("containerd-shim-runc-v2")
                assert go_shim is not None  # checked by build.missing()
                pyshim_name = pc.shim_binary_name(RUNTIMES["pyshim"])
                os.symlink(go_shim, os.path.join(build.aa_dir, pyshim_name))
        for build in builds:
            res: dict[str, Any] = {"versions": versions(build), "params": params}
            res["build"] = build.label
            print(res["versions"], flush=True)
            t0 = time.monotonic()
            run_build(build, args, res)
            res["wall_s"] = time.monotonic() - t0
            results.append(res)
    finally:
        harness.unmount_all_under(work)
        shutil.rmtree(work, ignore_errors=True)
    for res in results:
        print()
        print(report(res))
    print(f"\nwall time {time.monotonic() - t_all:.0f}s; pipe/tty throughput: bench/throughput.py")
    if args.json:
        out: Any = results[0] if len(results) == 1 else results
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
