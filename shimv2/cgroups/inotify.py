"""The inotify fd the cgroup v2 OOM watch waits on.

What belongs here: the inotify calls (libc through ctypes, imported only when a
watch starts), nothing about cgroups. v1 needs none: its kernel signals an OOM
on an eventfd.
"""

from __future__ import annotations

import os

_IN_MODIFY = 0x00000002


def _inotify_fd(paths: tuple[str, ...]) -> int:
    """An inotify fd (non-blocking, close-on-exec) watching ``paths`` for IN_MODIFY."""
    import ctypes

    from shimv2.libc import libc

    libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)  # IN_NONBLOCK | IN_CLOEXEC
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_init1: {os.strerror(err)}")
    for path in paths:
        if libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch: {os.strerror(err)}", path)
    return int(fd)


def _drain(fd: int) -> bool:
    """Read all queued inotify events; True if there was any."""
    got = False
    while True:
        try:
            if not os.read(fd, 4096):
                return got
        except BlockingIOError:
            return got
        got = True
