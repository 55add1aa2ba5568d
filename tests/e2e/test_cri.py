"""CRI end to end: a private containerd with the CRI plugin, driven over gRPC.

The module's containerd enables CRI (``harness.CriConfig``) with two runtime
handlers: ``runc`` (``io.containerd.runc.v2``, the reference) and ``pyshim``
(``io.containerd.pyshim.v2``). Images are built here as an OCI image layout
(one busybox layer) and imported with ``ctr -n k8s.io images import``; the
pause image is the same layer with ``sleep`` as entrypoint. Pods use the host
network, so no CNI is needed.

Per handler: RunPodSandbox -> CreateContainer/StartContainer -> ExecSync (exit 0
and non-zero) -> ContainerStatus RUNNING -> StopContainer -> EXITED 137 -> the
CRI log file has ``hello-cri`` -> a container over its 16 MiB memory limit ends
``OOMKilled`` -> RemoveContainer x2 -> StopPodSandbox -> RemovePodSandbox. The
pause container and both containers share ONE shim process (grouped by the
``io.kubernetes.cri.sandbox-id`` annotation, shim-contract.md §12), which exits
after RemovePodSandbox.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import platform
import re
import tarfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from .cgroupfs import SYSTEMD, cgroup_path
from .cri import api_pb2 as cri
from .cri import api_pb2_grpc as cri_grpc
from .harness import (
    RUNC_STATE_ROOT,
    RUNTIMES,
    Containerd,
    CriConfig,
    HarnessError,
    busybox_rootfs,
    shim_binary_name,
    wait_until,
)

CRI_NAMESPACE = "k8s.io"
BUSYBOX_IMAGE = "localhost/pyshim/busybox:1"
PAUSE_IMAGE = "localhost/pyshim/pause:1"
HANDLERS = {"pyshim": RUNTIMES["pyshim"], "runc": RUNTIMES["go"]}
# Where systemd runs, CRI is set up as on a Kubernetes node there: the systemd
# cgroup driver for every handler, and pods under a slice, which CRI turns into
# "system.slice:cri-containerd:<id>" (runc: a cri-containerd-<id>.scope unit).
CGROUP_PARENT = "system.slice" if SYSTEMD else ""
RPC_TIMEOUT = 30.0
MiB = 1024 * 1024


# --------------------------------------------------------------------------- images


def _go_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        machine, machine
    )


def _add_blob(tar: tarfile.TarFile, data: bytes, media_type: str) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    info.mode = 0o644
    with contextlib.suppress(KeyError):
        tar.getmember(info.name)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}
    tar.addfile(info, io.BytesIO(data))
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def _layer(rootfs: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for entry in sorted(rootfs.iterdir()):
            tar.add(entry, arcname=entry.name)
    return buf.getvalue()


def build_oci_archive(dest: Path, rootfs: Path, images: dict[str, list[str]]) -> Path:
    """An OCI image layout tarball: one layer (*rootfs*), one image per name -> entrypoint."""
    layer = _layer(rootfs)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    arch = _go_arch()
    manifests = []
    with tarfile.open(dest, "w") as tar:
        layer_desc = _add_blob(tar, layer, "application/vnd.oci.image.layer.v1.tar")
        for name, entrypoint in images.items():
            config = {
                "architecture": arch,
                "os": "linux",
                "config": {
                    "Entrypoint": entrypoint,
                    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                    "WorkingDir": "/",
                },
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                "history": [{"created_by": "tests/e2e/test_cri.py"}],
            }
            config_desc = _add_blob(
                tar, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"
            )
            manifest = {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc,
                "layers": [layer_desc],
            }
            desc = _add_blob(
                tar, json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json"
            )
            desc["platform"] = {"architecture": arch, "os": "linux"}
            desc["annotations"] = {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
            }
            manifests.append(desc)
        for fname, obj in (
            ("oci-layout", {"imageLayoutVersion": "1.0.0"}),
            ("index.json", {"schemaVersion": 2, "manifests": manifests}),
        ):
            data = json.dumps(obj).encode()
            info = tarfile.TarInfo(fname)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return dest


# --------------------------------------------------------------------------- fixtures


def _shared_k8s_dirs() -> list[Path]:
    """Machine-wide dirs runc creates for namespace k8s.io: its state root, CRI's cgroup parent."""
    cgroups = Path("/sys/fs/cgroup")
    return [RUNC_STATE_ROOT / CRI_NAMESPACE, *cgroups.glob(f"*/{CRI_NAMESPACE}"),
            cgroups / CRI_NAMESPACE]  # fmt: skip


@pytest.fixture(scope="module")
def _module_containerd(e2e_tools: None) -> Iterator[Containerd]:
    """Overrides conftest's: this module's containerd runs CRI (namespace k8s.io)."""
    existed = {d for d in _shared_k8s_dirs() if d.exists()}
    config = CriConfig(sandbox_image=PAUSE_IMAGE, systemd_cgroup=SYSTEMD)
    c = Containerd(namespace=CRI_NAMESPACE, cri=config)
    try:
        c.start()
        archive = build_oci_archive(
            c.dir / "images.tar",
            busybox_rootfs(c.dir / "image-rootfs"),
            {BUSYBOX_IMAGE: ["/bin/sh"], PAUSE_IMAGE: ["/bin/sleep", "1000000000"]},
        )
        c.ctr("images", "import", str(archive), timeout=60, check=True)
    except BaseException:
        c.stop(remove=not os.environ.get("PYSHIM_E2E_KEEP"))
        raise
    try:
        yield c
    finally:
        with contextlib.suppress(HarnessError):
            if c.running():
                c.ctr("images", "rm", BUSYBOX_IMAGE, PAUSE_IMAGE, timeout=30)
        notes = c.stop(remove=not os.environ.get("PYSHIM_E2E_KEEP"))
        # what we created, if empty (rmdir fails on a dir somebody else uses)
        for d in sorted(set(_shared_k8s_dirs()) - existed, reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        if notes:
            warnings.warn(f"containerd teardown had to clean up: {notes}", stacklevel=1)


class Cri:
    """RuntimeService + ImageService stubs on our containerd's socket; tracks what to clean."""

    def __init__(self, c: Containerd) -> None:
        self.channel = grpc.insecure_channel(f"unix://{c.address}")
        self.rt = cri_grpc.RuntimeServiceStub(self.channel)
        self.img = cri_grpc.ImageServiceStub(self.channel)
        self.pods: list[str] = []
        self.containers: list[str] = []

    def __getattr__(self, rpc: str) -> Any:
        method = getattr(self.rt, rpc)
        return lambda request: method(request, timeout=RPC_TIMEOUT)

    def cleanup(self) -> None:
        for cid in self.containers:
            with contextlib.suppress(grpc.RpcError):
                self.rt.RemoveContainer(
                    cri.RemoveContainerRequest(container_id=cid), timeout=RPC_TIMEOUT
                )
        for pid in self.pods:
            with contextlib.suppress(grpc.RpcError):
                self.rt.StopPodSandbox(
                    cri.StopPodSandboxRequest(pod_sandbox_id=pid), timeout=RPC_TIMEOUT
                )
            with contextlib.suppress(grpc.RpcError):
                self.rt.RemovePodSandbox(
                    cri.RemovePodSandboxRequest(pod_sandbox_id=pid), timeout=RPC_TIMEOUT
                )
        self.channel.close()


@pytest.fixture
def cri_client(containerd: Containerd) -> Iterator[Cri]:
    client = Cri(containerd)

    def image_id(image: str) -> str:
        request = cri.ImageStatusRequest(image=cri.ImageSpec(image=image))
        return str(client.img.ImageStatus(request, timeout=RPC_TIMEOUT).image.id)

    try:
        grpc.channel_ready_future(client.channel).result(timeout=RPC_TIMEOUT)
        for image in (BUSYBOX_IMAGE, PAUSE_IMAGE):
            # CRI learns about imported images from /images/create events: wait for it
            wait_until(
                functools.partial(image_id, image),
                timeout=15,
                interval=0.1,
                what=f"CRI to know image {image}",
            )
        yield client
    finally:
        leftover_pods = bool(client.pods)
        client.cleanup()
        if leftover_pods:
            # a failed test's pod: its shim goes away asynchronously after RemovePodSandbox
            with contextlib.suppress(AssertionError):
                containerd.assert_no_shims(timeout=10)


# --------------------------------------------------------------------------- test


def _status(client: Cri, cid: str) -> cri.ContainerStatus:
    status: cri.ContainerStatus = client.ContainerStatus(
        cri.ContainerStatusRequest(container_id=cid)
    ).status
    return status


def _wait_exited(client: Cri, cid: str, timeout: float = 20.0) -> cri.ContainerStatus:
    return wait_until(
        lambda: (s := _status(client, cid)).state == cri.CONTAINER_EXITED and s,
        timeout=timeout,
        interval=0.1,
        what=f"container {cid} to be EXITED",
    )


def _shim_pids(c: Containerd) -> set[int]:
    return {p.pid for p in c.shim_processes()}


def _container_config(
    name: str, script: str, log_path: str, memory: int = 0
) -> cri.ContainerConfig:
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name),
        image=cri.ImageSpec(image=BUSYBOX_IMAGE),
        command=["/bin/sh", "-c", script],
        log_path=log_path,
        linux=cri.LinuxContainerConfig(
            resources=cri.LinuxContainerResources(memory_limit_in_bytes=memory),
            security_context=cri.LinuxContainerSecurityContext(
                namespace_options=cri.NamespaceOption(
                    network=cri.NODE, pid=cri.CONTAINER, ipc=cri.POD
                )
            ),
        ),
    )


@pytest.mark.node
@pytest.mark.parametrize("handler", list(HANDLERS))
def test_cri_pod_lifecycle(containerd: Containerd, cri_client: Cri, handler: str) -> None:
    c, client = containerd, cri_client
    assert not _shim_pids(c), "shims of an earlier test are still alive"
    version = client.Version(cri.VersionRequest(version="v1"))
    assert version.runtime_name == "containerd"

    uid = uuid.uuid4().hex
    log_dir = c.dir / "pods" / f"e2e_cri-{handler}_{uid}"
    log_dir.mkdir(parents=True)
    sandbox_config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=f"cri-{handler}", uid=uid, namespace="e2e"),
        log_directory=str(log_dir),
        linux=cri.LinuxPodSandboxConfig(
            cgroup_parent=CGROUP_PARENT,
            security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(
                    network=cri.NODE, pid=cri.CONTAINER, ipc=cri.POD
                )
            ),
        ),
    )
    pod = client.RunPodSandbox(
        cri.RunPodSandboxRequest(config=sandbox_config, runtime_handler=handler)
    ).pod_sandbox_id
    client.pods.append(pod)
    pod_status = client.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status
    assert pod_status.state == cri.SANDBOX_READY

    # the pause container's shim: the right binary, named after the sandbox
    shims = c.shim_processes()
    assert len(shims) == 1, [p.info["cmdline"] for p in shims]
    shim = shims[0]
    cmdline = " ".join(shim.info["cmdline"] or [])
    assert shim_binary_name(HANDLERS[handler]) in cmdline, cmdline
    assert f"-id {pod}" in cmdline, cmdline

    # --- container 1: runs, execs, stops, logs
    cid = client.CreateContainer(
        cri.CreateContainerRequest(
            pod_sandbox_id=pod,
            config=_container_config("hello", "echo hello-cri; sleep 600", "hello/0.log"),
            sandbox_config=sandbox_config,
        )
    ).container_id
    client.containers.append(cid)
    client.StartContainer(cri.StartContainerRequest(container_id=cid))
    assert _status(client, cid).state == cri.CONTAINER_RUNNING
    if SYSTEMD:  # runc's systemd driver made the container's scope
        task_pid = c.task_pid(cid)
        assert task_pid
        assert cgroup_path(task_pid) == f"/system.slice/cri-containerd-{cid}.scope"

    r = client.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["echo", "exec-ok"], timeout=20))
    assert (r.exit_code, r.stdout, r.stderr) == (0, b"exec-ok\n", b"")
    r = client.ExecSync(
        cri.ExecSyncRequest(
            container_id=cid, cmd=["/bin/sh", "-c", "echo oops >&2; exit 3"], timeout=20
        )
    )
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"", b"oops\n")

    assert _status(client, cid).state == cri.CONTAINER_RUNNING
    assert _shim_pids(c) == {shim.pid}, "container 1 did not join the pod's shim"

    # sh is PID 1 of its own PID namespace and ignores SIGTERM: SIGKILL after 1 s
    client.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=1))
    st = _wait_exited(client, cid)
    assert st.exit_code == 137, st
    assert st.reason == "Error", st
    assert st.finished_at >= st.started_at > 0

    log_file = log_dir / "hello" / "0.log"
    assert Path(st.log_path) == log_file
    # CRI's format: "<RFC3339Nano> <stream> <P|F> <text>"
    log_text = wait_until(
        lambda: "hello-cri" in (t := log_file.read_text()) and t,
        timeout=5,
        what="hello-cri in the container log",
    )
    assert re.search(r"^\S+ stdout F hello-cri$", log_text, re.M), log_text

    # --- container 2: goes over its memory limit
    oom = client.CreateContainer(
        cri.CreateContainerRequest(
            pod_sandbox_id=pod,
            config=_container_config(
                "oom", "head -c 200000000 /dev/zero | tail", "oom/0.log", memory=16 * MiB
            ),
            sandbox_config=sandbox_config,
        )
    ).container_id
    client.containers.append(oom)
    client.StartContainer(cri.StartContainerRequest(container_id=oom))
    assert _shim_pids(c) == {shim.pid}, "the OOM container did not join the pod's shim"
    st = _wait_exited(client, oom, timeout=30)
    # CRI sets the reason from the /tasks/oom event, which may trail the exit a little
    st = wait_until(
        lambda: (s := _status(client, oom)).reason == "OOMKilled" and s,
        timeout=5,
        what="reason OOMKilled",
    )
    assert st.exit_code != 0, st

    # --- teardown through CRI; the pod's shim goes with the pod
    for container in (cid, oom):
        client.RemoveContainer(cri.RemoveContainerRequest(container_id=container))
        client.containers.remove(container)
    assert _shim_pids(c) == {shim.pid}, "the shim must live on while the pause container does"
    client.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
    client.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
    client.pods.remove(pod)
    c.assert_no_shims(timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        client.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert not [b for b in c.bundle_ids() if b in (pod, cid, oom)], c.bundle_ids()
