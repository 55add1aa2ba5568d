"""Reading and writing cgroupfs files, the same way for both hierarchies.

What belongs here: where cgroupfs is mounted (``DEFAULT_ROOT``), the errors of
the package, and the readers of the formats v1 and v2 share (single numbers,
``key value`` lines, rdma lines). A file of a cgroup that is being removed
reads as missing (None), never as an error: a container may go at any time.
"""

from __future__ import annotations

import contextlib
import errno
import os

DEFAULT_ROOT = "/sys/fs/cgroup"

_MAX_UINT64 = (1 << 64) - 1
_MAX_UINT32 = (1 << 32) - 1
# Files of a cgroup that is gone: ENOENT on open, ENODEV while it is being removed.
_GONE_ERRNOS = (errno.ENOENT, errno.ENODEV)


class CgroupError(Exception):
    """A cgroup that cannot be found, parsed or joined."""


class CgroupGone(CgroupError):
    """The cgroup's directory no longer exists."""


def _read(path: str) -> str | None:
    """The file's text, or None when it (or its cgroup) does not exist."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as e:
        if e.errno in _GONE_ERRNOS:
            return None
        raise


def _write(path: str, data: str) -> None:
    # O_WRONLY without O_CREAT/O_TRUNC: never create a file where a cgroup knob is missing.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def _parse_uint(text: str) -> int:
    """Go cgroups' parseUint: decimal uint64, negative numbers (e.g. ``-1``) read as 0."""
    value = int(text.strip(), 10)
    if value > _MAX_UINT64:
        raise ValueError(f"{text!r} out of range")
    return max(value, 0)


def _uint_file(path: str) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return _parse_uint(text)
    except ValueError:
        return None


def _kv(text: str) -> dict[str, int]:
    """``key value`` lines (memory.stat, cpu.stat, ...); malformed lines are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = _parse_uint(parts[1])
            except ValueError:
                continue
    return out


def _kv_file(path: str) -> dict[str, int] | None:
    text = _read(path)
    return None if text is None else _kv(text)


class _KvReader:
    """A ``key value`` file read at every exit (``memory.oom_control``,
    ``memory.events``): opened once, then re-read with pread(2). An open, read and
    close of a cgroup file cost 0.1-0.3 ms on a busy daemon's exit path (kernfs
    path walk and seq_file set-up), a pread ~1 us."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._closed = False

    def read(self) -> dict[str, int] | None:
        if self._fd < 0:
            if self._closed:
                return _kv_file(self.path)  # released: read it without keeping an fd
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                if e.errno in _GONE_ERRNOS:
                    return None
                raise
        try:
            data = os.pread(self._fd, 4096, 0)
        except OSError as e:
            if e.errno in _GONE_ERRNOS:
                return None
            raise
        return _kv(data.decode("utf-8", errors="replace"))

    def close(self) -> None:
        self._closed = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _rdma_entries(text: str) -> list[tuple[str, int, int]]:
    """``<device> hca_handle=N hca_object=N`` lines as (device, handles, objects).

    ``max`` is the maximum uint32; an unparsable value stays 0.
    """
    out = []
    for line in text.split("\n"):
        parts = line.split()
        if len(parts) != 3:
            continue
        values = {"hca_handle": 0, "hca_object": 0}
        for kv in parts[1:]:
            key, _, value = kv.partition("=")
            if key not in values:
                continue
            if value == "max":
                values[key] = _MAX_UINT32
                continue
            with contextlib.suppress(ValueError):
                number = _parse_uint(value)
                if number <= _MAX_UINT32:
                    values[key] = number
        out.append((parts[0], values["hca_handle"], values["hca_object"]))
    return out
