"""Wire-format tests for the generated containerd types in shimv2.api.

Byte strings quoted here were captured from real containerd / runc-shim
traffic and are recorded in /work/shared/spec (section given per test).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from shimv2.api.containerd.cgroups.v1 import metrics_pb2 as cg1
from shimv2.api.containerd.cgroups.v2 import metrics_pb2 as cg2
from shimv2.api.containerd.events import task_pb2 as events
from shimv2.api.containerd.linux.runctypes import runc_pb2 as runctypes
from shimv2.api.containerd.runc.options import oci_pb2 as runc_options
from shimv2.api.containerd.runtime.bootstrap.v1 import bootstrap_pb2 as bootstrap
from shimv2.api.containerd.services.events.ttrpc.v1 import events_pb2 as ttrpc_events
from shimv2.api.containerd.task.v2 import shim_pb2 as shim
from shimv2.api.containerd.types import introspection_pb2 as introspection
from shimv2.api.containerd.types import mount_pb2 as mount
from shimv2.api.containerd.types.task import task_pb2 as task_types
from shimv2.api.runtimeoptions.v1 import api_pb2 as runtimeoptions
from shimv2.api.ttrpc import request_pb2 as ttrpc

ROOT = Path(__file__).resolve().parents[2]

GO_ZERO_TIME = -62135596800  # 0001-01-01T00:00:00Z, task-api.md §1.4


# --- a tiny independent protobuf encoder, to build expected bytes ------------


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def vint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def ld(number: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def any_bytes(type_url: str, value: bytes) -> bytes:
    return ld(1, type_url) + ld(2, value)


def bare_any(msg) -> any_pb2.Any:
    """Any with the bare type URL containerd uses (no type.googleapis.com/)."""
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


# --- generator drift --------------------------------------------------------


def test_generated_code_matches_protos():
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpc_tools (dev dependency grpcio-tools) is not installed")
    from tools import genproto

    assert genproto.check() == []


def test_every_generated_module_imports():
    api = ROOT / "shimv2" / "api"
    modules = sorted(
        ".".join(("shimv2", "api", *p.relative_to(api).with_suffix("").parts))
        for p in api.rglob("*_pb2.py")
    )
    expected = {
        "shimv2.api.containerd.cgroups.v1.metrics_pb2",
        "shimv2.api.containerd.cgroups.v2.metrics_pb2",
        "shimv2.api.containerd.events.task_pb2",
        "shimv2.api.containerd.linux.runctypes.runc_pb2",
        "shimv2.api.containerd.runc.options.oci_pb2",
        "shimv2.api.containerd.runtime.bootstrap.v1.bootstrap_pb2",
        "shimv2.api.containerd.services.events.ttrpc.v1.events_pb2",
        "shimv2.api.containerd.task.v2.shim_pb2",
        "shimv2.api.containerd.types.introspection_pb2",
        "shimv2.api.containerd.types.mount_pb2",
        "shimv2.api.containerd.types.task.task_pb2",
        "shimv2.api.runtimeoptions.v1.api_pb2",
    }
    assert expected <= set(modules)
    for name in modules:
        importlib.import_module(name)


# --- full names (type URLs) -------------------------------------------------

TYPE_URLS = {
    events.TaskCreate: "containerd.events.TaskCreate",
    events.TaskStart: "containerd.events.TaskStart",
    events.TaskDelete: "containerd.events.TaskDelete",
    events.TaskIO: "containerd.events.TaskIO",
    events.TaskExit: "containerd.events.TaskExit",
    events.TaskOOM: "containerd.events.TaskOOM",
    events.TaskExecAdded: "containerd.events.TaskExecAdded",
    events.TaskExecStarted: "containerd.events.TaskExecStarted",
    events.TaskPaused: "containerd.events.TaskPaused",
    events.TaskResumed: "containerd.events.TaskResumed",
    events.TaskCheckpointed: "containerd.events.TaskCheckpointed",
    cg1.Metrics: "io.containerd.cgroups.v1.Metrics",
    cg2.Metrics: "io.containerd.cgroups.v2.Metrics",
    runc_options.Options: "containerd.runc.v1.Options",
    runc_options.CheckpointOptions: "containerd.runc.v1.CheckpointOptions",
    runc_options.ProcessDetails: "containerd.runc.v1.ProcessDetails",
    runctypes.RuncOptions: "containerd.linux.runc.RuncOptions",
    runctypes.CreateOptions: "containerd.linux.runc.CreateOptions",
    runctypes.CheckpointOptions: "containerd.linux.runc.CheckpointOptions",
    runctypes.ProcessDetails: "containerd.linux.runc.ProcessDetails",
    runtimeoptions.Options: "runtimeoptions.v1.Options",
    mount.Mount: "containerd.types.Mount",
    task_types.Process: "containerd.v1.types.Process",
    task_types.ProcessInfo: "containerd.v1.types.ProcessInfo",
    introspection.RuntimeRequest: "containerd.types.RuntimeRequest",
    introspection.RuntimeInfo: "containerd.types.RuntimeInfo",
    introspection.RuntimeVersion: "containerd.types.RuntimeVersion",
    bootstrap.BootstrapParams: "containerd.runtime.bootstrap.v1.BootstrapParams",
    bootstrap.BootstrapResult: "containerd.runtime.bootstrap.v1.BootstrapResult",
    bootstrap.Extension: "containerd.runtime.bootstrap.v1.Extension",
    ttrpc_events.Envelope: "containerd.services.events.ttrpc.v1.Envelope",
    ttrpc_events.ForwardRequest: "containerd.services.events.ttrpc.v1.ForwardRequest",
    shim.CreateTaskRequest: "containerd.task.v2.CreateTaskRequest",
    shim.DeleteResponse: "containerd.task.v2.DeleteResponse",
}


@pytest.mark.parametrize(("cls", "name"), TYPE_URLS.items(), ids=list(TYPE_URLS.values()))
def test_full_names(cls, name):
    assert cls.DESCRIPTOR.full_name == name
    assert bare_any(cls()).type_url == name


def test_enum_names_and_values():
    status = task_types.Status
    assert status.DESCRIPTOR.full_name == "containerd.v1.types.Status"
    assert dict(status.items()) == {
        "UNKNOWN": 0,
        "CREATED": 1,
        "RUNNING": 2,
        "STOPPED": 3,
        "PAUSED": 4,
        "PAUSING": 5,
    }
    level = bootstrap.LogLevel
    assert level.DESCRIPTOR.full_name == "containerd.runtime.bootstrap.v1.LogLevel"
    assert dict(level.items()) == {
        "LOG_LEVEL_INFO": 0,
        "LOG_LEVEL_TRACE": -8,
        "LOG_LEVEL_DEBUG": -4,
        "LOG_LEVEL_WARN": 4,
        "LOG_LEVEL_ERROR": 8,
        "LOG_LEVEL_FATAL": 10,
        "LOG_LEVEL_PANIC": 12,
    }
    assert dict(bootstrap.Capability.items()) == {"CAPABILITY_UNSPECIFIED": 0}


# --- services ---------------------------------------------------------------


def test_task_service():
    service = shim.DESCRIPTOR.services_by_name["Task"]
    assert service.full_name == "containerd.task.v2.Task"
    empty = empty_pb2.Empty.DESCRIPTOR.full_name
    expected = {
        "State": ("StateRequest", "StateResponse"),
        "Create": ("CreateTaskRequest", "CreateTaskResponse"),
        "Start": ("StartRequest", "StartResponse"),
        "Delete": ("DeleteRequest", "DeleteResponse"),
        "Pids": ("PidsRequest", "PidsResponse"),
        "Pause": ("PauseRequest", None),
        "Resume": ("ResumeRequest", None),
        "Checkpoint": ("CheckpointTaskRequest", None),
        "Kill": ("KillRequest", None),
        "Exec": ("ExecProcessRequest", None),
        "ResizePty": ("ResizePtyRequest", None),
        "CloseIO": ("CloseIORequest", None),
        "Update": ("UpdateTaskRequest", None),
        "Wait": ("WaitRequest", "WaitResponse"),
        "Stats": ("StatsRequest", "StatsResponse"),
        "Connect": ("ConnectRequest", "ConnectResponse"),
        "Shutdown": ("ShutdownRequest", None),
    }
    assert len(service.methods) == 17
    for method in service.methods:
        request, response = expected[method.name]
        assert method.input_type.full_name == f"containerd.task.v2.{request}"
        want = f"containerd.task.v2.{response}" if response else empty
        assert method.output_type.full_name == want
    assert {m.name for m in service.methods} == set(expected)


def test_events_service():
    service = ttrpc_events.DESCRIPTOR.services_by_name["Events"]
    assert service.full_name == "containerd.services.events.ttrpc.v1.Events"
    assert [m.name for m in service.methods] == ["Forward"]
    forward = service.methods_by_name["Forward"]
    assert forward.input_type.full_name == "containerd.services.events.ttrpc.v1.ForwardRequest"
    assert forward.output_type.full_name == "google.protobuf.Empty"


# --- field layouts ----------------------------------------------------------

_SCALARS = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_DOUBLE: "double",
}


def _field_type(field: FieldDescriptor) -> str:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = (_field_type(f) for f in field.message_type.fields)
        return f"map<{key},{value}>"
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        kind = field.message_type.full_name
    elif field.type == FieldDescriptor.TYPE_ENUM:
        kind = field.enum_type.full_name
    else:
        kind = _SCALARS[field.type]
    repeated = getattr(field, "is_repeated", None)
    if repeated is None:  # older protobuf runtimes
        repeated = field.label == FieldDescriptor.LABEL_REPEATED
    return f"repeated {kind}" if repeated else kind


def layout(descriptor: Descriptor) -> dict[int, tuple[str, str]]:
    return {f.number: (f.name, _field_type(f)) for f in descriptor.fields}


def parse(text: str) -> dict[int, tuple[str, str]]:
    """'1 id string; 3 rootfs repeated containerd.types.Mount' -> layout dict."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        number, name, kind = item.split(" ", 2)
        out[int(number)] = (name, kind)
    return out


TS = "google.protobuf.Timestamp"
ANY = "google.protobuf.Any"
MOUNT = "containerd.types.Mount"

LAYOUTS = {
    # task-api.md §1
    mount.Mount: "1 type string; 2 source string; 3 target string; 4 options repeated string",
    task_types.ProcessInfo: f"1 pid uint32; 2 info {ANY}",
    task_types.Process: (
        "1 container_id string; 2 id string; 3 pid uint32; 4 status containerd.v1.types.Status;"
        "5 stdin string; 6 stdout string; 7 stderr string; 8 terminal bool;"
        f"9 exit_status uint32; 10 exited_at {TS}"
    ),
    # task-api.md §3
    shim.CreateTaskRequest: (
        f"1 id string; 2 bundle string; 3 rootfs repeated {MOUNT}; 4 terminal bool;"
        "5 stdin string; 6 stdout string; 7 stderr string; 8 checkpoint string;"
        f"9 parent_checkpoint string; 10 options {ANY}"
    ),
    shim.CreateTaskResponse: "1 pid uint32",
    shim.StartRequest: "1 id string; 2 exec_id string",
    shim.StartResponse: "1 pid uint32",
    shim.DeleteRequest: "1 id string; 2 exec_id string",
    shim.DeleteResponse: f"1 pid uint32; 2 exit_status uint32; 3 exited_at {TS}",
    shim.ExecProcessRequest: (
        "1 id string; 2 exec_id string; 3 terminal bool; 4 stdin string; 5 stdout string;"
        f"6 stderr string; 7 spec {ANY}"
    ),
    shim.ExecProcessResponse: "",
    shim.KillRequest: "1 id string; 2 exec_id string; 3 signal uint32; 4 all bool",
    shim.StateRequest: "1 id string; 2 exec_id string",
    shim.StateResponse: (
        "1 id string; 2 bundle string; 3 pid uint32; 4 status containerd.v1.types.Status;"
        "5 stdin string; 6 stdout string; 7 stderr string; 8 terminal bool;"
        f"9 exit_status uint32; 10 exited_at {TS}; 11 exec_id string"
    ),
    shim.WaitRequest: "1 id string; 2 exec_id string",
    shim.WaitResponse: f"1 exit_status uint32; 2 exited_at {TS}",
    shim.PidsRequest: "1 id string",
    shim.PidsResponse: "1 processes repeated containerd.v1.types.ProcessInfo",
    shim.PauseRequest: "1 id string",
    shim.ResumeRequest: "1 id string",
    shim.CheckpointTaskRequest: f"1 id string; 2 path string; 3 options {ANY}",
    shim.ResizePtyRequest: "1 id string; 2 exec_id string; 3 width uint32; 4 height uint32",
    shim.CloseIORequest: "1 id string; 2 exec_id string; 3 stdin bool",
    shim.UpdateTaskRequest: (f"1 id string; 2 resources {ANY}; 3 annotations map<string,string>"),
    shim.StatsRequest: "1 id string",
    shim.StatsResponse: f"1 stats {ANY}",
    shim.ConnectRequest: "1 id string",
    shim.ConnectResponse: "1 shim_pid uint32; 2 task_pid uint32; 3 version string",
    shim.ShutdownRequest: "1 id string; 2 now bool",
    # events.md §2
    events.TaskCreate: (
        f"1 container_id string; 2 bundle string; 3 rootfs repeated {MOUNT};"
        "4 io containerd.events.TaskIO; 5 checkpoint string; 6 pid uint32"
    ),
    events.TaskIO: "1 stdin string; 2 stdout string; 3 stderr string; 4 terminal bool",
    events.TaskStart: "1 container_id string; 2 pid uint32",
    events.TaskDelete: (
        f"1 container_id string; 2 pid uint32; 3 exit_status uint32; 4 exited_at {TS}; 5 id string"
    ),
    events.TaskExit: (
        f"1 container_id string; 2 id string; 3 pid uint32; 4 exit_status uint32; 5 exited_at {TS}"
    ),
    events.TaskOOM: "1 container_id string",
    events.TaskExecAdded: "1 container_id string; 2 exec_id string",
    events.TaskExecStarted: "1 container_id string; 2 exec_id string; 3 pid uint32",
    events.TaskPaused: "1 container_id string",
    events.TaskResumed: "1 container_id string",
    events.TaskCheckpointed: "1 container_id string; 2 checkpoint string",
    # shim-contract.md §9
    ttrpc_events.ForwardRequest: "1 envelope containerd.services.events.ttrpc.v1.Envelope",
    ttrpc_events.Envelope: f"1 timestamp {TS}; 2 namespace string; 3 topic string; 4 event {ANY}",
    # shim-contract.md §11.3 - 11.6
    runc_options.Options: (
        "1 no_pivot_root bool; 2 no_new_keyring bool; 3 shim_cgroup string; 4 io_uid uint32;"
        "5 io_gid uint32; 6 binary_name string; 7 root string; 8 criu_path string;"
        "9 systemd_cgroup bool; 10 criu_image_path string; 11 criu_work_path string;"
        "12 task_api_address string; 13 task_api_version uint32"
    ),
    runc_options.CheckpointOptions: (
        "1 exit bool; 2 open_tcp bool; 3 external_unix_sockets bool; 4 terminal bool;"
        "5 file_locks bool; 6 empty_namespaces repeated string; 7 cgroups_mode string;"
        "8 image_path string; 9 work_path string"
    ),
    runc_options.ProcessDetails: "1 exec_id string",
    runctypes.RuncOptions: (
        "1 runtime string; 2 runtime_root string; 3 criu_path string; 4 systemd_cgroup bool"
    ),
    runctypes.CreateOptions: (
        "1 no_pivot_root bool; 2 open_tcp bool; 3 external_unix_sockets bool; 4 terminal bool;"
        "5 file_locks bool; 6 empty_namespaces repeated string; 7 cgroups_mode string;"
        "8 no_new_keyring bool; 9 shim_cgroup string; 10 io_uid uint32; 11 io_gid uint32;"
        "12 criu_work_path string; 13 criu_image_path string"
    ),
    runctypes.CheckpointOptions: (
        "1 exit bool; 2 open_tcp bool; 3 external_unix_sockets bool; 4 terminal bool;"
        "5 file_locks bool; 6 empty_namespaces repeated string; 7 cgroups_mode string;"
        "8 work_path string; 9 image_path string"
    ),
    runctypes.ProcessDetails: "1 exec_id string",
    runtimeoptions.Options: "1 type_url string; 2 config_path string; 3 config_body bytes",
    # compat.md §4.3
    introspection.RuntimeRequest: f"1 runtime_path string; 2 options {ANY}",
    introspection.RuntimeVersion: "1 version string; 2 revision string",
    introspection.RuntimeInfo: (
        "1 name string; 2 version containerd.types.RuntimeVersion; 3 options google.protobuf.Any;"
        f"4 features {ANY}; 5 annotations map<string,string>"
    ),
    # compat.md §3.3, §3.7
    bootstrap.BootstrapParams: (
        "1 instance_id string; 2 namespace string;"
        "3 log_level containerd.runtime.bootstrap.v1.LogLevel; 4 containerd_version string;"
        "5 containerd_ttrpc_address string; 6 containerd_grpc_address string;"
        "7 containerd_binary string;"
        "8 extensions repeated containerd.runtime.bootstrap.v1.Extension; 9 socket_dir string"
    ),
    bootstrap.Extension: f"1 value {ANY}",
    bootstrap.BootstrapResult: (
        "1 version int32; 2 address string; 3 protocol string;"
        "4 capabilities repeated containerd.runtime.bootstrap.v1.Capability;"
        "5 metadata map<string,string>"
    ),
    # io-and-reaping.md §10.2
    cg1.Metrics: (
        "1 hugetlb repeated io.containerd.cgroups.v1.HugetlbStat;"
        "2 pids io.containerd.cgroups.v1.PidsStat; 3 cpu io.containerd.cgroups.v1.CPUStat;"
        "4 memory io.containerd.cgroups.v1.MemoryStat; 5 blkio io.containerd.cgroups.v1.BlkIOStat;"
        "6 rdma io.containerd.cgroups.v1.RdmaStat;"
        "7 network repeated io.containerd.cgroups.v1.NetworkStat;"
        "8 cgroup_stats io.containerd.cgroups.v1.CgroupStats;"
        "9 memory_oom_control io.containerd.cgroups.v1.MemoryOomControl"
    ),
    cg1.HugetlbStat: "1 usage uint64; 2 max uint64; 3 failcnt uint64; 4 pagesize string",
    cg1.CPUStat: (
        "1 usage io.containerd.cgroups.v1.CPUUsage; 2 throttling io.containerd.cgroups.v1.Throttle"
    ),
    cg1.CPUUsage: "1 total uint64; 2 kernel uint64; 3 user uint64; 4 per_cpu repeated uint64",
    cg1.Throttle: "1 periods uint64; 2 throttled_periods uint64; 3 throttled_time uint64",
    cg1.MemoryEntry: "1 limit uint64; 2 usage uint64; 3 max uint64; 4 failcnt uint64",
    cg1.MemoryOomControl: "1 oom_kill_disable uint64; 2 under_oom uint64; 3 oom_kill uint64",
    cg1.BlkIOEntry: (
        "1 op string; 2 device string; 3 major uint64; 4 minor uint64; 5 value uint64"
    ),
    cg1.RdmaEntry: "1 device string; 2 hca_handles uint32; 3 hca_objects uint32",
    cg1.CgroupStats: (
        "1 nr_sleeping uint64; 2 nr_running uint64; 3 nr_stopped uint64;"
        "4 nr_uninterruptible uint64; 5 nr_io_wait uint64"
    ),
    # io-and-reaping.md §10.1 (+ cgroups v3.1.3 additions 9, PSI etc.)
    cg2.Metrics: (
        "1 pids io.containerd.cgroups.v2.PidsStat; 2 cpu io.containerd.cgroups.v2.CPUStat;"
        "4 memory io.containerd.cgroups.v2.MemoryStat; 5 rdma io.containerd.cgroups.v2.RdmaStat;"
        "6 io io.containerd.cgroups.v2.IOStat;"
        "7 hugetlb repeated io.containerd.cgroups.v2.HugeTlbStat;"
        "8 memory_events io.containerd.cgroups.v2.MemoryEvents;"
        "9 network repeated io.containerd.cgroups.v2.NetworkStat"
    ),
    cg2.PidsStat: "1 current uint64; 2 limit uint64",
    cg2.CPUStat: (
        "1 usage_usec uint64; 2 user_usec uint64; 3 system_usec uint64; 4 nr_periods uint64;"
        "5 nr_throttled uint64; 6 throttled_usec uint64; 7 psi io.containerd.cgroups.v2.PSIStats;"
        "8 nr_bursts uint64; 9 burst_usec uint64"
    ),
    cg2.MemoryEvents: (
        "1 low uint64; 2 high uint64; 3 max uint64; 4 oom uint64; 5 oom_kill uint64;"
        "6 oom_group_kill uint64"
    ),
    cg2.IOStat: (
        "1 usage repeated io.containerd.cgroups.v2.IOEntry; 2 psi io.containerd.cgroups.v2.PSIStats"
    ),
    cg2.IOEntry: (
        "1 major uint64; 2 minor uint64; 3 rbytes uint64; 4 wbytes uint64; 5 rios uint64;"
        "6 wios uint64"
    ),
    cg2.HugeTlbStat: "1 current uint64; 2 max uint64; 3 pagesize string; 4 failcnt uint64",
    cg2.RdmaStat: (
        "1 current repeated io.containerd.cgroups.v2.RdmaEntry;"
        "2 limit repeated io.containerd.cgroups.v2.RdmaEntry"
    ),
    cg2.PSIData: "1 avg10 double; 2 avg60 double; 3 avg300 double; 4 total uint64",
}


@pytest.mark.parametrize(
    ("cls", "text"), LAYOUTS.items(), ids=[c.DESCRIPTOR.full_name for c in LAYOUTS]
)
def test_field_layout(cls, text):
    assert layout(cls.DESCRIPTOR) == parse(text)


_V1_MEMORY_KEYS = [
    "cache",
    "rss",
    "rss_huge",
    "mapped_file",
    "dirty",
    "writeback",
    "pg_pg_in",
    "pg_pg_out",
    "pg_fault",
    "pg_maj_fault",
    "inactive_anon",
    "active_anon",
    "inactive_file",
    "active_file",
    "unevictable",
]

_V2_MEMORY_KEYS = [
    "anon",
    "file",
    "kernel_stack",
    "slab",
    "sock",
    "shmem",
    "file_mapped",
    "file_dirty",
    "file_writeback",
    "anon_thp",
    "inactive_anon",
    "active_anon",
    "inactive_file",
    "active_file",
    "unevictable",
    "slab_reclaimable",
    "slab_unreclaimable",
    "pgfault",
    "pgmajfault",
    "workingset_refault",
    "workingset_activate",
    "workingset_nodereclaim",
    "pgrefill",
    "pgscan",
    "pgsteal",
    "pgactivate",
    "pgdeactivate",
    "pglazyfree",
    "pglazyfreed",
    "thp_fault_alloc",
    "thp_collapse_alloc",
    "usage",
    "usage_limit",
    "swap_usage",
    "swap_limit",
    "max_usage",
    "swap_max_usage",
]


def test_cgroup_v1_memory_stat_layout():
    expected = {i + 1: (k, "uint64") for i, k in enumerate(_V1_MEMORY_KEYS)}
    expected[16] = ("hierarchical_memory_limit", "uint64")
    expected[17] = ("hierarchical_swap_limit", "uint64")
    for i, key in enumerate(_V1_MEMORY_KEYS):
        expected[18 + i] = (f"total_{key}", "uint64")
    entry = "io.containerd.cgroups.v1.MemoryEntry"
    for number, name in ((33, "usage"), (34, "swap"), (35, "kernel"), (36, "kernel_tcp")):
        expected[number] = (name, entry)
    assert layout(cg1.MemoryStat.DESCRIPTOR) == expected


def test_cgroup_v2_memory_stat_layout():
    expected = {i + 1: (k, "uint64") for i, k in enumerate(_V2_MEMORY_KEYS)}
    expected[38] = ("psi", "io.containerd.cgroups.v2.PSIStats")
    assert layout(cg2.MemoryStat.DESCRIPTOR) == expected


def test_selected_field_numbers():
    # The numbers the brief singles out, read straight from the descriptors.
    def number(cls, name):
        return cls.DESCRIPTOR.fields_by_name[name].number

    assert number(shim.CreateTaskRequest, "options") == 10
    assert number(events.TaskExit, "exited_at") == 5
    assert [number(ttrpc_events.Envelope, n) for n in ("timestamp", "namespace", "topic")] == [
        1,
        2,
        3,
    ]
    assert number(ttrpc_events.Envelope, "event") == 4
    assert number(cg1.Metrics, "memory_oom_control") == 9
    assert number(cg2.Metrics, "memory_events") == 8
    assert number(runc_options.Options, "systemd_cgroup") == 9
    assert number(runctypes.CreateOptions, "shim_cgroup") == 9
    assert number(runctypes.CheckpointOptions, "work_path") == 8
    assert number(runctypes.CheckpointOptions, "image_path") == 9
    assert number(runc_options.CheckpointOptions, "image_path") == 8
    assert number(runc_options.CheckpointOptions, "work_path") == 9
    socket_dir = bootstrap.BootstrapParams.DESCRIPTOR.fields_by_name["socket_dir"]
    assert socket_dir.has_presence


# --- observed bytes: ttrpc.md §2.6 -------------------------------------------


def test_ttrpc_request_start():
    data = ld(1, "containerd.task.v2.Task") + ld(2, "Start") + ld(3, ld(1, "t1"))
    assert data[:2] == bytes.fromhex("0a17")
    assert len(data) == 38  # frame header length 0x26
    req = ttrpc.Request.FromString(data)
    assert (req.service, req.method) == ("containerd.task.v2.Task", "Start")
    start = shim.StartRequest.FromString(req.payload)
    assert start.id == "t1" and start.exec_id == ""
    built = ttrpc.Request(
        service="containerd.task.v2.Task",
        method="Start",
        payload=shim.StartRequest(id="t1").SerializeToString(),
    )
    assert built.SerializeToString() == data


def test_ttrpc_response_start_pid():
    data = bytes.fromhex("1203089c6c")
    resp = ttrpc.Response.FromString(data)
    assert not resp.HasField("status")
    assert shim.StartResponse.FromString(resp.payload).pid == 13852
    built = ttrpc.Response(payload=shim.StartResponse(pid=13852).SerializeToString())
    assert built.SerializeToString() == data


def test_ttrpc_error_response():
    message = b"process does not exist e1: not found"
    data = bytes.fromhex("0a28080512") + bytes([len(message)]) + message
    assert data[5] == 0x24
    resp = ttrpc.Response.FromString(data)
    assert resp.status.code == 5
    assert resp.status.message == message.decode()
    assert resp.payload == b""
    built = ttrpc.Response()
    built.status.code = 5
    built.status.message = message.decode()
    assert built.SerializeToString() == data


# --- observed bytes: task API -------------------------------------------------


def test_delete_response_bytes():
    # shim-contract.md §6: stdout of `shim delete`
    data = bytes.fromhex("089c6c1089011a0b08d39189d80610c5be946b")
    resp = shim.DeleteResponse.FromString(data)
    assert resp.pid == 13852
    assert resp.exit_status == 137
    assert resp.exited_at.seconds == 1795311827
    assert 0 < resp.exited_at.nanos < 1_000_000_000
    built = shim.DeleteResponse(
        pid=13852,
        exit_status=137,
        exited_at=timestamp_pb2.Timestamp(seconds=1795311827, nanos=resp.exited_at.nanos),
    )
    assert built.SerializeToString() == data


def test_state_zero_time():
    # task-api.md §1.4: field 10 = {1: -62135596800}
    zero = bytes.fromhex("8092b8c398feffffff01")
    assert _varint(GO_ZERO_TIME) == zero
    state = shim.StateResponse(
        id="t1",
        status=task_types.RUNNING,
        exited_at=timestamp_pb2.Timestamp(seconds=GO_ZERO_TIME),
    )
    data = state.SerializeToString()
    tail = bytes.fromhex("520b08") + zero
    assert data.endswith(tail)
    assert data == ld(1, "t1") + vint(4, 2) + tail
    back = shim.StateResponse.FromString(data)
    assert back.exited_at.seconds == GO_ZERO_TIME
    assert back.status == task_types.Status.Value("RUNNING")


def test_pids_response_bytes():
    # task-api.md §3.8: one ProcessInfo with only a pid
    data = bytes.fromhex("0a0308d674")
    resp = shim.PidsResponse.FromString(data)
    assert [p.pid for p in resp.processes] == [14934]
    assert (
        shim.PidsResponse(processes=[task_types.ProcessInfo(pid=14934)]).SerializeToString() == data
    )


def test_pids_exec_details_any():
    info = bare_any(runc_options.ProcessDetails(exec_id="e1"))
    assert info.type_url == "containerd.runc.v1.ProcessDetails"
    assert info.value == ld(1, "e1")


def test_connect_and_resize_bytes():
    # task-api.md §3.15 (1=13832 2=13852) and §3.11 (3=100 4=30)
    connect = shim.ConnectResponse(shim_pid=13832, task_pid=13852)
    assert connect.SerializeToString() == vint(1, 13832) + vint(2, 13852)
    resize = shim.ResizePtyRequest.FromString(ld(1, "t1") + vint(3, 100) + vint(4, 30))
    assert (resize.id, resize.width, resize.height) == ("t1", 100, 30)


def test_create_request_observed_rootfs():
    # task-api.md §1.1: 3:{1:'overlay' 2:'overlay' 4:'index=off' 4:'workdir=…' ...}
    entry = ld(1, "overlay") + ld(2, "overlay") + ld(4, "index=off") + ld(4, "workdir=/w")
    data = ld(1, "c1") + ld(2, "/b") + ld(3, entry)
    req = shim.CreateTaskRequest.FromString(data)
    assert req.rootfs[0].type == "overlay"
    assert req.rootfs[0].target == ""
    assert list(req.rootfs[0].options) == ["index=off", "workdir=/w"]
    assert req.SerializeToString() == data


def test_update_annotations_map_wire():
    req = shim.UpdateTaskRequest(id="t1", annotations={"k": "v"})
    assert req.SerializeToString() == ld(1, "t1") + ld(3, ld(1, "k") + ld(2, "v"))


def test_stats_any():
    # task-api.md §3.14: 1:'io.containerd.cgroups.v1.Metrics'
    metrics = cg1.Metrics(pids=cg1.PidsStat(current=1))
    metrics.cpu.usage.total = 10461131
    metrics.cpu.usage.per_cpu.extend([5, 6])
    resp = shim.StatsResponse(stats=bare_any(metrics))
    data = resp.SerializeToString()
    assert data.startswith(b"\x0a")
    any_msg = shim.StatsResponse.FromString(data).stats
    assert any_msg.type_url == "io.containerd.cgroups.v1.Metrics"
    value = cg1.Metrics.FromString(any_msg.value)
    assert value.pids.current == 1
    # per_cpu must be packed (one length-delimited field 4) - io-and-reaping.md §10.2
    usage = metrics.cpu.usage.SerializeToString()
    assert usage == vint(1, 10461131) + ld(4, b"\x05\x06")
    # memory_oom_control / memory_events present-but-empty serialize as field 9 / 8
    oom = cg1.Metrics()
    oom.memory_oom_control.SetInParent()
    assert oom.SerializeToString() == ld(9, b"")
    ev = cg2.Metrics()
    ev.memory_events.oom_kill = 1
    assert ev.SerializeToString() == ld(8, vint(5, 1))


# --- observed bytes: runtime options (shim-contract.md §11) --------------------


def test_legacy_create_options_any():
    data = (
        bytes.fromhex("0a23")
        + b"containerd.linux.runc.CreateOptions"
        + bytes.fromhex("1208080150e80758d00f")
    )
    assert len(data) == 47
    opts_any = any_pb2.Any.FromString(data)
    assert opts_any.type_url == "containerd.linux.runc.CreateOptions"
    opts = runctypes.CreateOptions.FromString(opts_any.value)
    assert opts.no_pivot_root is True
    assert opts.io_uid == 1000
    assert opts.io_gid == 2000
    assert not opts.no_new_keyring
    built = bare_any(runctypes.CreateOptions(no_pivot_root=True, io_uid=1000, io_gid=2000))
    assert built.SerializeToString() == data
    # Decoded as runc Options the same bytes lose io_uid/io_gid (10/11 are criu
    # paths there, so the varints become unknown fields): decode by type URL.
    as_runc = runc_options.Options.FromString(opts_any.value)
    assert as_runc.no_pivot_root
    assert (as_runc.io_uid, as_runc.io_gid, as_runc.criu_image_path) == (0, 0, "")


def test_runc_options_binary_name_any():
    data = (
        bytes.fromhex("0a1a")
        + b"containerd.runc.v1.Options"
        + bytes.fromhex("12163214")
        + b"/tmp/pyspec/runcwrap"
    )
    opts_any = any_pb2.Any.FromString(data)
    assert opts_any.type_url == "containerd.runc.v1.Options"
    opts = runc_options.Options.FromString(opts_any.value)
    assert opts.binary_name == "/tmp/pyspec/runcwrap"
    built = bare_any(runc_options.Options(binary_name="/tmp/pyspec/runcwrap"))
    assert built.SerializeToString() == data


def test_runc_options_no_pivot_any():
    # compat.md §3.3: Any{"containerd.runc.v1.Options", {1: true}}
    opts = runc_options.Options.FromString(vint(1, 1))
    assert opts.no_pivot_root
    assert opts.SerializeToString() == bytes.fromhex("0801")


def test_runc_options_2x_fields():
    opts = runc_options.Options(task_api_address="unix:///s", task_api_version=3)
    assert opts.SerializeToString() == ld(12, "unix:///s") + vint(13, 3)
    assert runc_options.Options(systemd_cgroup=True).SerializeToString() == vint(9, 1)


def test_runtimeoptions_config_path_any():
    # compat.md §3.3 / §4.1: Any{"runtimeoptions.v1.Options", {2: P}}
    path = "/etc/ctd-judge/fake-runtime.toml"
    value = bytes.fromhex("1220") + path.encode()
    opts = runtimeoptions.Options.FromString(value)
    assert opts.config_path == path
    assert bare_any(opts).SerializeToString() == any_bytes("runtimeoptions.v1.Options", value)
    body = runtimeoptions.Options(config_body=b"BinaryName = 'x'\n")
    assert body.SerializeToString() == ld(3, b"BinaryName = 'x'\n")


def test_legacy_checkpoint_options_swap():
    legacy = runctypes.CheckpointOptions(work_path="/w", image_path="/i")
    runc = runc_options.CheckpointOptions(work_path="/w", image_path="/i")
    assert legacy.SerializeToString() == ld(8, "/w") + ld(9, "/i")
    assert runc.SerializeToString() == ld(8, "/i") + ld(9, "/w")


# --- observed bytes: events (events.md §2, shim-contract.md §9) ---------------


def test_task_start_event():
    data = ld(1, "t1") + vint(2, 13852)
    assert events.TaskStart(container_id="t1", pid=13852).SerializeToString() == data
    payload = any_bytes("containerd.events.TaskStart", data)
    assert bare_any(events.TaskStart(container_id="t1", pid=13852)).SerializeToString() == payload


def test_task_exit_event():
    ts = vint(1, 1795311827) + vint(2, 75962349)
    data = ld(1, "t1") + ld(2, "t1") + vint(3, 13852) + vint(4, 3) + ld(5, ts)
    event = events.TaskExit(
        container_id="t1",
        id="t1",
        pid=13852,
        exit_status=3,
        exited_at=timestamp_pb2.Timestamp(seconds=1795311827, nanos=75962349),
    )
    assert event.SerializeToString() == data
    exec_exit = events.TaskExit.FromString(
        ld(1, "t2") + ld(2, "e1") + vint(3, 15383) + vint(4, 5) + ld(5, ts)
    )
    assert (exec_exit.container_id, exec_exit.id, exec_exit.pid) == ("t2", "e1", 15383)
    assert exec_exit.exit_status == 5
    # exit status 0 is omitted on the wire (proto3)
    zero = events.TaskExit(container_id="t1", id="t1", pid=1, exit_status=0)
    assert zero.SerializeToString() == ld(1, "t1") + ld(2, "t1") + vint(3, 1)


def test_task_delete_event():
    ts = vint(1, 1795311827) + vint(2, 1)
    data = ld(1, "t1") + vint(2, 13852) + vint(3, 3) + ld(4, ts)
    event = events.TaskDelete.FromString(data)
    assert (event.container_id, event.pid, event.exit_status, event.id) == ("t1", 13852, 3, "")
    assert event.SerializeToString() == data


def test_task_create_event():
    event = events.TaskCreate(
        container_id="t1",
        bundle="/b",
        rootfs=[mount.Mount(type="overlay", source="overlay", options=["ro"])],
        io=events.TaskIO(stdin="/in", stdout="/out", terminal=True),
        pid=7,
    )
    data = (
        ld(1, "t1")
        + ld(2, "/b")
        + ld(3, ld(1, "overlay") + ld(2, "overlay") + ld(4, "ro"))
        + ld(4, ld(1, "/in") + ld(2, "/out") + vint(4, 1))
        + vint(6, 7)
    )
    assert event.SerializeToString() == data


def test_forward_envelope():
    # envelope {1:{1=1795311827 2=61417796} 2:'pyspec' 3:'/tasks/create' 4:{…}}
    inner = events.TaskOOM(container_id="t1")
    envelope = ttrpc_events.Envelope(
        timestamp=timestamp_pb2.Timestamp(seconds=1795311827, nanos=61417796),
        namespace="pyspec",
        topic="/tasks/oom",
        event=bare_any(inner),
    )
    expected = (
        ld(1, vint(1, 1795311827) + vint(2, 61417796))
        + ld(2, "pyspec")
        + ld(3, "/tasks/oom")
        + ld(4, any_bytes("containerd.events.TaskOOM", ld(1, "t1")))
    )
    assert envelope.SerializeToString() == expected
    request = ttrpc_events.ForwardRequest(envelope=envelope)
    assert request.SerializeToString() == ld(1, expected)


# --- containerd 2.x: -info and bootstrap (compat.md §3, §4) ------------------


def test_runtime_info():
    info = introspection.RuntimeInfo(
        name="io.containerd.pyshim.v2",
        version=introspection.RuntimeVersion(version="v0.1.0", revision="abc"),
        annotations={"containerd.io/runtime-allow-mounts": "overlay"},
    )
    data = info.SerializeToString()
    assert data.startswith(ld(1, "io.containerd.pyshim.v2") + ld(2, ld(1, "v0.1.0") + ld(2, "abc")))
    assert introspection.RuntimeInfo.FromString(data) == info
    assert introspection.RuntimeInfo.FromString(b"") == introspection.RuntimeInfo()


def test_bootstrap_params_observed():
    data = (
        ld(1, "jn-baseline-28125")
        + ld(2, "judge2")
        + ld(4, "v2.3.4")
        + ld(5, "/srv/ctd-judge2/run/2.3.4/containerd.sock.ttrpc")
        + ld(6, "/srv/ctd-judge2/run/2.3.4/containerd.sock")
        + ld(7, "/srv/ctd-judge2/bin/2.3.4/containerd")
        + ld(9, "/run/containerd/s")
    )
    assert len(data) == 184
    assert data[:2] == bytes.fromhex("0a11")
    assert bytes.fromhex("2a2f") in data and bytes.fromhex("4a11") in data
    params = bootstrap.BootstrapParams.FromString(data)
    assert params.instance_id == "jn-baseline-28125"
    assert params.namespace == "judge2"
    assert params.log_level == bootstrap.LOG_LEVEL_INFO
    assert params.containerd_ttrpc_address.endswith(".ttrpc")
    assert params.HasField("socket_dir") and params.socket_dir == "/run/containerd/s"
    assert params.SerializeToString() == data
    assert not bootstrap.BootstrapParams().HasField("socket_dir")


def test_bootstrap_params_debug_level_and_extension():
    debug = bytes.fromhex("18fcffffffffffffffff01")
    assert bootstrap.BootstrapParams.FromString(debug).log_level == bootstrap.LOG_LEVEL_DEBUG
    assert bootstrap.BootstrapParams(log_level=-4).SerializeToString() == debug
    ext = (
        bytes.fromhex("42410a3f0a19")
        + b"runtimeoptions.v1.Options"
        + bytes.fromhex("12221220")
        + b"/etc/ctd-judge/fake-runtime.toml"
    )
    params = bootstrap.BootstrapParams.FromString(ext)
    value = params.extensions[0].value
    assert value.type_url == "runtimeoptions.v1.Options"
    opts = runtimeoptions.Options.FromString(value.value)
    assert opts.config_path == "/etc/ctd-judge/fake-runtime.toml"
    assert params.SerializeToString() == ext


def test_bootstrap_result_observed():
    address = "unix:///run/containerd/s/" + "ab" * 32
    result = bootstrap.BootstrapResult(version=3, address=address, protocol="ttrpc")
    data = result.SerializeToString()
    assert len(data) == 100
    assert data == bytes.fromhex("08031259") + address.encode() + bytes.fromhex("1a05") + b"ttrpc"
