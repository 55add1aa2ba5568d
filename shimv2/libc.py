"""The C library, for the few calls Python's os module lacks (prctl, mount, umount2,
inotify). ``CDLL(None)`` is the already-loaded libc: no ``find_library``, which
would run ``ldconfig`` in a subprocess."""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> int:
    """Raise OSError with errno for a failed (-1) libc call."""
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result
