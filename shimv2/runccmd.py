"""runc command lines and runc's error reporting, without an event loop.

Shared by the async wrapper (:mod:`shimv2.runc`) and the ``delete`` action,
which must not pay for importing trio.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from shimv2.options import ShimOptions


def global_args(options: ShimOptions, namespace: str, log_path: str) -> list[str]:
    """runc's global flags as containerd's runc shim passes them."""
    args = ["--root", options.runc_root(namespace), "--log", log_path, "--log-format", "json"]
    if options.criu_path:
        args += ["--criu", options.criu_path]
    if options.systemd_cgroup:
        args.append("--systemd-cgroup")
    return args


def runc_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The shim's environment minus NOTIFY_SOCKET (runc would try to use it),
    with ``extra`` on top (a span's TRACEPARENT, for runc and its hooks)."""
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    if extra:
        env.update(extra)
    return env


def last_runc_error(log_path: str, offset: int = 0) -> str:
    """The ``msg`` of the last error line runc wrote to its JSON log after ``offset``."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") == "error":
            return str(entry.get("msg", ""))
    return ""


def log_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def runc_delete_force_sync(
    options: ShimOptions, namespace: str, bundle: str, container_id: str
) -> str | None:
    """``runc delete --force`` for the ``delete`` action (no event loop there).

    Returns a warning for stderr, or None; a container runc no longer knows is fine.
    """
    log_path = os.path.join(bundle, "log.json")
    argv = [
        options.runc_binary,
        *global_args(options, namespace, log_path),
        "delete",
        "--force",
        container_id,
    ]
    import subprocess  # only here: ``delete`` usually finds no runc state to remove

    offset = log_size(log_path)
    try:
        result = subprocess.run(
            argv, env=runc_env(), stdin=subprocess.DEVNULL, capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"runc delete --force {container_id}: {exc}"
    if result.returncode == 0:
        return None
    message = last_runc_error(log_path, offset) or result.stderr.decode(errors="replace").strip()
    if "does not exist" in message or "not exist" in message:
        return None
    return f"runc delete --force {container_id}: {message}"
