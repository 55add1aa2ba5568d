"""Daemon logging into the bundle's ``log`` FIFO (spec: shim-contract.md §7).

containerd reads that FIFO and copies it to its own log. While containerd is
down nobody reads it: a write could block or fail with EPIPE. So the FIFO is
opened non-blocking, and a line that does not fit is dropped, never waited for.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time

from shimv2.flags import Flags

LOG_FIFO = "log"


class FifoWriter(io.TextIOBase):
    """A text stream over a non-blocking fd that drops what cannot be written now."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        data = text.encode(errors="replace")
        try:
            os.write(self._fd, data)  # one write: lines < PIPE_BUF are atomic
        except OSError:  # EAGAIN (full), EPIPE (no reader), ...
            self.dropped += 1
        return len(text)

    def fileno(self) -> int:
        return self._fd


class LogfmtFormatter(logging.Formatter):
    """logrus-like text lines, as containerd shows its shims' logs."""

    def __init__(self, namespace: str, container_id: str) -> None:
        super().__init__()
        self._suffix = f" runtime=io.containerd.pyshim.v2 namespace={namespace} id={container_id}"

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        quoted = message.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        level = record.levelname.lower().replace("warning", "warn")
        # RFC 3339 with nanoseconds, as logrus writes containerd's own lines: the
        # shim's steps line up with containerd's in one log.
        nanos = int(record.created * 1e9) % 1_000_000_000
        return f'time="{when}.{nanos:09d}Z" level={level} msg="{quoted}"{self._suffix}'


def open_log_fifo(path: str) -> int:
    """The log FIFO as fd 2, non-blocking; /dev/null when it cannot be opened."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    os.dup2(fd, 2)
    os.close(fd)
    os.set_blocking(2, False)
    return 2


def setup_logging(flags: Flags) -> None:
    fd = open_log_fifo(LOG_FIFO)
    stream = FifoWriter(fd)
    sys.stderr = stream  # tracebacks from anywhere go to the same place
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogfmtFormatter(flags.namespace, flags.id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if flags.debug else logging.INFO)
