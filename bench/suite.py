#!/usr/bin/env python3
"""Lifecycle latency, memory and scale of pyshim vs the Go reference shim.

A benchmark, not a test: nothing here asserts anything about speed. One
private containerd (tests/e2e/harness.py) hosts both runtimes,
``io.containerd.pyshim.v2`` and ``io.containerd.runc.v2``; every latency round
runs both, interleaved A B B A ..., so drift and background load hit both.

Figures (all wall-clock, measured around whole ``ctr`` invocations, so ctr's
own start-up, ~tens of ms, is included for both runtimes alike):

1. cold     ``ctr run --rm /bin/true``
2. start    ``ctr run -d ... /bin/sleep`` (create + start)
3. exec     ``ctr task exec --exec-id X ID /bin/true``
4. kill+rm  ``ctr task kill -s SIGKILL`` -> /tasks/exit seen -> ``ctr task rm`` -> ``ctr c rm``
5. exit->event  the container's init is SIGKILLed directly (os.kill, t0) and a
   ``ctr events`` subscriber stamps each line with time.monotonic() on arrival;
   figure = arrival of the /tasks/exit line - t0 (absolute ms)
6. memory   N idle containers per runtime; RSS/PSS/USS of each shim from
   /proc/PID/smaps_rollup (USS = Private_Clean + Private_Dirty), median per shim
7. burst    M containers started 8 at a time, then torn down 8 at a time
8. scale    K idle containers, one runtime at a time: failures, time, memory

Pipe/tty throughput lives in bench/throughput.py and is not repeated here.

    .venv/bin/python bench/suite.py            # default, a few minutes on 2 cores
    .venv/bin/python bench/suite.py --quick    # ~30 s
    .venv/bin/python bench/suite.py --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO))

import harness  # noqa: E402  (tests/e2e/harness.py)

RUNTIMES = {"pyshim": harness.RUNTIMES["pyshim"], "go": harness.RUNTIMES["go"]}
NAMES = ["pyshim", "go"]
LATENCY_FIGURES = ["cold", "start", "exec", "kill+rm", "exit->event"]
POOL = 8


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


# --------------------------------------------------------------------------- helpers


class Bench:
    def __init__(self, c: harness.Containerd, rootfs: Path, ev: StampedEvents) -> None:
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

    def run_detached(self, name: str, cid: str) -> tuple[bool, float, str]:
        return self.ctr_ok(
            "run", "--runtime", RUNTIMES[name], "-d", "--rootfs", self.rootfs,
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
    """RSS/PSS/USS in KiB."""
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
    }


def shim_memory(c: harness.Containerd, cids: list[str]) -> dict[str, Any]:
    """Per container: sum over its shim processes (normally one). Medians in KiB."""
    per: list[dict[str, int]] = []
    nprocs = []
    for cid in cids:
        procs = c.shim_processes(cid)
        nprocs.append(len(procs))
        tot = {"rss": 0, "pss": 0, "uss": 0}
        for p in procs:
            m = smaps_rollup(p.pid)
            if m:
                for k in tot:
                    tot[k] += m[k]
        if procs:
            per.append(tot)
    out: dict[str, Any] = {"shims": len(per), "procs_per_shim": median(nprocs)}
    for k in ("rss", "pss", "uss"):
        out[k + "_kib"] = median([m[k] for m in per])
        out[k + "_total_kib"] = sum(m[k] for m in per)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def order(rnd: int) -> list[str]:
    return NAMES if rnd % 2 == 0 else NAMES[::-1]


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
                f"{f} {'FAIL' if row[f] is None else f'{row[f] * 1000:.0f}'}"
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


def idle_memory(b: Bench, count: int, res: dict[str, Any]) -> None:
    started = start_many(b, NAMES, count, 1)
    out: dict[str, Any] = {"count": count}
    time.sleep(2)  # let shims settle
    for n in NAMES:
        cids = [cid for (name, cid), (ok, _, _) in started["results"] if name == n and ok]
        fails = sum(1 for (name, _), (ok, _, _) in started["results"] if name == n and not ok)
        out[n] = {"failures": fails, **shim_memory(b.c, cids)}
        m = out[n]
        print(
            f"  {n:<6} {m['shims']} shims: RSS {m['rss_kib'] / 1024:.1f} MiB, "
            f"PSS {m['pss_kib'] / 1024:.1f} MiB, USS {m['uss_kib'] / 1024:.1f} MiB (median)",
            flush=True,
        )
    all_cids = [cid for (_, cid), _ in started["results"]]
    teardown_many(b, all_cids, POOL)
    res["memory"] = out


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
        mem = shim_memory(b.c, ok_cids)
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


def report(res: dict[str, Any]) -> str:
    lines = [res["versions"], ""]
    if "latency" in res:
        lat = res["latency"]
        lines.append(
            f"Latency, ms (median of {lat['rounds']} interleaved rounds; "
            "ratio = median of per-round pyshim/go)"
        )
        lines.append(f"{'figure':<14} {'pyshim':>9} {'go':>9} {'pyshim/go':>10}")
        for f, s in lat["figures"].items():
            lines.append(
                f"{f:<14} {s['pyshim']['median_ms']:>9.1f} {s['go']['median_ms']:>9.1f} "
                f"{s['ratio']:>9.2f}x"
            )
        if lat["errors"]:
            lines.append(f"latency errors: {len(lat['errors'])}: {lat['errors'][:3]}")
        lines.append("")
    if "memory" in res:
        m = res["memory"]
        lines.append(f"Memory per shim, {m['count']} idle containers per runtime, MiB (median)")
        lines.append(f"{'runtime':<8} {'shims':>5} {'RSS':>7} {'PSS':>7} {'USS':>7}")
        for n in NAMES:
            x = m[n]
            lines.append(
                f"{n:<8} {x['shims']:>5} {x['rss_kib'] / 1024:>7.1f} "
                f"{x['pss_kib'] / 1024:>7.1f} {x['uss_kib'] / 1024:>7.1f}"
            )
        p, g = m["pyshim"], m["go"]
        lines.append(
            f"{'pyshim/go':<8} {'':>5} {fmt_ratio(p['rss_kib'], g['rss_kib']):>7} "
            f"{fmt_ratio(p['pss_kib'], g['pss_kib']):>7} {fmt_ratio(p['uss_kib'], g['uss_kib']):>7}"
        )
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
    return "\n".join(lines)


def versions() -> str:
    def first_line(*cmd: str) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        except OSError:
            return "?"
        return out.splitlines()[0] if out else "?"

    return (
        f"date {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}, "
        f"nproc {os.cpu_count()}, {platform.system()} {platform.release()}, "
        f"python {platform.python_version()}, load {os.getloadavg()[0]:.2f}\n"
        f"{first_line(harness.which('containerd') or 'containerd', '--version')}\n"
        f"{first_line(harness.which('runc') or 'runc', '--version')}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts (~30 s)")
    ap.add_argument("--rounds", type=int, help="latency rounds (default 15, quick 5)")
    ap.add_argument("--idle", type=int, help="idle containers per runtime for memory (20/5)")
    ap.add_argument("--burst", type=int, help="containers in the burst test (50/10)")
    ap.add_argument("--scale", type=int, help="idle containers per runtime, scale test (200/20)")
    ap.add_argument("--json", metavar="FILE", help="write machine-readable results")
    args = ap.parse_args()
    q = args.quick
    rounds = args.rounds if args.rounds is not None else (5 if q else 15)
    idle = args.idle if args.idle is not None else (5 if q else 20)
    nburst = args.burst if args.burst is not None else (10 if q else 50)
    nscale = args.scale if args.scale is not None else (20 if q else 200)

    harness.require_tools()
    for n in NAMES:
        if harness.shim_installed(RUNTIMES[n]) is None:
            print(
                f"{harness.shim_binary_name(RUNTIMES[n])} not on containerd's PATH "
                f"({harness.containerd_path()}); run with the venv's python",
                file=sys.stderr,
            )
            return 2
    res: dict[str, Any] = {"versions": versions()}
    res["params"] = {"rounds": rounds, "idle": idle, "burst": nburst, "scale": nscale}
    print(res["versions"], flush=True)
    work = Path(tempfile.mkdtemp(prefix="pyshim-suite-"))
    t_all = time.monotonic()
    try:
        rootfs = harness.busybox_rootfs(work / "rootfs")
        # info, not debug: the shims' debug logging would be measured too
        with harness.private_containerd(log_level="info") as c:
            ev = StampedEvents(c)
            try:
                b = Bench(c, rootfs, ev)
                if rounds:
                    print(f"latency, {rounds} rounds (+1 warm-up)", flush=True)
                    latency_rounds(b, rounds, res)
                if idle:
                    print(f"memory, {idle} idle containers per runtime", flush=True)
                    idle_memory(b, idle, res)
                if nburst:
                    print(f"burst, {nburst} containers, {POOL} at a time", flush=True)
                    burst(b, nburst, res)
                if nscale:
                    print(f"scale, {nscale} idle containers per runtime", flush=True)
                    scale(b, nscale, res)
            finally:
                ev.stop()
    finally:
        harness.unmount_all_under(work)
        shutil.rmtree(work, ignore_errors=True)
    res["wall_s"] = time.monotonic() - t_all
    print()
    print(report(res))
    print(f"\nwall time {res['wall_s']:.0f}s; pipe/tty throughput: bench/throughput.py")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
