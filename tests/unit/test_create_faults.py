"""Create's fault paths (issue 5, item 5): an invalid config.json is the caller's
fault (INVALID_ARGUMENT, nothing reaches runc), and a ``runc create`` that fails
after creating the container is undone by the shim itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fakes import wait_gone
from test_service import NS, Shim, run

from shimv2.api.containerd.task.v2 import shim_pb2 as api
from shimv2.container import check_spec
from shimv2.ttrpc import Code

INVALID = {
    "not json": b"{this is not json",
    "not utf-8": b'{"process": "\xff"}',
    "not an object": b"[1, 2]",
    "no process": b'{"ociVersion": "1.0.2"}',
    "process not an object": b'{"process": ["sh"]}',
    "no args": b'{"process": {"cwd": "/"}}',
    "empty args": b'{"process": {"args": []}}',
    "args not strings": b'{"process": {"args": ["sh", 1]}}',
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("content", INVALID.values(), ids=INVALID.keys())
def test_check_spec_refuses(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ValueError):
        check_spec(str(tmp_path))


def test_check_spec_accepts_a_minimal_spec(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"process": {"args": ["sh"]}}))
    assert check_spec(str(tmp_path)) == {}  # no linux section


def test_check_spec_returns_the_linux_section(tmp_path: Path) -> None:
    linux = {"namespaces": [{"type": "pid"}], "cgroupsPath": "system.slice:cri:x"}
    spec = {"process": {"args": ["sh"]}, "linux": linux}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    assert check_spec(str(tmp_path)) == linux


async def _invalid_config(shim: Shim) -> None:
    request = shim.create_request("c1", ["sleep", "60"])
    config = Path(request.bundle) / "config.json"
    for name, content in INVALID.items():
        config.write_bytes(content)
        err = await shim.error("Create", request)
        assert err.code == Code.INVALID_ARGUMENT, (name, err)
        assert err.message.startswith(f"invalid config.json in {request.bundle}: "), (name, err)
    assert shim.runc_calls() == []  # nothing reached runc
    assert not (Path(request.bundle) / "options.json").exists()
    assert shim.service.containers == {}
    # the same id is free: a corrected config.json creates it
    config.write_text(json.dumps({"process": {"args": ["sleep", "60"]}}))
    await shim.create("c1", ["sleep", "60"], bundle=request.bundle)
    await shim.kill_and_delete("c1")


def test_invalid_config_json_is_invalid_argument(tmp_path: Path) -> None:
    run(tmp_path, _invalid_config)


async def _half_created(shim: Shim) -> None:
    os.environ["FAKE_RUNC_FAIL_AFTER"] = "create"
    try:
        request = shim.create_request("c1", ["sleep", "60"])
        await shim.expect(
            "Create", request, Code.UNKNOWN, "OCI runtime create failed: fake create failure"
        )
    finally:
        del os.environ["FAKE_RUNC_FAIL_AFTER"]
    calls = shim.runc_calls()
    assert [c[0] for c in calls] == ["create", "delete"]
    assert calls[1][1:] == ["--force", "c1"]
    assert not (shim.runc_root / NS / "c1").exists()
    pid = int((Path(request.bundle) / "init.pid").read_text())
    assert wait_gone(pid), f"the half-created container's process {pid} is still alive"
    await shim.expect("State", api.StateRequest(id="c1"), Code.NOT_FOUND)


def test_failed_create_removes_half_created_container(tmp_path: Path) -> None:
    run(tmp_path, _half_created)


async def _not_created(shim: Shim) -> None:
    os.environ["FAKE_RUNC_FAIL"] = "create"
    try:
        request = shim.create_request("c1", ["sleep", "60"])
        await shim.expect(
            "Create", request, Code.UNKNOWN, "OCI runtime create failed: fake create failure"
        )
    finally:
        del os.environ["FAKE_RUNC_FAIL"]
    # runc may have created it before failing: the shim asks it to go, and
    # "does not exist" is the expected answer here
    assert [c[0] for c in shim.runc_calls()] == ["create", "delete"]


def test_failed_create_asks_runc_to_delete(tmp_path: Path) -> None:
    run(tmp_path, _not_created)


async def _existing_state(shim: Shim) -> None:
    # runc already has a container with this id (not ours): create fails, and the
    # shim must not force-delete what it did not create
    request = shim.create_request("c1", ["sleep", "60"])
    state_dir = shim.runc_root / NS / "c1"
    state_dir.mkdir(parents=True)
    (state_dir / "state.json").write_text(json.dumps({"id": "c1", "pid": 0, "status": "created"}))
    err = await shim.error("Create", request)
    assert err.code == Code.UNKNOWN and "container with id exists: c1" in err.message, err
    assert [c[0] for c in shim.runc_calls()] == ["create"]
    assert (state_dir / "state.json").exists()


def test_failed_create_keeps_runc_state_it_did_not_create(tmp_path: Path) -> None:
    run(tmp_path, _existing_state)
