"""The runc wrapper against a fake runc (spec: task-api.md §3.17).

Most tests run the fake in record-only mode (``FAKE_RUNC_RECORD_ONLY``): the
command lines are what is under test, not runc's behaviour.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from fakes import install_fake_runc, read_records

from shimv2 import runccmd
from shimv2.options import ShimOptions
from shimv2.reaper import Reaper
from shimv2.runc import Runc, RuncError

TIMEOUT = 15
NS = "unitns"


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    r = Reaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        yield r
        nursery.cancel_scope.cancel()


class Env:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp_path
        self.runc = install_fake_runc(tmp_path / "bin")
        self.record = tmp_path / "record.jsonl"
        self.bundle = tmp_path / "bundle"
        self.bundle.mkdir()
        self.root = tmp_path / "root"
        self.monkeypatch = monkeypatch
        monkeypatch.setenv("FAKE_RUNC_RECORD", str(self.record))
        monkeypatch.setenv("FAKE_RUNC_RECORD_ONLY", "1")
        for var in ("FAKE_RUNC_FAIL", "FAKE_RUNC_FAIL_MSG", "FAKE_RUNC_NOLOG", "NOTIFY_SOCKET"):
            monkeypatch.delenv(var, raising=False)

    def options(self, **kw: object) -> ShimOptions:
        values: dict[str, object] = {"binary_name": str(self.runc), "root": str(self.root)}
        values.update(kw)
        return ShimOptions(**values)  # type: ignore[arg-type]

    def runc_for(self, reaper: Reaper, **kw: object) -> Runc:
        return Runc(reaper, self.options(**kw), NS, str(self.bundle))

    def global_flags(self) -> list[str]:
        return [
            "--root",
            f"{self.root}/{NS}",
            "--log",
            f"{self.bundle}/log.json",
            "--log-format",
            "json",
        ]

    def argvs(self) -> list[list[str]]:
        return [entry["argv"] for entry in read_records(self.record)]

    def fail(self, command: str, message: str | None = None, nolog: bool = False) -> None:
        self.monkeypatch.setenv("FAKE_RUNC_FAIL", command)
        if message is not None:
            self.monkeypatch.setenv("FAKE_RUNC_FAIL_MSG", message)
        if nolog:
            self.monkeypatch.setenv("FAKE_RUNC_NOLOG", "1")


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    return Env(tmp_path, monkeypatch)


def test_global_args_order() -> None:
    opts = ShimOptions(root="/r", criu_path="/usr/sbin/criu", systemd_cgroup=True)
    assert runccmd.global_args(opts, "k8s.io", "/b/log.json") == [
        "--root",
        "/r/k8s.io",
        "--log",
        "/b/log.json",
        "--log-format",
        "json",
        "--criu",
        "/usr/sbin/criu",
        "--systemd-cgroup",
    ]
    assert runccmd.global_args(ShimOptions(), "default", "/l") == [
        "--root",
        "/run/containerd/runc/default",
        "--log",
        "/l",
        "--log-format",
        "json",
    ]


def test_runc_env_drops_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("KEEP_ME", "1")
    env = runccmd.runc_env()
    assert "NOTIFY_SOCKET" not in env
    assert env["KEEP_ME"] == "1"


async def test_command_lines(env: Env, reaper: Reaper) -> None:
    runc = env.runc_for(reaper)
    b = str(env.bundle)
    with trio.fail_after(TIMEOUT):
        await runc.create("c1", b, f"{b}/init.pid", {})
        await runc.create(
            "c2",
            b,
            f"{b}/init.pid",
            {},
            console_socket="/tmp/pty/pty.sock",
            no_pivot=True,
            no_new_keyring=True,
        )
        await runc.start("c1")
        await runc.exec("c1", "/tmp/runc-process1.json", f"{b}/e1.pid", {})
        await runc.exec("c1", "/tmp/p.json", f"{b}/e2.pid", {}, console_socket="/s")
        await runc.kill("c1", 15)
        await runc.kill("c1", 9, all=True)
        await runc.delete("c1")
        await runc.delete("c1", force=True)
        await runc.ps("c1")
        await runc.pause("c1")
        await runc.resume("c1")
        await runc.update("c1", b'{"cpu": {}}')
    g = env.global_flags()
    assert env.argvs() == [
        [*g, "create", "--bundle", b, "--pid-file", f"{b}/init.pid", "c1"],
        [
            *g,
            "create",
            "--bundle",
            b,
            "--pid-file",
            f"{b}/init.pid",
            "--console-socket",
            "/tmp/pty/pty.sock",
            "--no-pivot",
            "--no-new-keyring",
            "c2",
        ],
        [*g, "start", "c1"],
        [
            *g,
            "exec",
            "--process",
            "/tmp/runc-process1.json",
            "--detach",
            "--pid-file",
            f"{b}/e1.pid",
            "c1",
        ],
        [
            *g,
            "exec",
            "--process",
            "/tmp/p.json",
            "--console-socket",
            "/s",
            "--detach",
            "--pid-file",
            f"{b}/e2.pid",
            "c1",
        ],
        [*g, "kill", "c1", "15"],
        [*g, "kill", "--all", "c1", "9"],
        [*g, "delete", "c1"],
        [*g, "delete", "--force", "c1"],
        [*g, "ps", "--format", "json", "c1"],
        [*g, "pause", "c1"],
        [*g, "resume", "c1"],
        [*g, "update", "--resources", "-", "c1"],
    ]


async def test_systemd_cgroup_and_criu_flags(env: Env, reaper: Reaper) -> None:
    runc = env.runc_for(reaper, systemd_cgroup=True, criu_path="/opt/criu")
    with trio.fail_after(TIMEOUT):
        await runc.start("c1")
    assert env.argvs() == [
        [*env.global_flags(), "--criu", "/opt/criu", "--systemd-cgroup", "start", "c1"]
    ]


async def test_runc_found_on_path(
    env: Env, reaper: Reaper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{env.runc.parent}:{os.environ['PATH']}")
    runc = Runc(reaper, ShimOptions(root=str(env.root)), NS, str(env.bundle))
    assert runc.binary == "runc"
    with trio.fail_after(TIMEOUT):
        await runc.start("c1")
    assert env.argvs() == [[*env.global_flags(), "start", "c1"]]


async def test_notify_socket_not_passed_to_runc(
    env: Env, reaper: Reaper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    with trio.fail_after(TIMEOUT):
        await env.runc_for(reaper).start("c1")
    [entry] = read_records(env.record)
    assert entry["notify_socket"] is None


async def test_error_message_from_log_json(env: Env, reaper: Reaper) -> None:
    env.fail(
        "start", "container_linux.go:380: starting container process caused: exec: no such file"
    )
    with trio.fail_after(TIMEOUT), pytest.raises(RuncError) as info:
        await env.runc_for(reaper).start("c1")
    err = info.value
    assert (
        err.message
        == "container_linux.go:380: starting container process caused: exec: no such file"
    )
    assert str(err) == err.message
    assert (err.command, err.status) == ("start", 1)


async def test_error_message_is_the_last_error_after_this_call(env: Env, reaper: Reaper) -> None:
    log = env.bundle / "log.json"
    # Older lines from earlier calls must not be reported for this one.
    log.write_text(
        json.dumps({"level": "error", "msg": "an old error", "time": "t"})
        + "\n"
        + "not json at all\n"
    )
    env.fail("kill", "the new error")
    with trio.fail_after(TIMEOUT), pytest.raises(RuncError) as info:
        await env.runc_for(reaper).kill("c1", 9)
    assert info.value.message == "the new error"


def test_last_runc_error_picks_the_last_error_line(tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    lines = [
        {"level": "error", "msg": "first"},
        {"level": "warning", "msg": "not an error"},
        {"level": "error", "msg": "second"},
        {"level": "info", "msg": "after"},
    ]
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\n{truncated\n[1,2]\n")
    assert runccmd.last_runc_error(str(log)) == "second"
    offset = len(log.read_bytes())
    assert runccmd.last_runc_error(str(log), offset) == ""
    assert runccmd.last_runc_error(str(tmp_path / "missing")) == ""
    assert runccmd.log_size(str(log)) == offset
    assert runccmd.log_size(str(tmp_path / "missing")) == 0


async def test_error_falls_back_to_output_without_log(env: Env, reaper: Reaper) -> None:
    env.fail("pause", "freezer is unhappy", nolog=True)
    with trio.fail_after(TIMEOUT), pytest.raises(RuncError) as info:
        await env.runc_for(reaper).pause("c1")
    assert info.value.message == (
        f"{env.runc} did not terminate successfully: exit status 1: freezer is unhappy"
    )


async def test_error_exit_status_is_reported(
    env: Env, reaper: Reaper, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.fail("resume", "", nolog=True)
    monkeypatch.setenv("FAKE_RUNC_FAIL_STATUS", "7")
    with trio.fail_after(TIMEOUT), pytest.raises(RuncError) as info:
        await env.runc_for(reaper).resume("c1")
    assert info.value.status == 7
    assert info.value.message.startswith(
        f"{env.runc} did not terminate successfully: exit status 7"
    )


async def test_missing_runc_binary(env: Env, reaper: Reaper) -> None:
    runc = env.runc_for(reaper, binary_name=str(env.tmp / "no-such-runc"))
    fds = set(os.listdir("/proc/self/fd"))
    with trio.fail_after(TIMEOUT), pytest.raises(RuncError) as info:
        await runc.start("c1")
    assert info.value.message.startswith(f"cannot run {env.tmp}/no-such-runc: ")
    assert "No such file or directory" in info.value.message
    assert info.value.command == "start"
    assert set(os.listdir("/proc/self/fd")) == fds  # pipes closed again


async def test_failure_with_stdio_attached_reports_log(env: Env, reaper: Reaper) -> None:
    env.fail("create", "fake create failure")
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    try:
        with trio.fail_after(TIMEOUT), pytest.raises(RuncError) as info:
            await env.runc_for(reaper).create(
                "c1", str(env.bundle), str(env.bundle / "init.pid"), {1: out_w, 2: out_w}
            )
        assert info.value.message == "fake create failure"
    finally:
        os.close(out_r)
        os.close(out_w)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("[1, 2, 3]", [1, 2, 3]),
        ("[4242]\n", [4242]),
        ("[]", []),
        ("null", []),
        ("", []),
    ],
)
async def test_ps_parsing(
    env: Env, reaper: Reaper, monkeypatch: pytest.MonkeyPatch, output: str, expected: list[int]
) -> None:
    monkeypatch.setenv("FAKE_RUNC_PS_OUTPUT", output)
    with trio.fail_after(TIMEOUT):
        assert await env.runc_for(reaper).ps("c1") == expected


@pytest.mark.parametrize("output", ["garbage", "[1, 2", "{"])
async def test_ps_bad_output(
    env: Env, reaper: Reaper, monkeypatch: pytest.MonkeyPatch, output: str
) -> None:
    monkeypatch.setenv("FAKE_RUNC_PS_OUTPUT", output)
    with trio.fail_after(TIMEOUT), pytest.raises(RuncError, match="unexpected runc ps output"):
        await env.runc_for(reaper).ps("c1")


async def test_update_feeds_stdin(env: Env, reaper: Reaper) -> None:
    resources = json.dumps({"memory": {"limit": 1 << 30}, "pad": "x" * 300_000}).encode()
    with trio.fail_after(TIMEOUT):
        await env.runc_for(reaper).update("c1", resources)
    [entry] = read_records(env.record)
    assert entry["stdin"] == resources.decode()


async def test_runc_output_is_returned(
    env: Env, reaper: Reaper, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = json.dumps(list(range(12_000)))  # > 64 KiB: more than one pipe buffer
    monkeypatch.setenv("FAKE_RUNC_PS_OUTPUT", big)
    with trio.fail_after(TIMEOUT):
        assert await env.runc_for(reaper).ps("c1") == list(range(12_000))


async def test_concurrent_runc_calls(env: Env, reaper: Reaper) -> None:
    runc = env.runc_for(reaper)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(runc.kill, f"c{i}", 15)
    assert sorted(a[-2] for a in env.argvs()) == [f"c{i}" for i in range(8)]


async def test_no_fds_leak_across_calls(env: Env, reaper: Reaper) -> None:
    runc = env.runc_for(reaper)
    with trio.fail_after(TIMEOUT):
        await runc.start("c1")
        before = set(os.listdir("/proc/self/fd"))
        await runc.start("c1")
        await runc.update("c1", b"{}")
        env.fail("start")
        with pytest.raises(RuncError):
            await runc.start("c1")
    assert set(os.listdir("/proc/self/fd")) == before


# -- runc delete --force for the `delete` action ----------------------------------


def sync_env(env: Env) -> None:
    env.monkeypatch.delenv("FAKE_RUNC_RECORD_ONLY")


def test_delete_force_sync_success(env: Env) -> None:
    warning = runccmd.runc_delete_force_sync(env.options(), NS, str(env.bundle), "c1")
    assert warning is None
    assert env.argvs() == [[*env.global_flags(), "delete", "--force", "c1"]]


def test_delete_force_sync_ignores_does_not_exist(env: Env) -> None:
    sync_env(env)  # the real emulation: the container is unknown
    assert runccmd.runc_delete_force_sync(env.options(), NS, str(env.bundle), "c1") is None
    assert "does not exist" in runccmd.last_runc_error(str(env.bundle / "log.json"))


def test_delete_force_sync_ignores_does_not_exist_on_stderr(env: Env) -> None:
    env.fail("delete", 'container "c1" does not exist', nolog=True)
    assert runccmd.runc_delete_force_sync(env.options(), NS, str(env.bundle), "c1") is None


def test_delete_force_sync_other_error_is_a_warning(env: Env) -> None:
    env.fail("delete", "unable to remove cgroup: device busy")
    warning = runccmd.runc_delete_force_sync(env.options(), NS, str(env.bundle), "c1")
    assert warning == "runc delete --force c1: unable to remove cgroup: device busy"


def test_delete_force_sync_missing_binary(env: Env) -> None:
    options = env.options(binary_name=str(env.tmp / "nope"))
    warning = runccmd.runc_delete_force_sync(options, NS, str(env.bundle), "c1")
    assert warning is not None and warning.startswith("runc delete --force c1: ")
