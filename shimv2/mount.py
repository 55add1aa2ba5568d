"""Mounting a task's rootfs (spec: task-api.md §3.1 step 2) and unmounting it.

containerd sends the snapshot as a list of mounts (overlay, bind, ...) to stack
onto ``<bundle>/rootfs``; option words that name mount flags become flags, the
rest is the filesystem's data string, as containerd's mount package does.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from dataclasses import dataclass

from shimv2.libc import libc as _libc

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

# option -> (clear?, flag)
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}
_PROPAGATION = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
}


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...] = ()


def parse_options(options: tuple[str, ...]) -> tuple[int, int, str]:
    """(flags, propagation flags, data string) for a list of mount options."""
    flags = propagation = 0
    data = []
    for option in options:
        if option in _FLAGS:
            clear, flag = _FLAGS[option]
            flags = flags & ~flag if clear else flags | flag
        elif option in _PROPAGATION:
            propagation |= _PROPAGATION[option]
        elif option == "loop":
            raise OSError(errno.EINVAL, "loop mounts are not supported")
        else:
            data.append(option)
    return flags, propagation, ",".join(data)


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} {source} on {target}: {os.strerror(err)}")


def mount(m: Mount, target: str) -> None:
    flags, propagation, data = parse_options(m.options)
    _mount(m.source, target, m.type, flags & ~MS_REMOUNT if flags & MS_BIND else flags, data)
    if flags & MS_BIND and flags & MS_RDONLY:
        # A bind mount ignores MS_RDONLY until remounted.
        _mount("", target, "", flags | MS_REMOUNT, "")
    if propagation:
        _mount("", target, "", propagation, "")


def unmount_all(target: str) -> None:
    """Unmount everything stacked on ``target``; EBUSY is retried for a while."""
    busy = 0
    while True:
        if _libc.umount2(target.encode(), 0) == 0:
            continue
        err = ctypes.get_errno()
        if err == errno.EBUSY and busy < 50:
            busy += 1
            time.sleep(0.05)
            continue
        if err in (errno.EINVAL, errno.ENOENT):
            return
        raise OSError(err, f"unmount {target}: {os.strerror(err)}")
