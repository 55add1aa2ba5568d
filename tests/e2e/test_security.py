"""Security end to end (issue 5, item 6; spec: shim-contract.md §13, ttrpc.md §9).

* the shim socket is a file in /run/containerd/s, never an abstract name, with
  the permissions containerd's shims use (socket 0600, directory closed to
  group and others), and the shim holds no abstract socket at all;
* a peer with another uid or gid is refused: by the file permissions, and,
  should it get past them (CAP_DAC_OVERRIDE), by the SO_PEERCRED check — the
  connection is closed without a byte of answer; root is served;
* container and exec ids that could escape a directory are INVALID_ARGUMENT and
  create nothing (pyshim-only: the Go shim relies on containerd validating ids);
* random requests for every Task method, under both service names, to the real
  shim with real runc: every one is answered and the connection stays usable
  (pyshim-only: it is our ttrpc server; tests/unit fuzz the codec and decoders).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shimv2.api.containerd.task.v2 import shim_pb2 as api
from shimv2.api.ttrpc.request_pb2 import Response
from shimv2.ttrpc import Code, TTRPCError, connect
from shimv2.ttrpc.wire import Frame, FrameDecoder, encode_request

from .harness import (
    RUNNING,
    RUNTIMES,
    STOPPED,
    Containerd,
    exit_code_from_task_rm,
    pid_alive,
    task_service,
)

pytestmark = pytest.mark.e2e

GO = RUNTIMES["go"]
PYSHIM = RUNTIMES["pyshim"]
TASK_V2 = "containerd.task.v2.Task"
TASK_V3 = "containerd.task.v3.Task"
SOCKET_DIR = Path("/run/containerd/s")
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
NOBODY = 65534


def describe(r: subprocess.CompletedProcess[Any]) -> str:
    return f"rc={r.returncode}\nstdout: {r.stdout!r}\nstderr: {r.stderr!r}"


def run_sleeper(c: Containerd, runtime: str, rootfs: Path, cid: str) -> int:
    r = c.ctr("run", "-d", "--runtime", runtime, "--rootfs", str(rootfs), cid, "/bin/sleep", "600")
    assert r.returncode == 0, describe(r)
    c.wait_task_status(cid, RUNNING, timeout=10)
    pid = c.task_pid(cid)
    assert pid
    return pid


def kill_and_delete(c: Containerd, cid: str) -> int:
    r = c.ctr("task", "kill", "-s", "SIGKILL", cid, timeout=10)
    assert r.returncode == 0, describe(r)
    c.wait_task_status(cid, STOPPED, timeout=10)
    r = c.ctr("task", "rm", cid, timeout=15)
    assert r.returncode == 0, describe(r)
    code = exit_code_from_task_rm(r.stderr)
    r = c.ctr("container", "rm", cid, timeout=15)
    assert r.returncode == 0, describe(r)
    return code


def socket_path(c: Containerd, cid: str) -> Path:
    address = c.shim_address(cid)
    assert address.startswith("unix:///"), f"not a filesystem socket address: {address!r}"
    return Path(address[len("unix://") :])


def the_shim(c: Containerd, cid: str) -> int:
    pids = [p.pid for p in c.shim_processes(cid)]
    assert len(pids) == 1, f"expected one shim for {cid}: {pids}"
    return pids[0]


def unix_sockets_of(pid: int) -> list[str]:
    """Names (``/proc/net/unix`` Path column; ``@...`` = abstract, ``""`` = unnamed) of
    every unix socket *pid* holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    names = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split(maxsplit=7)
        if len(fields) >= 7 and fields[6] in inodes:
            names.append(fields[7] if len(fields) == 8 else "")
    return names


# --------------------------------------------------------------------------- the socket


def test_socket_is_a_private_file_not_abstract(
    containerd: Containerd, runtime: str, rootfs: Path, cid: str
) -> None:
    run_sleeper(containerd, runtime, rootfs, cid)
    path = socket_path(containerd, cid)
    assert path.parent == SOCKET_DIR, path
    st_sock = path.lstat()
    assert stat.S_ISSOCK(st_sock.st_mode), f"{path} is not a socket"
    assert stat.S_IMODE(st_sock.st_mode) == 0o600, oct(st_sock.st_mode)
    assert (st_sock.st_uid, st_sock.st_gid) == (os.geteuid(), os.getegid())
    st_dir = SOCKET_DIR.stat()
    # containerd's shims create it 0600 (root still traverses it); whoever made it,
    # neither group nor others may reach a socket inside
    assert stat.S_IMODE(st_dir.st_mode) & 0o077 == 0, oct(st_dir.st_mode)
    assert st_dir.st_uid == 0

    names = unix_sockets_of(the_shim(containerd, cid))
    assert str(path) in names, f"the shim does not listen on {path}: {names}"
    abstract = [n for n in names if n.startswith("@")]
    assert not abstract, f"the shim holds abstract sockets: {abstract}"
    assert kill_and_delete(containerd, cid) == 137
    containerd.assert_no_leaks(cid)


# --------------------------------------------------------------------------- peer credentials

PEER = r"""
import ctypes, errno, json, os, socket, sys

path, request, uid, gid, keep_dac = sys.argv[1], bytes.fromhex(sys.argv[2]), *map(int, sys.argv[3:])
libc = ctypes.CDLL(None, use_errno=True)


class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


if keep_dac:
    assert libc.prctl(8, 1, 0, 0, 0) == 0  # PR_SET_KEEPCAPS: keep them across setresuid
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
if keep_dac:  # CAP_DAC_OVERRIDE (1) only: past the file permissions, still another user
    header, data = Header(0x20080522, 0), (Data * 2)()
    assert libc.capget(ctypes.byref(header), data) == 0
    data[0].effective = data[0].permitted = data[0].permitted & (1 << 1)
    data[0].inheritable = data[1].effective = data[1].permitted = data[1].inheritable = 0
    assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()
result = {"uid": os.geteuid(), "gid": os.getegid(), "reply": "", "timeout": False}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(path)
except OSError as exc:
    result["connect"] = errno.errorcode.get(exc.errno, str(exc.errno))
else:
    result["connect"] = "ok"
    reply = b""
    try:
        s.sendall(request)
        while len(reply) < 10 or len(reply) < 10 + int.from_bytes(reply[:4], "big"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass  # closed with our request unread: the kernel sends a reset
    except socket.timeout:
        result["timeout"] = True
    result["reply"] = reply.hex()
print(json.dumps(result))
"""


def connect_as(path: Path, request: bytes, uid: int, gid: int, keep_dac: bool) -> dict[str, Any]:
    """Connect to *path* from a process with *uid*/*gid* and send *request*."""
    r = subprocess.run(
        [sys.executable, "-c", PEER, str(path), request.hex(), str(uid), str(gid),
         str(int(keep_dac))],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert r.returncode == 0, describe(r)
    result: dict[str, Any] = json.loads(r.stdout)
    assert (result["uid"], result["gid"]) == (uid, gid), result
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")
def test_peer_with_other_uid_or_gid_refused(
    containerd: Containerd, runtime: str, rootfs: Path, cid: str
) -> None:
    pid = run_sleeper(containerd, runtime, rootfs, cid)
    path = socket_path(containerd, cid)
    shim = the_shim(containerd, cid)
    service = task_service(containerd, runtime)
    request = encode_request(1, service, "State", api.StateRequest(id=cid).SerializeToString())

    # a plain other user does not even get to connect: 0600 socket in a closed dir
    plain = connect_as(path, request, NOBODY, NOBODY, keep_dac=False)
    assert plain["connect"] == "EACCES", plain
    # past the file permissions, the shim's SO_PEERCRED check refuses it: closed, no answer
    for uid, gid, keep_dac in ((NOBODY, NOBODY, True), (0, NOBODY, False), (NOBODY, 0, True)):
        got = connect_as(path, request, uid, gid, keep_dac)
        assert got["connect"] == "ok", got
        assert not got["timeout"], f"uid={uid} gid={gid}: connection kept open: {got}"
        assert got["reply"] == "", f"uid={uid} gid={gid} was answered: {got}"

    # root, same request: answered
    root = connect_as(path, request, 0, 0, keep_dac=False)
    assert root["connect"] == "ok" and not root["timeout"], root
    decoder = FrameDecoder()
    decoder.feed(bytes.fromhex(root["reply"]))
    frame = decoder.next_event()
    assert isinstance(frame, Frame) and frame.stream_id == 1, root
    response = Response.FromString(frame.data)
    assert not response.HasField("status"), response
    state = api.StateResponse.FromString(response.payload)
    assert (state.id, state.pid, state.status) == (cid, pid, 2)

    assert pid_alive(shim), "the refusals killed the shim"
    assert containerd.tasks()[cid] == (pid, RUNNING)
    assert kill_and_delete(containerd, cid) == 137
    containerd.assert_no_leaks(cid)


# --------------------------------------------------------------------------- ids

BAD_IDS = [
    "../x", "a/b", "..", ".", "", "/abs", "x/../../y", "..\\x", "a\x00b", "a b", "\n",
    "-a", "a..b", "x" * 77, "x" * 4096,
]  # fmt: skip


def _tree(*roots: Path) -> set[str]:
    found = set()
    for root in roots:
        if root.exists():
            found |= {str(p) for p in root.rglob("*")}
    return found


def test_escaping_ids_rejected(
    containerd: Containerd, runtime: str, rootfs: Path, cid: str, tmp_path: Path
) -> None:
    """pyshim-only: the Go shim takes ids as given (containerd validates them)."""
    if runtime != PYSHIM:
        pytest.skip("pyshim-only: the Go shim relies on containerd's id validation")
    pid = run_sleeper(containerd, runtime, rootfs, cid)
    address = containerd.shim_address(cid)
    bundle = tmp_path / "bundles" / "b"
    (bundle / "rootfs").mkdir(parents=True)
    spec = {"ociVersion": "1.0.2", "process": {"args": ["/bin/true"], "cwd": "/"},
            "root": {"path": str(rootfs)}}  # fmt: skip
    (bundle / "config.json").write_text(json.dumps(spec))
    process = json.dumps({"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0}})
    watched = (tmp_path, containerd.runc_root, containerd.bundle_dir(cid).parent)
    before = _tree(*watched)

    async def attempts() -> list[str]:
        problems = []
        async with connect(address) as client:
            for bad in BAD_IDS:
                for method, request, response_type in (
                    ("Create", api.CreateTaskRequest(id=bad, bundle=str(bundle)),
                     api.CreateTaskResponse),
                    ("Exec", api.ExecProcessRequest(
                        id=cid, exec_id=bad,
                        spec=any_pb2.Any(type_url=PROCESS_TYPE_URL, value=process.encode())),
                     empty_pb2.Empty),
                ):  # fmt: skip
                    try:
                        await client.call(TASK_V2, method, request, response_type, timeout=10)
                    except TTRPCError as exc:
                        if exc.code != Code.INVALID_ARGUMENT or "invalid" not in exc.message:
                            problems.append(f"{method} {bad!r}: {exc.code.name} {exc.message}")
                    else:
                        problems.append(f"{method} with id {bad!r} was accepted")
        return problems

    problems = trio.run(attempts)
    assert not problems, "\n".join(problems)
    assert _tree(*watched) == before, "something was created for a rejected id"
    assert containerd.tasks()[cid] == (pid, RUNNING)
    assert kill_and_delete(containerd, cid) == 137
    containerd.assert_no_leaks(cid)


# --------------------------------------------------------------------------- fuzz

METHODS = sorted(m.name for m in api.DESCRIPTOR.services_by_name["Task"].methods)
RESPONSES = {
    m.name: GetMessageClass(m.output_type) for m in api.DESCRIPTOR.services_by_name["Task"].methods
}


class _Raw:
    """A request that serializes to exactly these bytes."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def SerializeToString(self) -> bytes:
        return self._data

    def ByteSize(self) -> int:
        return len(self._data)


def _request(method: str, container_id: str, exec_id: str) -> bytes:
    """A well-formed request of *method* for another (unknown or invalid) container."""
    desc = api.DESCRIPTOR.services_by_name["Task"].methods_by_name[method].input_type
    names = {f.name for f in desc.fields}
    fields = {k: v for k, v in (("id", container_id), ("exec_id", exec_id)) if k in names}
    return bytes(GetMessageClass(desc)(**fields).SerializeToString())


calls_strategy = st.lists(
    st.tuples(
        st.sampled_from([TASK_V2, TASK_V3]),
        st.sampled_from(METHODS),
        st.one_of(
            st.binary(max_size=96),
            st.builds(
                _request,
                st.sampled_from(METHODS),
                st.sampled_from(["nope", *BAD_IDS]),
                st.text(max_size=8),
            ),
        ),
    ),
    min_size=1,
    max_size=30,
)


def test_fuzz_real_shim_keeps_connection(
    containerd: Containerd, runtime: str, rootfs: Path, cid: str
) -> None:
    """pyshim-only: every random request to the real shim gets an answer, the
    connection it came on stays usable, and the container is untouched."""
    if runtime != PYSHIM:
        pytest.skip("pyshim-only: this fuzzes our ttrpc server and service")
    pid = run_sleeper(containerd, runtime, rootfs, cid)
    address = containerd.shim_address(cid)
    shim = the_shim(containerd, cid)

    async def send(calls: list[tuple[str, str, bytes]]) -> None:
        with trio.fail_after(60):
            async with connect(address) as client:
                for service, method, payload in calls:
                    try:
                        await client.call(
                            service, method, _Raw(payload), RESPONSES[method], timeout=10
                        )
                    except TTRPCError as exc:  # an answer; a dropped connection raises else
                        assert exc.code != Code.DEADLINE_EXCEEDED, (method, payload, exc)
                state = await client.call(
                    TASK_V2, "State", api.StateRequest(id=cid), api.StateResponse, timeout=10
                )
                assert (state.pid, state.status) == (pid, 2)

    @settings(
        max_examples=100,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )
    @given(calls=calls_strategy)
    def fuzz(calls: list[tuple[str, str, bytes]]) -> None:
        # Wait blocks until the (unknown) process exits: random Waits must not hit "cid"
        trio.run(send, [c for c in calls if not (c[1] == "Wait" and cid.encode() in c[2])])

    fuzz()
    assert pid_alive(shim) and [p.pid for p in containerd.shim_processes(cid)] == [shim]
    assert containerd.tasks()[cid] == (pid, RUNNING)
    assert kill_and_delete(containerd, cid) == signal.SIGKILL + 128
    containerd.assert_no_leaks(cid)
