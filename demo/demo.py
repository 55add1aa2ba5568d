#!/usr/bin/env python3
"""pyshim demo: containers through a private containerd with --runtime io.containerd.pyshim.v2.

Run with ``make demo`` (which installs the system packages and the venv first),
or ``.venv/bin/python demo/demo.py [--runtime io.containerd.runc.v2]`` to watch
the same steps with containerd's own Go shim for comparison.

Nothing is registered in containerd's config: the runtime name
``io.containerd.pyshim.v2`` resolves to the binary ``containerd-shim-pyshim-v2``
on containerd's PATH, and the harness puts the venv's bin dir first on it.
The system containerd is never touched: everything runs against a private
containerd in /tmp/pyshim-e2e-*, which is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from harness import (  # path set up above
    RUNNING,
    STOPPED,
    Containerd,
    HarnessError,
    busybox_rootfs,
    exit_code_from_task_rm,
    pid_alive,
    require_tools,
    shim_binary_name,
    shim_installed,
)

TICKER = (
    'trap "echo ticker: got SIGTERM, bye; exit 0" TERM; i=0; '
    'while true; do i=$((i+1)); echo "tick $i $(date +%T)"; sleep 0.5; done'
)


class Demo:
    def __init__(self, runtime: str) -> None:
        self.runtime = runtime
        self.step_no = 0
        self.failures: list[str] = []

    # ---------------------------------------------------------------- output

    def step(self, title: str) -> None:
        self.step_no += 1
        print(f"\n=== Step {self.step_no}: {title}", flush=True)

    def info(self, msg: str) -> None:
        print(f"    {msg}", flush=True)

    def ok(self, msg: str) -> None:
        print(f"    OK: {msg}", flush=True)

    def fail(self, msg: str) -> None:
        self.failures.append(f"step {self.step_no}: {msg}")
        print(f"    FAILED: {msg}", flush=True)

    def show(self, label: str, text: str) -> None:
        text = text.rstrip("\n")
        if not text:
            print(f"    {label}: (empty)")
            return
        print(f"    {label}:")
        for line in text.splitlines():
            print(f"      | {line}")

    def check(self, cond: bool, good: str, bad: str) -> bool:
        (self.ok if cond else self.fail)(good if cond else bad)
        return cond

    # ---------------------------------------------------------------- the demo

    def run(self) -> int:
        self.step("check prerequisites")
        try:
            require_tools()
        except HarnessError as e:
            self.fail(str(e))
            return 1
        shim = shim_installed(self.runtime)
        if shim is None:
            self.fail(
                f"{shim_binary_name(self.runtime)} not found; run `make venv` "
                "(pip install -e .) first"
            )
            return 1
        self.ok(f"runtime {self.runtime} -> {shim}")

        self.step("start a private containerd")
        ctrd = Containerd()
        try:
            ctrd.start()
        except HarnessError as e:
            self.fail(f"containerd did not start: {e}")
            ctrd.stop()
            return 1
        self.ok(f"containerd pid {ctrd.pid}, socket {ctrd.address}, namespace {ctrd.namespace}")
        self.info(f"log: {ctrd.log_path}")
        try:
            self.scenario(ctrd)
        except HarnessError as e:
            self.fail(f"aborted: {e}")
        finally:
            self.step("tear down")
            notes = ctrd.stop()
            for note in notes:
                self.info(f"forced cleanup: {note}")
            self.ok("containerd stopped, temp dir removed")
        print()
        if self.failures:
            print(f"demo finished with {len(self.failures)} failure(s):")
            for f in self.failures:
                print(f"  - {f}")
            return 1
        print(f"demo finished: all steps OK with runtime {self.runtime}")
        return 0

    def scenario(self, ctrd: Containerd) -> None:
        rt = self.runtime
        rootfs = busybox_rootfs(ctrd.dir / "rootfs")
        self.info(f"busybox rootfs: {rootfs}")

        self.step("hello container (ctr run --rm)")
        cmd = "echo hello from $(hostname); echo this goes to stderr >&2; sleep 0.2; exit 7"
        self.info(f"$ ctr run --runtime {rt} --rm --rootfs ROOTFS hello /bin/sh -c '{cmd}'")
        r = ctrd.ctr("run", "--runtime", rt, "--rm", "--rootfs", str(rootfs), "hello",
                     "/bin/sh", "-c", cmd, timeout=30)  # fmt: skip
        self.show("stdout", r.stdout)
        self.show("stderr", r.stderr)
        self.check(r.returncode == 7, "exit code 7 as expected", f"exit code {r.returncode} != 7")

        self.step("a container with a terminal (ctr run -t, on a pty from script(1))")
        tty_cmd = "tty; stty size; sleep 0.2; exit 3"
        argv = ctrd.ctr_argv("run", "--runtime", rt, "-t", "--rm", "--rootfs", str(rootfs),
                             "tty-demo", "/bin/sh", "-c", tty_cmd)  # fmt: skip
        self.info(
            f"$ ctr run --runtime {rt} -t --rm --rootfs ROOTFS tty-demo /bin/sh -c '{tty_cmd}'"
        )
        r = subprocess.run(
            ["script", "-qfec", "stty cols 100 rows 30; " + shlex.join(argv), "/dev/null"],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.show("terminal output", r.stdout.replace("\r", ""))
        self.check(
            "/dev/pts/" in r.stdout and r.returncode == 3,
            "the process ran on a pty; exit code 3",
            f"unexpected: exit code {r.returncode}, output {r.stdout!r}",
        )

        self.step("detached container writing a line every 0.5 s")
        log = ctrd.dir / "ticker.log"
        self.info(f"$ ctr run --runtime {rt} -d --log-uri file://{log} --rootfs ROOTFS ticker ...")
        r = ctrd.ctr("run", "--runtime", rt, "-d", "--log-uri", f"file://{log}",
                     "--rootfs", str(rootfs), "ticker", "/bin/sh", "-c", TICKER,
                     timeout=30)  # fmt: skip
        if not self.check(r.returncode == 0, "started", f"ctr run -d failed: {r.stderr.strip()}"):
            return
        ctrd.wait_task_status("ticker", RUNNING, timeout=10)
        pid = ctrd.task_pid("ticker")
        shim_pids = [p.pid for p in ctrd.shim_processes("ticker")]
        self.info(f"task pid {pid}, shim pid(s) {shim_pids}")
        time.sleep(1.6)
        self.show("ticker.log so far", _read(log))

        self.step("exec into the running container")
        exec_cmd = 'echo "exec: I am pid $$ in $(hostname)"; ps; sleep 0.3'
        self.info(f"$ ctr task exec --exec-id peek ticker /bin/sh -c '{exec_cmd}'")
        r = ctrd.ctr("task", "exec", "--exec-id", "peek", "ticker", "/bin/sh", "-c", exec_cmd,
                     timeout=30)  # fmt: skip
        self.show("stdout", r.stdout)
        if r.stderr.strip():
            self.show("stderr", r.stderr)
        self.check(r.returncode == 0, "exec exit code 0", f"exec exit code {r.returncode}")

        self.step("ctr task ls")
        self.show("ctr task ls", ctrd.ctr("task", "ls").stdout)

        self.step("kill containerd with SIGKILL (the shim and the container must not care)")
        old_ctrd_pid = ctrd.pid
        ctrd.kill(signal.SIGKILL)
        self.info(f"containerd {old_ctrd_pid} killed")
        self.check(
            bool(pid) and pid_alive(pid),
            f"container pid {pid} still alive",
            f"container pid {pid} is gone",
        )
        alive_shims = [p for p in shim_pids if pid_alive(p)]
        self.check(
            alive_shims == shim_pids and bool(shim_pids),
            f"shim pid(s) {shim_pids} still alive",
            f"shim pid(s) {shim_pids}: only {alive_shims} alive",
        )
        lines_before = len(_read(log).splitlines())
        time.sleep(1.1)
        lines_during = len(_read(log).splitlines())
        self.check(
            lines_during > lines_before,
            f"ticker kept logging while containerd was down ({lines_before} -> {lines_during})",
            f"ticker log did not grow while containerd was down ({lines_before} lines)",
        )

        self.step("restart containerd (same root, state and socket)")
        ctrd.start()
        self.ok(f"containerd restarted, pid {ctrd.pid}")
        self.show("ctr task ls", ctrd.ctr("task", "ls").stdout)
        status, new_pid = ctrd.task_status("ticker"), ctrd.task_pid("ticker")
        self.check(
            status == RUNNING and new_pid == pid,
            f"ticker reconnected: RUNNING with the same pid {pid}",
            f"after restart ticker is {status} with pid {new_pid} (before: RUNNING, pid {pid}); "
            "the shim did not reconnect",
        )
        r = ctrd.ctr("shim", "--id", "ticker", "state", timeout=10)
        self.show("ctr shim --id ticker state", r.stdout or r.stderr)

        self.step("stop the ticker (SIGTERM, trapped -> exit 0) and delete it")
        if status is not None:
            ctrd.ctr("task", "kill", "ticker", timeout=10)
            with contextlib.suppress(HarnessError):
                ctrd.wait_task_status("ticker", STOPPED, timeout=10)
            r = ctrd.ctr("task", "rm", "ticker", timeout=15)
            code = exit_code_from_task_rm(r.stderr)
            self.check(
                r.returncode == 0 and code == 0,
                "task deleted, exit status 0",
                f"task rm rc={r.returncode} exit status {code} {r.stderr.strip()}",
            )
        ctrd.ctr("container", "rm", "ticker", timeout=15)
        self.show("ticker.log (last lines)", "\n".join(_read(log).splitlines()[-4:]))
        try:
            ctrd.assert_no_leaks("hello", "ticker")
            self.ok("no shim process, shim socket, runc state or bundle left behind")
        except AssertionError as e:
            self.fail(str(e))


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", default="io.containerd.pyshim.v2", help="containerd runtime")
    args = ap.parse_args()
    print(f"pyshim demo — runtime {args.runtime}")
    return Demo(args.runtime).run()


if __name__ == "__main__":
    sys.exit(main())
