"""Checkpoint and restore through the Task service with the fake runc.

Debian's criu cannot run on this kernel (``criu check`` fails), so the runc
command lines and the restore path are checked here; tests/e2e/test_checkpoint.py
drives the real thing where criu works and the error path everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from google.protobuf import any_pb2, empty_pb2
from test_service import RESPONSES, Shim, run

from shimv2.api.containerd.linux.runctypes import runc_pb2 as legacy
from shimv2.api.containerd.runc.options import oci_pb2
from shimv2.api.containerd.task.v2 import shim_pb2 as api
from shimv2.ttrpc import Code

RESPONSES.setdefault("Checkpoint", type(api.DeleteRequest()))  # replaced below

RESPONSES["Checkpoint"] = empty_pb2.Empty


def checkpoint_request(
    cid: str, path: str, options: object | None = None
) -> api.CheckpointTaskRequest:
    req = api.CheckpointTaskRequest(id=cid, path=path)
    if options is not None:
        req.options.CopyFrom(
            any_pb2.Any(
                type_url=options.DESCRIPTOR.full_name,  # type: ignore[attr-defined]
                value=options.SerializeToString(),  # type: ignore[attr-defined]
            )
        )
    return req


def checkpoint_args(shim: Shim) -> list[str]:
    calls = [c for c in shim.runc_calls() if c[0] == "checkpoint"]
    assert len(calls) == 1, shim.runc_calls()
    return calls[0]


async def _all_flags(shim: Shim) -> None:
    await shim.run("c1", ["sleep", "60"])
    image = str(shim.base / "image")
    options = oci_pb2.CheckpointOptions(
        exit=False,
        open_tcp=True,
        external_unix_sockets=True,
        terminal=True,
        file_locks=True,
        empty_namespaces=["network", "ipc"],
        cgroups_mode="soft",
        work_path=str(shim.base / "work"),
    )
    await shim.call("Checkpoint", checkpoint_request("c1", image, options))
    args = checkpoint_args(shim)
    assert args == [
        "checkpoint", "--image-path", image, "--work-path", str(shim.base / "work"),
        "--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks",
        "--empty-ns", "network", "--empty-ns", "ipc", "--manage-cgroups-mode", "soft",
        "--leave-running", "c1",
    ]  # fmt: skip
    await shim.events.wait_count("/tasks/checkpointed")
    event = shim.events.of("/tasks/checkpointed")[0]
    assert (event.container_id, event.checkpoint) == ("c1", image)
    assert (await shim.state("c1")).status == 2  # still running
    await shim.kill_and_delete("c1")


def test_checkpoint_maps_every_option(tmp_path: Path) -> None:
    run(tmp_path, _all_flags)


async def _legacy_and_exit(shim: Shim) -> None:
    await shim.run("c1", ["sleep", "60"])
    # Legacy CheckpointOptions swap fields 8 and 9: work_path is 8 there.
    options = legacy.CheckpointOptions(
        exit=True, work_path=str(shim.base / "w"), image_path=str(shim.base / "ignored")
    )
    image = str(shim.base / "image")
    await shim.call("Checkpoint", checkpoint_request("c1", image, options))
    args = checkpoint_args(shim)
    assert args[:5] == ["checkpoint", "--image-path", image, "--work-path", str(shim.base / "w")]
    assert "--leave-running" not in args  # exit=true: the container stops
    wait = await shim.call("Wait", api.WaitRequest(id="c1"))
    assert wait.exit_status == 137
    await shim.call("Delete", api.DeleteRequest(id="c1"))


def test_legacy_options_and_exit(tmp_path: Path) -> None:
    run(tmp_path, _legacy_and_exit)


async def _errors(shim: Shim) -> None:
    await shim.create("c1", ["sleep", "60"])
    await shim.expect(
        "Checkpoint",
        checkpoint_request("c1", "/tmp/x"),
        Code.UNKNOWN,
        "cannot checkpoint a task in created state",
    )
    await shim.call("Start", api.StartRequest(id="c1"))
    bad = checkpoint_request("c1", "/tmp/x")
    bad.options.CopyFrom(any_pb2.Any(type_url="containerd.runc.v1.Options", value=b""))
    await shim.expect("Checkpoint", bad, Code.INVALID_ARGUMENT)
    await shim.expect("Checkpoint", checkpoint_request("c1", ""), Code.INVALID_ARGUMENT)
    await shim.expect("Checkpoint", checkpoint_request("nope", "/tmp/x"), Code.NOT_FOUND)
    await shim.kill_and_delete("c1")


def test_checkpoint_errors(tmp_path: Path) -> None:
    run(tmp_path, _errors)


async def _runc_failure(shim: Shim) -> None:
    await shim.run("c1", ["sleep", "60"])
    os.environ["FAKE_RUNC_FAIL"] = "checkpoint"
    os.environ["FAKE_RUNC_FAIL_MSG"] = "criu failed: type DUMP errno 0\nmore detail"
    try:
        err = await shim.error("Checkpoint", checkpoint_request("c1", str(shim.base / "img")))
    finally:
        del os.environ["FAKE_RUNC_FAIL"], os.environ["FAKE_RUNC_FAIL_MSG"]
    bundle = shim.service.containers["c1"].bundle
    assert err.code == Code.UNKNOWN
    assert err.message == f"criu failed: type DUMP errno 0 path= {bundle}/criu-dump.log"
    assert not (Path(bundle) / "work" / "criu-work").exists()  # scratch work dir removed
    assert (await shim.state("c1")).status == 2
    await shim.kill_and_delete("c1")


def test_checkpoint_failure_names_the_dump_log(tmp_path: Path) -> None:
    run(tmp_path, _runc_failure)


async def _restore(shim: Shim) -> None:
    image = str(shim.base / "image")
    parent = str(shim.base / "parent")
    req = shim.create_request("r1", ["sleep", "60"], checkpoint=image, parent_checkpoint=parent)
    created = await shim.call("Create", req)
    assert created.pid == 0  # a restored task gets its pid at Start
    assert not [c for c in shim.runc_calls() if c[0] in ("create", "restore")]
    await shim.events.wait_count("/tasks/create")
    assert shim.events.of("/tasks/create")[0].checkpoint == image
    started = await shim.call("Start", api.StartRequest(id="r1"))
    assert started.pid > 0
    (restore,) = [c for c in shim.runc_calls() if c[0] == "restore"]
    bundle = req.bundle
    assert restore == [
        "restore", "--image-path", image, "--work-path", f"{bundle}/work",
        "--parent-path", parent, "--detach", "--pid-file", f"{bundle}/init.pid",
        "--no-subreaper", "--bundle", bundle, "r1",
    ]  # fmt: skip
    state = await shim.state("r1")
    assert (state.pid, state.status) == (started.pid, 2)
    await shim.events.wait_count("/tasks/start")
    deleted = await shim.kill_and_delete("r1")
    assert deleted.exit_status == 137


def test_restore_through_create_and_start(tmp_path: Path) -> None:
    run(tmp_path, _restore)


@pytest.mark.parametrize("field", ["work_path", "image_path"])
def test_checkpoint_option_field_numbers_differ(field: str) -> None:
    runc_field = oci_pb2.CheckpointOptions.DESCRIPTOR.fields_by_name[field].number
    legacy_field = legacy.CheckpointOptions.DESCRIPTOR.fields_by_name[field].number
    assert {runc_field, legacy_field} == {8, 9}
