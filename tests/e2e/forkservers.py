"""A private containerd whose shims use a private fork-server directory, so the
server they launch is the test's to find and stop (never the node's)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Mapping
from pathlib import Path

from shimv2 import forkserver

from .harness import Containerd, pid_alive, wait_until


class Private:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.fs_dir = Path(tempfile.mkdtemp(prefix="fs-", dir="/tmp")) / "d"
        self.c = Containerd(extra_env={forkserver.DIR_ENV: str(self.fs_dir), **(env or {})})
        self.c.start()

    def server_pid(self) -> int | None:
        pid_file = Path(forkserver.paths(str(self.fs_dir), forkserver.version_tag())[3])
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def wait_for_server(self) -> int:
        wait_until(lambda: self.server_pid() is not None, timeout=30, what="fork server up")
        pid = self.server_pid()
        assert pid is not None
        return pid

    def close(self) -> None:
        self.c.stop()
        pid = self.server_pid()
        if pid is not None:  # the server this containerd's shims launched
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.fs_dir.parent, ignore_errors=True)
