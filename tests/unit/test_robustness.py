"""Regression tests for what a review of the shim found: exits that must not hang,
background failures that must not take the daemon down, cancellation, and
copy loops that must end with their process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from test_service import Shim, exec_spec, run

from shimv2.api.containerd.task.v2 import shim_pb2 as api
from shimv2.options import ShimOptions
from shimv2.reaper import Reaper
from shimv2.runc import Runc
from shimv2.stdio import PipeIO, StdioSpec
from shimv2.tasks import GuardedNursery
from shimv2.ttrpc import Code


async def _exec_start_after_init_exit(shim: Shim) -> None:
    await shim.run("c1", ["sleep", "60"], own_pid_ns=False)
    await shim.call(
        "Exec", api.ExecProcessRequest(id="c1", exec_id="a", spec=exec_spec(["sleep", "60"]))
    )
    await shim.call("Start", api.StartRequest(id="c1", exec_id="a"))
    await shim.call(
        "Exec", api.ExecProcessRequest(id="c1", exec_id="b", spec=exec_spec(["sleep", "60"]))
    )
    init = shim.service.containers["c1"].init
    await shim.call("Kill", api.KillRequest(id="c1", signal=9))
    with trio.fail_after(10):
        while not init.reaped:  # the reaper saw it; its exit may still be in handling
            await trio.sleep(0.001)
    # Starting an exec now must be refused at once, and must not stall the init's exit.
    await shim.expect("Start", api.StartRequest(id="c1", exec_id="b"), Code.FAILED_PRECONDITION)
    wait = await shim.call("Wait", api.WaitRequest(id="c1"))
    assert wait.exit_status == 137
    await shim.events.wait_count("/tasks/exit", 2)
    exits = [e.id for e in shim.events.of("/tasks/exit")]
    assert exits == ["a", "c1"], exits  # the exec's exit first
    for exec_id in ("a", "b"):
        await shim.call("Delete", api.DeleteRequest(id="c1", exec_id=exec_id))
    await shim.call("Delete", api.DeleteRequest(id="c1"))


def test_exec_start_after_init_exit_never_hangs_the_init_exit(tmp_path: Path) -> None:
    run(tmp_path, _exec_start_after_init_exit)


async def test_a_failing_background_task_is_logged_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def boom() -> None:
        raise OSError(24, "Too many open files")

    async with trio.open_nursery() as nursery:
        GuardedNursery(nursery, "container c1").start_soon(boom)
    assert "container c1: background task" in caplog.text


async def test_cancelled_runc_call_raises_cancelled_not_ebadf(tmp_path: Path) -> None:
    slow = tmp_path / "slow-runc"
    slow.write_text("#!/bin/sh\nexec sleep 5\n")
    slow.chmod(0o755)
    reaper = Reaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        runc = Runc(reaper, ShimOptions(binary_name=str(slow)), "ns", str(tmp_path))
        with trio.move_on_after(0.2) as scope:
            await runc.start("c1")  # captured output: the fd-closing path
        assert scope.cancelled_caught
        nursery.cancel_scope.cancel()


async def test_close_stops_running_copy_loops(tmp_path: Path, nursery: trio.Nursery) -> None:
    out = tmp_path / "out"
    os.mkfifo(out)
    reader = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    io = PipeIO(StdioSpec(stdout=str(out)))
    writer = os.dup(io.runc_fds()[1] or -1)  # a child that keeps stdout open
    await io.runc_started()
    io.start(nursery)
    await trio.sleep(0.05)
    assert not io.output_done.is_set()
    io.close()  # Delete of an exec whose background child still holds the pipe
    assert await io.wait_output(5)
    os.close(writer)
    os.close(reader)
