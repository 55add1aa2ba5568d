"""Test doubles and process plumbing shared by the unit tests.

* :func:`install_fake_runc` puts an executable ``runc`` (a shell wrapper that
  runs ``fakes/runc.py`` with this venv's interpreter) into a directory.
* :func:`run_in_subreaper` runs an async test body in a forked child that is a
  child subreaper (``PR_SET_CHILD_SUBREAPER``), as the shim daemon is. The
  pytest process itself must never become one: container processes started by
  the fake runc are re-parented to the nearest subreaper, and only there can a
  :class:`~shimv2.reaper.Reaper` see their exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import select
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

FAKES_DIR = Path(__file__).resolve().parent
FAKE_RUNC = FAKES_DIR / "runc.py"


def install_fake_runc(bin_dir: Path | str, name: str = "runc") -> Path:
    """Write an executable ``<bin_dir>/<name>`` that runs the fake runc."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -S {shlex.quote(str(FAKE_RUNC))} "$@"\n'
    )
    path.chmod(0o755)
    return path


def read_records(path: Path | str) -> list[dict[str, Any]]:
    """The invocations the fake runc recorded (``FAKE_RUNC_RECORD``), oldest first."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def subcommands(records: list[dict[str, Any]]) -> list[list[str]]:
    """Each recorded argv with runc's global flags cut off."""
    out = []
    for entry in records:
        argv = list(entry["argv"])
        i = 0
        while i < len(argv) and argv[i].startswith("-"):
            i += 1 if argv[i] in ("--systemd-cgroup", "--debug") else 2
        out.append(argv[i:])
    return out


def is_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs; a zombie counts as gone."""
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_gone(pid):
            return True
        time.sleep(0.01)
    return is_gone(pid)


def run_in_subreaper(fn: Callable[..., Awaitable[Any]], *args: Any, timeout: float = 30.0) -> Any:
    """``trio.run(fn, *args)`` in a forked child subreaper; returns its (picklable) result.

    The child gets its own process group; whatever it leaves behind (container
    processes of the fake runc) is SIGKILLed with that group afterwards. A
    failure in the child is re-raised here as AssertionError with its traceback.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(r)
            os.setpgid(0, 0)
            import trio

            from shimv2.daemon import become_subreaper

            become_subreaper()
            payload = pickle.dumps(("ok", trio.run(fn, *args)))
            code = 0
        except BaseException:
            payload = pickle.dumps(("error", traceback.format_exc()))
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(w, view) :]
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            data = os.read(r, 65536)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(r)
        if timed_out:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # leftovers of the child's process group
    if timed_out:
        raise AssertionError(f"subreaper test body did not finish within {timeout}s")
    if not chunks:
        raise AssertionError("subreaper test body died without a result")
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "error":
        raise AssertionError(f"in the subreaper child:\n{value}")
    return value
