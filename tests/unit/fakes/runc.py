#!/usr/bin/env python3
"""A fake ``runc`` for the unit tests: just enough of runc's command line.

Only the standard library is used: the tests run it as ``<venv python> -S runc.py``
through a small shell wrapper named ``runc`` (see ``fakes.install_fake_runc``).

Global flags: ``--root R``, ``--log L``, ``--log-format F``, ``--systemd-cgroup``,
``--criu P``, ``--debug``. State lives in ``R/<id>/state.json``.

Subcommands:

* ``create --bundle B --pid-file P [--console-socket S] [--no-pivot]
  [--no-new-keyring] ID`` forks the container process, which waits until
  ``R/<id>/started`` exists and then execs ``process.args`` of ``B/config.json``
  with runc's fds 0-2 as its stdio; the pid is written to P; runc exits. The
  container process is re-parented to the nearest child subreaper.
* ``start ID`` creates the ``started`` file.
* ``kill [--all] ID SIG``, ``delete [--force] ID``, ``ps --format json ID``,
  ``exec --process F [--console-socket S] --detach --pid-file P ID``,
  ``state ID``, ``pause ID``/``resume ID`` (SIGSTOP/SIGCONT), ``update
  --resources - ID`` (reads stdin).

Environment knobs (the shim passes its environment on to runc):

* ``FAKE_RUNC_RECORD=<file>``: append one JSON line per invocation:
  ``{"argv": [...], "stdin": ..., "process": ..., "notify_socket": ...}``.
* ``FAKE_RUNC_RECORD_ONLY=1``: record and exit 0 without emulating anything.
* ``FAKE_RUNC_FAIL=<cmd>[,<cmd>...]`` (or ``all``): fail that subcommand with
  ``{"level":"error","msg":...}`` in the ``--log`` file and exit status
  ``FAKE_RUNC_FAIL_STATUS`` (default 1). The message is ``FAKE_RUNC_FAIL_MSG``
  or ``fake <cmd> failure``.
* ``FAKE_RUNC_FAIL_AFTER=<cmd>[,<cmd>...]``: do that subcommand, then fail it
  the same way (e.g. a ``create`` that leaves a half-created container).
* ``FAKE_RUNC_NOLOG=1``: report errors on stderr only, never in the log file.
* ``FAKE_RUNC_PS_OUTPUT=<text>``: what ``ps`` prints instead of the real pid list.
* ``FAKE_RUNC_START_WAIT_EXIT=1``: ``start`` returns only after the container
  process has exited (an exit that races ``runc start``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
import time

GLOBAL_WITH_VALUE = {"--root", "--log", "--log-format", "--criu"}
GLOBAL_BOOL = {"--systemd-cgroup", "--debug"}


class Failure(Exception):
    pass


def parse_globals(args: list[str]) -> tuple[dict[str, object], list[str]]:
    opts: dict[str, object] = {"--root": "/run/runc", "--log": "", "--log-format": "text"}
    i = 0
    while i < len(args) and args[i].startswith("-"):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in GLOBAL_WITH_VALUE:
            if not eq:
                i += 1
                value = args[i]
            opts[name] = value
        elif name in GLOBAL_BOOL:
            opts[name] = True
        else:
            raise Failure(f"flag provided but not defined: {arg}")
        i += 1
    return opts, args[i:]


def log_error(log_path: str, message: str) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    lines = json.dumps({"level": "error", "msg": message, "time": now}) + "\n"
    lines += json.dumps({"level": "info", "msg": "fake runc exiting", "time": now}) + "\n"
    if log_path and not os.environ.get("FAKE_RUNC_NOLOG"):
        try:
            with open(log_path, "a") as f:
                f.write(lines)
            return
        except OSError:
            pass
    sys.stderr.write(message + "\n")


def record(argv: list[str], **extra: object) -> None:
    path = os.environ.get("FAKE_RUNC_RECORD")
    if not path:
        return
    entry = {"argv": argv, "notify_socket": os.environ.get("NOTIFY_SOCKET"), **extra}
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(fd)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as exited)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def take_flags(args: list[str], with_value: set[str], boolean: set[str]) -> tuple[dict, list[str]]:
    flags: dict[str, object] = {}
    rest = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name in with_value:
            if not eq:
                i += 1
                value = args[i]
            flags[name] = value
        elif arg.startswith("-") and name in boolean:
            flags[name] = True
        elif arg.startswith("-"):
            raise Failure(f"flag provided but not defined: {arg}")
        else:
            rest.append(arg)
        i += 1
    return flags, rest


class State:
    def __init__(self, root: str, cid: str) -> None:
        self.root = root
        self.cid = cid
        self.dir = os.path.join(root, cid)
        self.path = os.path.join(self.dir, "state.json")

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def load(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            raise Failure("container does not exist") from None

    def save(self, data: dict) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.rename(tmp, self.path)


def write_pid_file(path: str, pid: int) -> None:
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.rename(tmp, path)


def spawn(args: list[str], env: list[str] | None, wait_for: str | None, keep: int) -> int:
    """Fork a process that (after ``wait_for`` exists) execs ``args`` with our fds 0-2."""
    pid = os.fork()
    if pid:
        return pid
    try:
        os.closerange(3, keep)  # nothing of ours but stdio may reach the container
        if wait_for:
            while not os.path.exists(wait_for):
                time.sleep(0.002)
        environ = dict(os.environ)
        for item in env or []:
            key, _, value = item.partition("=")
            environ[key] = value
        os.execvpe(args[0], args, environ)
    except BaseException:
        pass
    os._exit(127)


def max_fd() -> int:
    return max(int(n) for n in os.listdir("/proc/self/fd")) + 1


def cmd_create(root: str, args: list[str]) -> None:
    flags, rest = take_flags(
        args, {"bundle", "b", "pid-file", "console-socket"}, {"no-pivot", "no-new-keyring"}
    )
    (cid,) = rest
    bundle = str(flags.get("bundle") or flags.get("b") or os.getcwd())
    state = State(root, cid)
    if os.path.exists(state.dir):
        raise Failure(f"container with id exists: {cid}")
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            process = json.load(f).get("process") or {}
    except (OSError, ValueError) as exc:
        raise Failure(f"cannot load config.json: {exc}") from None
    proc_args = process.get("args") or ["sleep", "3600"]
    os.makedirs(state.dir)
    started = os.path.join(state.dir, "started")
    pid = spawn(proc_args, process.get("env"), started, max_fd())
    state.save({"id": cid, "bundle": bundle, "pid": pid, "status": "created", "execs": []})
    if flags.get("pid-file"):
        write_pid_file(str(flags["pid-file"]), pid)


def cmd_restore(root: str, args: list[str]) -> None:
    """Like create + start: the checkpointed process comes back running."""
    flags, rest = take_flags(
        args,
        {"bundle", "b", "pid-file", "console-socket", "image-path", "work-path", "parent-path"},
        {"detach", "d", "no-pivot", "no-subreaper"},
    )
    create_args = ["--bundle", str(flags.get("bundle") or os.getcwd())]
    if flags.get("pid-file"):
        create_args += ["--pid-file", str(flags["pid-file"])]
    cmd_create(root, [*create_args, *rest])
    cmd_start(root, rest)


def cmd_checkpoint(root: str, args: list[str]) -> None:
    flags, rest = take_flags(
        args,
        {"image-path", "work-path", "empty-ns", "manage-cgroups-mode", "parent-path"},
        {"leave-running", "tcp-established", "ext-unix-sk", "shell-job", "file-locks"},
    )
    (cid,) = rest
    data = State(root, cid).load()
    os.makedirs(str(flags["image-path"]), exist_ok=True)
    if not flags.get("leave-running"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(data["pid"], signal.SIGKILL)


def cmd_start(root: str, args: list[str]) -> None:
    (cid,) = args
    state = State(root, cid)
    data = state.load()
    if data["status"] != "created":
        raise Failure("cannot start an already running container")
    if not alive(data["pid"]):
        raise Failure("cannot start a container that has stopped")
    with open(os.path.join(state.dir, "started"), "w"):
        pass
    data["status"] = "running"
    state.save(data)
    if os.environ.get("FAKE_RUNC_START_WAIT_EXIT"):
        deadline = time.monotonic() + 10
        while alive(data["pid"]) and time.monotonic() < deadline:
            time.sleep(0.002)


def parse_signal(text: str) -> int:
    if text.isdigit():
        return int(text)
    name = text.upper()
    return int(getattr(signal, name if name.startswith("SIG") else "SIG" + name))


def cmd_kill(root: str, args: list[str]) -> None:
    flags, rest = take_flags(args, set(), {"all", "a"})
    cid, sig = rest[0], parse_signal(rest[1] if len(rest) > 1 else "SIGTERM")
    data = State(root, cid).load()
    if not alive(data["pid"]):
        raise Failure("container not running")
    pids = [data["pid"]]
    if flags.get("all") or flags.get("a"):
        pids += [p for p in data["execs"] if alive(p)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def cmd_delete(root: str, args: list[str]) -> None:
    flags, rest = take_flags(args, set(), {"force", "f"})
    (cid,) = rest
    state = State(root, cid)
    data = state.load()
    force = flags.get("force") or flags.get("f")
    if data["status"] == "running" and alive(data["pid"]) and not force:
        raise Failure(f"cannot delete container {cid} that is not stopped: running")
    for pid in [data["pid"], *data["execs"]]:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    shutil.rmtree(state.dir, ignore_errors=True)


def cmd_ps(root: str, args: list[str]) -> None:
    _, rest = take_flags(args, {"format", "f"}, set())
    (cid,) = rest
    override = os.environ.get("FAKE_RUNC_PS_OUTPUT")
    if override is not None:
        sys.stdout.write(override)
        return
    data = State(root, cid).load()
    pids = [p for p in [data["pid"], *data["execs"]] if alive(p)]
    sys.stdout.write(json.dumps(pids) + "\n")


def cmd_exec(root: str, args: list[str]) -> dict:
    flags, rest = take_flags(args, {"process", "p", "pid-file", "console-socket"}, {"detach", "d"})
    (cid,) = rest
    state = State(root, cid)
    data = state.load()
    with open(str(flags["process"])) as f:
        process = json.load(f)
    if not alive(data["pid"]):
        raise Failure("cannot exec in a stopped container")
    pid = spawn(process["args"], process.get("env"), None, max_fd())
    data["execs"].append(pid)
    state.save(data)
    if flags.get("pid-file"):
        write_pid_file(str(flags["pid-file"]), pid)
    return process


def cmd_state(root: str, args: list[str]) -> None:
    (cid,) = args
    data = State(root, cid).load()
    status = data["status"] if alive(data["pid"]) else "stopped"
    sys.stdout.write(json.dumps({"id": cid, "pid": data["pid"], "status": status}) + "\n")


def cmd_signal_all(root: str, args: list[str], sig: int) -> None:
    (cid,) = args
    data = State(root, cid).load()
    for pid in [data["pid"], *data["execs"]]:
        if alive(pid):
            os.kill(pid, sig)


def main(argv: list[str]) -> int:
    try:
        opts, rest = parse_globals(argv)
    except Failure as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    command = rest[0] if rest else ""
    args = rest[1:]
    log_path = str(opts["--log"])
    extra: dict[str, object] = {}
    stdin_data = None
    if command == "update":
        stdin_data = sys.stdin.read()
        extra["stdin"] = stdin_data
    if command == "exec" and "--process" in args:
        with contextlib.suppress(OSError, ValueError), open(args[args.index("--process") + 1]) as f:
            extra["process"] = json.load(f)
    record(argv, **extra)
    fail = os.environ.get("FAKE_RUNC_FAIL", "")
    if fail and (fail == "all" or command in fail.split(",")):
        log_error(log_path, os.environ.get("FAKE_RUNC_FAIL_MSG") or f"fake {command} failure")
        return int(os.environ.get("FAKE_RUNC_FAIL_STATUS", "1"))
    if os.environ.get("FAKE_RUNC_RECORD_ONLY"):
        if command == "ps":
            sys.stdout.write(os.environ.get("FAKE_RUNC_PS_OUTPUT", "[]"))
        return 0
    root = str(opts["--root"])
    if command == "create":
        os.makedirs(root, exist_ok=True)
    lock_fd = -1
    try:
        if os.path.isdir(root):
            lock_fd = os.open(os.path.join(root, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if command == "create":
            cmd_create(root, args)
        elif command == "start":
            cmd_start(root, args)
        elif command == "kill":
            cmd_kill(root, args)
        elif command == "delete":
            cmd_delete(root, args)
        elif command == "ps":
            cmd_ps(root, args)
        elif command == "exec":
            cmd_exec(root, args)
        elif command == "state":
            cmd_state(root, args)
        elif command == "restore":
            os.makedirs(root, exist_ok=True)
            cmd_restore(root, args)
        elif command == "checkpoint":
            cmd_checkpoint(root, args)
        elif command == "pause":
            cmd_signal_all(root, args, signal.SIGSTOP)
        elif command == "resume":
            cmd_signal_all(root, args, signal.SIGCONT)
        elif command == "update":
            State(root, args[-1]).load()
        else:
            raise Failure(f"unknown command {command!r}")
    except Failure as exc:
        log_error(log_path, str(exc))
        return 1
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)
    if command in os.environ.get("FAKE_RUNC_FAIL_AFTER", "").split(","):
        log_error(log_path, os.environ.get("FAKE_RUNC_FAIL_MSG") or f"fake {command} failure")
        return int(os.environ.get("FAKE_RUNC_FAIL_STATUS", "1"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
