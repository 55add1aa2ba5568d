"""Files the shim keeps in the bundle directory, so that ``delete`` (a separate,
short-lived process) and a later containerd can find what the daemon knew.

Plain files, no protobuf: ``start`` and ``delete`` import this module, so it
keeps its imports light (no dataclasses; options only when asked for).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from shimv2.options import ShimOptions

OPTIONS_FILE = "options.json"
EXIT_FILE = "init.exit.json"


class ExitRecord(NamedTuple):
    pid: int
    status: int
    exited_at_ns: int


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    """Write via a temporary file and rename, so readers never see a partial file.

    No fsync: these files must outlive the shim, not the machine (containers do
    not survive a reboot either), and an fsync on a disk-backed state dir costs
    milliseconds on the exit path."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            data = text.encode()
            if os.write(fd, data) != len(data):  # a short write: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError:
        # No half-written temporary file left taking the room of a full disk.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def read_pid(path: str) -> int:
    """A runc pid file (decimal, no newline); 0 when absent or unreadable.
    os.read, not open(): a third of the system calls, on every start and exec."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        data = os.read(fd, 64)
    except OSError:
        return 0
    finally:
        os.close(fd)
    try:
        return int(data.strip() or b"0")
    except ValueError:
        return 0


def write_runc_options(bundle: str, options: ShimOptions) -> None:
    write_atomic(os.path.join(bundle, OPTIONS_FILE), options.to_json(), mode=0o600)


def read_runc_options(bundle: str) -> ShimOptions:
    from shimv2.options import ShimOptions

    text = read_text(os.path.join(bundle, OPTIONS_FILE))
    if not text:
        return ShimOptions()
    try:
        return ShimOptions.from_json(text)
    except (ValueError, TypeError):
        return ShimOptions()


def write_exit(bundle: str, record: ExitRecord) -> None:
    write_atomic(os.path.join(bundle, EXIT_FILE), json.dumps(record._asdict()))


class ExitFile:
    """``init.exit.json``, created empty with the container so that recording the
    exit is one ``pwrite`` on the event loop: a file created and renamed at exit
    time costs milliseconds on a disk-backed state dir, and the exit event waits
    for it. An empty file reads as "no exit recorded"."""

    def __init__(self, bundle: str) -> None:
        self._bundle = bundle
        try:
            self._fd = os.open(
                os.path.join(bundle, EXIT_FILE),
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                0o644,
            )
        except OSError:
            self._fd = -1  # write() tries the slow way, and reports what fails

    def write(self, record: ExitRecord) -> None:
        """Record the exit; OSError (e.g. ENOSPC) when it could not be persisted."""
        if self._fd < 0:
            write_exit(self._bundle, record)
            return
        data = json.dumps(record._asdict()).encode()
        try:
            if os.pwrite(self._fd, data, 0) != len(data):
                os.ftruncate(self._fd, 0)  # half a record would read as garbage
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), EXIT_FILE)
        finally:
            self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_exit(bundle: str) -> ExitRecord | None:
    text = read_text(os.path.join(bundle, EXIT_FILE))
    if not text:
        return None
    try:
        data = json.loads(text)
        return ExitRecord(int(data["pid"]), int(data["status"]), int(data["exited_at_ns"]))
    except (ValueError, KeyError, TypeError):
        return None
