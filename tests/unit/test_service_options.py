"""Runtime options of every type reach runc as the Go shim would pass them.

Runs the Task service with the fake runc (see test_service.py) and checks the
recorded runc command lines and the stdio ownership.
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from pathlib import Path

import pytest
from fakes import read_records
from google.protobuf import any_pb2
from test_service import Shim, run

from shimv2 import container
from shimv2.api.containerd.linux.runctypes import runc_pb2 as legacy
from shimv2.api.containerd.task.v2 import shim_pb2 as api
from shimv2.api.runtimeoptions.v1 import api_pb2 as runtimeoptions


def create_argv(shim: Shim) -> list[str]:
    (entry,) = [r for r in read_records(shim.record) if "create" in r["argv"]]
    return list(entry["argv"])


async def _legacy_create_options(shim: Shim) -> None:
    # What ctr 1.6 sends a non-runc runtime for --no-pivot with uid/gid maps.
    os.environ["PATH"] = f"{shim.runc.parent}:{os.environ['PATH']}"
    opts = legacy.CreateOptions(no_pivot_root=True, no_new_keyring=True, io_uid=1000, io_gid=2000)
    packed = any_pb2.Any(
        type_url="containerd.linux.runc.CreateOptions", value=opts.SerializeToString()
    )
    out = shim.fifo("out")
    reader = shim.reader(out)
    # The default runc root is shared: a unique id keeps runs apart.
    cid = f"opts-{uuid.uuid4().hex[:8]}"
    req = shim.create_request(cid, ["sleep", "60"], stdout=out)
    req.options.CopyFrom(packed)
    pid = (await shim.call("Create", req)).pid
    argv = create_argv(shim)
    # No binary in CreateOptions: `runc` from PATH (the recording fake) and the default root.
    assert argv[0:2] == ["--root", "/run/containerd/runc/unitns"]
    assert "--no-pivot" in argv and "--no-new-keyring" in argv
    # The container's end of its stdout pipe belongs to io_uid/io_gid.
    st = os.stat(f"/proc/{pid}/fd/1")
    assert (st.st_uid, st.st_gid) == (1000, 2000)
    await shim.call("Start", api.StartRequest(id=cid))
    await shim.kill_and_delete(cid)
    os.close(reader)


def test_legacy_create_options(tmp_path: Path) -> None:
    run(tmp_path, _legacy_create_options)


async def _cri_toml_and_systemd_path(
    shim: Shim, systemd_option: str, cgroups_path: str, expected: bool
) -> None:
    # containerd 1.7+ CRI: the handler's options table as TOML in config_body.
    body = f'BinaryName = "{shim.runc}"\nroot = "{shim.runc_root}"\nNoNewKeyring = true\n'
    body += systemd_option
    opts = runtimeoptions.Options(
        type_url="io.containerd.pyshim.v1.options", config_body=body.encode()
    )
    req = shim.create_request("c1", ["sleep", "60"])
    req.options.CopyFrom(
        any_pb2.Any(type_url="runtimeoptions.v1.Options", value=opts.SerializeToString())
    )
    config = Path(req.bundle) / "config.json"
    spec = json.loads(config.read_text())
    spec["linux"]["cgroupsPath"] = cgroups_path
    config.write_text(json.dumps(spec))
    await shim.call("Create", req)
    argv = create_argv(shim)
    # BinaryName (the recording fake) and Root come from the TOML, keys in any case.
    assert argv[0:2] == ["--root", f"{shim.runc_root}/unitns"]
    assert ("--systemd-cgroup" in argv[: argv.index("create")]) is expected
    assert "--no-new-keyring" in argv
    persisted = json.loads((Path(req.bundle) / "options.json").read_text())
    # `delete` uses the same runc flags (false is left out, as by Go's omitempty)
    assert persisted.get("systemd_cgroup", False) is expected
    await shim.call("Start", api.StartRequest(id="c1"))
    await shim.kill_and_delete("c1")


# CRI writes a systemd-style cgroupsPath when the pod's cgroup parent is a slice.
SLICE_PATH = "kubepods.slice:cri-containerd:c1"


@pytest.mark.parametrize(
    ("systemd_runs", "systemd_option", "cgroups_path", "expected"),
    [
        # no option: a slice path asks for systemd's driver where systemd runs ...
        (True, "", SLICE_PATH, True),
        # ... and is a plain cgroupfs name elsewhere (critest's /test.slice parent)
        (False, "", SLICE_PATH, False),
        (True, "", "/kubepods/c1", False),
        # an explicit option always wins, either way
        (True, "SystemdCgroup = false\n", SLICE_PATH, False),
        (False, "SystemdCgroup = true\n", SLICE_PATH, True),
    ],
    ids=["systemd", "no-systemd", "plain-path", "explicit-false", "explicit-true"],
)
def test_cri_toml_options_and_systemd_cgroups_path(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    systemd_runs: bool,
    systemd_option: str,
    cgroups_path: str,
    expected: bool,
) -> None:
    # Whether systemd runs is a fact of the host: set here, not read from /run.
    monkeypatch.setattr(container, "systemd_running", lambda: systemd_runs)
    scenario = functools.partial(
        _cri_toml_and_systemd_path,
        systemd_option=systemd_option,
        cgroups_path=cgroups_path,
        expected=expected,
    )
    run(tmp_path, scenario)
