"""Async wrapper over the runc command line (spec: task-api.md §3.17).

Every runc child is spawned and reaped through the :class:`~shimv2.reaper.Reaper`.
Errors carry the message runc logged (the last ``"level":"error"`` line of
``--log``), not its stderr: for create/exec runc's stdio is the container's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import trio

from shimv2 import tracing
from shimv2.options import ShimOptions
from shimv2.reaper import Reaper
from shimv2.runccmd import global_args, last_runc_error, log_size, runc_env

log = logging.getLogger(__name__)


class RuncError(Exception):
    """A runc command failed; ``message`` is runc's own error text."""

    def __init__(self, command: str, message: str, status: int) -> None:
        super().__init__(message)
        self.command = command
        self.message = message
        self.status = status


@dataclass
class CheckpointOpts:
    """``runc checkpoint`` flags (containerd's CheckpointOptions, mapped)."""

    image_path: str
    work_path: str
    leave_running: bool = True
    tcp_established: bool = False
    external_unix_sockets: bool = False
    shell_job: bool = False
    file_locks: bool = False
    empty_namespaces: Sequence[str] = ()
    cgroups_mode: str = ""

    def args(self) -> list[str]:
        args = ["--image-path", self.image_path, "--work-path", self.work_path]
        for flag, on in (
            ("--tcp-established", self.tcp_established),
            ("--ext-unix-sk", self.external_unix_sockets),
            ("--shell-job", self.shell_job),
            ("--file-locks", self.file_locks),
        ):
            if on:
                args.append(flag)
        for ns in self.empty_namespaces:
            args += ["--empty-ns", ns]
        if self.cgroups_mode:
            args += ["--manage-cgroups-mode", self.cgroups_mode]
        if self.leave_running:
            args.append("--leave-running")
        return args


@dataclass
class RestoreOpts:
    """``runc restore`` flags for a task created from a checkpoint."""

    image_path: str
    work_path: str
    parent_path: str = ""

    def args(self) -> list[str]:
        args = ["--image-path", self.image_path, "--work-path", self.work_path]
        if self.parent_path:
            args += ["--parent-path", self.parent_path]
        return args


class Runc:
    def __init__(self, reaper: Reaper, options: ShimOptions, namespace: str, bundle: str) -> None:
        self._reaper = reaper
        self.binary = options.runc_binary
        self.root = options.runc_root(namespace)
        self.log_path = os.path.join(bundle, "log.json")
        self._global = global_args(options, namespace, self.log_path)

    async def _run(
        self,
        args: Sequence[str],
        *,
        stdio: Mapping[int, int | None] | None = None,
        input: bytes | None = None,
    ) -> bytes:
        """Run ``runc <global> <args>``; return its combined output, raise RuncError on failure.

        With ``stdio`` the child's fds 0-2 are the given (container) fds and its
        output is not captured: runc hands them on to the container process.
        Traced: runc gets the span's TRACEPARENT, and so do the OCI hooks it runs.
        """
        with tracing.start_span(f"runc {args[0]}", **{"runc.args": " ".join(args)}) as span:
            return await self._exec(args, span.env, stdio, input)

    async def _exec(
        self,
        args: Sequence[str],
        trace_env: Mapping[str, str],
        stdio: Mapping[int, int | None] | None,
        input: bytes | None,
    ) -> bytes:
        command = args[0]
        argv = [self.binary, *self._global, *args]
        offset = log_size(self.log_path)
        out_r = out_w = in_r = in_w = -1
        try:
            if stdio is None:
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                fds: dict[int, int | None] = {1: out_w, 2: out_w}
                if input is not None:
                    in_r, in_w = os.pipe2(os.O_CLOEXEC)
                    fds[0] = in_r
            else:
                fds = dict(stdio)
            try:
                child = self._reaper.spawn(argv, env=runc_env(trace_env), fds=fds)
            except OSError as exc:
                raise RuncError(command, f"cannot run {self.binary}: {exc.strerror}", -1) from exc
            log.debug("runc %s: pid %d", command, child.pid)
            for fd in (out_w, in_r):
                if fd >= 0:
                    os.close(fd)
            out_w = in_r = -1
            output = b""
            async with trio.open_nursery() as nursery:
                if in_w >= 0:
                    fd, in_w = in_w, -1  # owned by _feed now
                    nursery.start_soon(_feed, fd, input or b"")
                if out_r >= 0:
                    fd, out_r = out_r, -1  # owned (and closed) by _read_all now
                    output = await _read_all(fd)
                status = await child.wait()
        finally:
            for fd in (out_r, out_w, in_r, in_w):
                if fd >= 0:
                    os.close(fd)
        if status != 0:
            message = last_runc_error(self.log_path, offset)
            if not message:
                text = output.decode(errors="replace").strip()
                message = f"{self.binary} did not terminate successfully: exit status {status}"
                if text:
                    message += f": {text}"
            raise RuncError(command, message, status)
        return output

    async def create(
        self,
        container_id: str,
        bundle: str,
        pid_file: str,
        stdio: Mapping[int, int | None],
        *,
        console_socket: str = "",
        no_pivot: bool = False,
        no_new_keyring: bool = False,
    ) -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        if no_new_keyring:
            args.append("--no-new-keyring")
        await self._run([*args, container_id], stdio=stdio)

    async def start(self, container_id: str) -> None:
        await self._run(["start", container_id])

    async def exec(
        self,
        container_id: str,
        process_file: str,
        pid_file: str,
        stdio: Mapping[int, int | None],
        *,
        console_socket: str = "",
    ) -> None:
        args = ["exec", "--process", process_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        args += ["--detach", "--pid-file", pid_file, container_id]
        await self._run(args, stdio=stdio)

    async def checkpoint(self, container_id: str, opts: CheckpointOpts) -> None:
        await self._run(["checkpoint", *opts.args(), container_id])

    async def restore(
        self,
        container_id: str,
        bundle: str,
        pid_file: str,
        stdio: Mapping[int, int | None],
        opts: RestoreOpts,
        *,
        console_socket: str = "",
        no_pivot: bool = False,
    ) -> None:
        args = ["restore", *opts.args(), "--detach", "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        # The shim is the reaper: runc must not make itself the subreaper.
        args += ["--no-subreaper", "--bundle", bundle, container_id]
        await self._run(args, stdio=stdio)

    async def kill(self, container_id: str, signal: int, *, all: bool = False) -> None:
        args = ["kill", *(["--all"] if all else []), container_id, str(signal)]
        await self._run(args)

    async def delete(self, container_id: str, *, force: bool = False) -> None:
        await self._run(["delete", *(["--force"] if force else []), container_id])

    async def ps(self, container_id: str) -> list[int]:
        output = await self._run(["ps", "--format", "json", container_id])
        try:
            pids = json.loads(output or b"[]")
        except ValueError as exc:
            raise RuncError("ps", f"unexpected runc ps output: {output[:200]!r}", 0) from exc
        return [int(p) for p in pids or []]

    async def pause(self, container_id: str) -> None:
        await self._run(["pause", container_id])

    async def resume(self, container_id: str) -> None:
        await self._run(["resume", container_id])

    async def update(self, container_id: str, resources_json: bytes) -> None:
        await self._run(["update", "--resources", "-", container_id], input=resources_json)


async def _read_all(fd: int) -> bytes:
    chunks = []
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def _feed(fd: int, data: bytes) -> None:
    async with trio.lowlevel.FdStream(fd) as stream:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(data)
