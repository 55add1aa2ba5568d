"""Runtime options from every Any type containerd sends (spec: shim-contract.md §11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from shimv2 import options
from shimv2.api.containerd.linux.runctypes import runc_pb2
from shimv2.api.containerd.runc.options import oci_pb2
from shimv2.api.runtimeoptions.v1 import api_pb2
from shimv2.options import ShimOptions, from_any, from_toml

# `ctr run --no-pivot` with uid/gid maps against containerd 1.6 (observed bytes of
# the Any on `start`'s stdin): CreateOptions{no_pivot_root, io_uid=1000, io_gid=2000}.
OBSERVED_LEGACY_CREATE = (
    b"\x0a\x23containerd.linux.runc.CreateOptions"
    + b"\x12\x08"
    + bytes([0x08, 0x01, 0x50, 0xE8, 0x07, 0x58, 0xD0, 0x0F])
)


def test_defaults() -> None:
    o = ShimOptions()
    assert o.runc_binary == "runc"
    assert o.runc_root("k8s.io") == "/run/containerd/runc/k8s.io"
    assert options.DEFAULT_RUNC_ROOT == "/run/containerd/runc"


def test_runc_root_and_binary_overrides() -> None:
    o = ShimOptions(root="/var/run/myroot", binary_name="/usr/local/sbin/crun")
    assert o.runc_root("default") == "/var/run/myroot/default"
    assert o.runc_binary == "/usr/local/sbin/crun"


@pytest.mark.parametrize(
    ("type_url", "expected"),
    [
        ("containerd.runc.v1.Options", "containerd.runc.v1.Options"),
        ("type.googleapis.com/containerd.runc.v1.Options", "containerd.runc.v1.Options"),
        ("a/b/c.D", "c.D"),
        ("", ""),
    ],
)
def test_type_name(type_url: str, expected: str) -> None:
    assert options.type_name(type_url) == expected


def full_runc_options() -> oci_pb2.Options:
    return oci_pb2.Options(
        no_pivot_root=True,
        no_new_keyring=True,
        shim_cgroup="/shim",
        io_uid=1000,
        io_gid=2000,
        binary_name="/x/runc",
        root="/x/root",
        criu_path="/x/criu",
        systemd_cgroup=True,
        criu_image_path="/img",
        criu_work_path="/work",
    )


EXPECTED_FULL = ShimOptions(
    binary_name="/x/runc",
    root="/x/root",
    systemd_cgroup=True,
    no_pivot_root=True,
    no_new_keyring=True,
    shim_cgroup="/shim",
    io_uid=1000,
    io_gid=2000,
    criu_path="/x/criu",
    criu_image_path="/img",
    criu_work_path="/work",
)


def test_runc_options() -> None:
    value = full_runc_options().SerializeToString()
    assert from_any("containerd.runc.v1.Options", value) == EXPECTED_FULL


def test_runc_options_observed_binary_name() -> None:
    # Observed on start's stdin: Options{binary_name: "/tmp/pyspec/runcwrap"} (field 6).
    any_bytes = b"\x0a\x1acontainerd.runc.v1.Options\x12\x16\x32\x14/tmp/pyspec/runcwrap"
    packed = any_pb2.Any.FromString(any_bytes)
    assert from_any(packed.type_url, packed.value) == ShimOptions(
        binary_name="/tmp/pyspec/runcwrap"
    )


def test_runc_options_with_googleapis_prefix() -> None:
    value = full_runc_options().SerializeToString()
    assert from_any("type.googleapis.com/containerd.runc.v1.Options", value) == EXPECTED_FULL


def test_runc_options_empty_payload_is_all_defaults() -> None:
    assert from_any("containerd.runc.v1.Options", b"") == ShimOptions()


def test_legacy_create_options_observed_bytes() -> None:
    packed = any_pb2.Any.FromString(OBSERVED_LEGACY_CREATE)
    assert packed.type_url == "containerd.linux.runc.CreateOptions"
    assert from_any(packed.type_url, packed.value) == ShimOptions(
        no_pivot_root=True, io_uid=1000, io_gid=2000
    )


def test_legacy_create_options_field_numbers_differ_from_runc_options() -> None:
    value = runc_pb2.CreateOptions(
        no_pivot_root=True,
        no_new_keyring=True,
        shim_cgroup="/legacy-shim",
        io_uid=7,
        io_gid=8,
        criu_work_path="/w",
        criu_image_path="/i",
        open_tcp=True,  # checkpoint-only fields are not runtime options
        terminal=True,
    ).SerializeToString()
    assert from_any("containerd.linux.runc.CreateOptions", value) == ShimOptions(
        no_pivot_root=True,
        no_new_keyring=True,
        shim_cgroup="/legacy-shim",
        io_uid=7,
        io_gid=8,
        criu_work_path="/w",
        criu_image_path="/i",
    )


def test_legacy_runc_options() -> None:
    value = runc_pb2.RuncOptions(
        runtime="/x/runc", runtime_root="/root", criu_path="/criu", systemd_cgroup=True
    ).SerializeToString()
    assert from_any("containerd.linux.runc.RuncOptions", value) == ShimOptions(
        binary_name="/x/runc", root="/root", criu_path="/criu", systemd_cgroup=True
    )


def runtime_options(**kw: object) -> bytes:
    return api_pb2.Options(**kw).SerializeToString()  # type: ignore[arg-type]


def test_runtimeoptions_with_config_path(tmp_path: Path) -> None:
    config = tmp_path / "runtime.toml"
    config.write_text('BinaryName = "/opt/runc"\nSystemdCgroup = true\nRoot = "/run/r"\n')
    value = runtime_options(type_url="io.containerd.runc.v2.options", config_path=str(config))
    assert from_any("runtimeoptions.v1.Options", value) == ShimOptions(
        binary_name="/opt/runc", systemd_cgroup=True, root="/run/r"
    )


def test_runtimeoptions_config_path_wins_over_body(tmp_path: Path) -> None:
    config = tmp_path / "runtime.toml"
    config.write_text('BinaryName = "/from/path"\n')
    value = runtime_options(config_path=str(config), config_body=b'BinaryName = "/from/body"\n')
    assert from_any("runtimeoptions.v1.Options", value).binary_name == "/from/path"


def test_runtimeoptions_missing_config_path(tmp_path: Path) -> None:
    value = runtime_options(config_path=str(tmp_path / "missing.toml"))
    with pytest.raises(ValueError, match="cannot read runtime config"):
        from_any("runtimeoptions.v1.Options", value)


def test_runtimeoptions_with_config_body() -> None:
    # containerd >= 1.7 CRI: the whole TOML `options` table in config_body.
    body = b"""
TypeUrl = "io.containerd.runc.v1.Options"
BinaryName = "/usr/bin/runc"
SystemdCgroup = true
NoPivotRoot = false
Root = ""
IoUid = 0
CriuPath = ""
"""
    value = runtime_options(config_body=body)
    assert from_any("runtimeoptions.v1.Options", value) == ShimOptions(
        binary_name="/usr/bin/runc", systemd_cgroup=True
    )


def test_runtimeoptions_empty() -> None:
    assert from_any("runtimeoptions.v1.Options", b"") == ShimOptions()


@pytest.mark.parametrize(
    "key",
    ["SystemdCgroup", "systemdcgroup", "SYSTEMDCGROUP", "systemd_cgroup", "Systemd_Cgroup"],
)
def test_toml_keys_case_insensitive_and_snake_case(key: str) -> None:
    assert from_toml(f"{key} = true").systemd_cgroup is True


def test_systemd_cgroup_given_or_not() -> None:
    # Only a given value overrides the cgroupsPath inference (container.wants_systemd_cgroup).
    assert from_toml("").systemd_cgroup is None
    assert from_toml("SystemdCgroup = false").systemd_cgroup is False
    assert from_any(options.RUNC_OPTIONS, b"").systemd_cgroup is None  # false: not on the wire
    runc = oci_pb2.Options(systemd_cgroup=True).SerializeToString()
    assert from_any(options.RUNC_OPTIONS, runc).systemd_cgroup is True
    with pytest.raises(ValueError, match="must be bool"):
        from_toml('SystemdCgroup = "yes"')
    # persisted for `delete`: false and unset are both left out
    assert ShimOptions(systemd_cgroup=False).to_json() == "{}"
    assert ShimOptions(systemd_cgroup=True, spool_limit_bytes=0).to_json() == (
        '{"systemd_cgroup": true, "spool_limit_bytes": 0}'
    )


def test_toml_every_key() -> None:
    text = """
binary_name = "b"
root = "r"
systemd_cgroup = true
no_pivot_root = true
NoNewKeyring = true
ShimCgroup = "s"
IoUid = 5
io_gid = 6
CriuPath = "c"
CriuImagePath = "ci"
criu_work_path = "cw"
"""
    assert from_toml(text) == ShimOptions(
        binary_name="b",
        root="r",
        systemd_cgroup=True,
        no_pivot_root=True,
        no_new_keyring=True,
        shim_cgroup="s",
        io_uid=5,
        io_gid=6,
        criu_path="c",
        criu_image_path="ci",
        criu_work_path="cw",
    )


def test_toml_unknown_and_ignored_keys() -> None:
    text = 'TypeUrl = "x"\nConfigPath = "/p"\nSomethingNew = 3\n[nested]\na = 1\n'
    assert from_toml(text) == ShimOptions()


@pytest.mark.parametrize(
    "text",
    [
        'SystemdCgroup = "true"',
        "SystemdCgroup = 1",
        "BinaryName = 5",
        "BinaryName = true",
        "IoUid = true",  # bool is an int in Python: must still be refused
        'IoUid = "1000"',
        "IoUid = 1.5",
        "Root = [1]",
    ],
)
def test_toml_bad_types(text: str) -> None:
    with pytest.raises(ValueError, match="runtime option"):
        from_toml(text)


def test_toml_syntax_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        from_toml("BinaryName = ")


def test_runtimeoptions_body_with_bad_type_raises() -> None:
    value = runtime_options(config_body=b'SystemdCgroup = "yes"')
    with pytest.raises(ValueError):
        from_any("runtimeoptions.v1.Options", value)


def test_runtimeoptions_body_not_utf8_raises() -> None:
    value = runtime_options(config_body=b"BinaryName = '\xff'")
    with pytest.raises(ValueError):
        from_any("runtimeoptions.v1.Options", value)


@pytest.mark.parametrize("value", [b"", b"\x0a\x03abc", b"anything"])
def test_empty_type_url_means_no_options(value: bytes) -> None:
    assert from_any("", value) == ShimOptions()


@pytest.mark.parametrize(
    "type_url",
    [
        "containerd.runc.v1.CheckpointOptions",
        "io.containerd.something.Else",
        # 2.3 BootstrapParams misread as an Any: type_url = container id (pitfall 26)
        "my-container",
    ],
)
def test_unknown_type_gives_defaults(type_url: str) -> None:
    assert from_any(type_url, b"\x0a\x05hello\xff\xff") == ShimOptions()


@pytest.mark.parametrize(
    "type_url",
    [
        "containerd.runc.v1.Options",
        "containerd.linux.runc.CreateOptions",
        "containerd.linux.runc.RuncOptions",
        "runtimeoptions.v1.Options",
    ],
)
@pytest.mark.parametrize(
    "payload",
    [
        b"\xff",  # truncated varint tag
        b"\x0a\x10short",  # length beyond the end
        b"\x07",  # invalid wire type
    ],
)
def test_malformed_payload_raises_value_error(type_url: str, payload: bytes) -> None:
    with pytest.raises(ValueError):
        from_any(type_url, payload)


@pytest.mark.parametrize(
    ("type_url", "tag"),
    [
        ("containerd.runc.v1.Options", 0x32),  # binary_name = 6
        ("containerd.linux.runc.CreateOptions", 0x32),  # empty_namespaces = 6
        ("containerd.linux.runc.RuncOptions", 0x0A),  # runtime = 1
        ("runtimeoptions.v1.Options", 0x0A),  # type_url = 1
    ],
)
def test_invalid_utf8_in_a_string_field_raises_value_error(type_url: str, tag: int) -> None:
    with pytest.raises(ValueError):
        from_any(type_url, bytes([tag, 2, 0xFF, 0xFE]))


# -- JSON persistence -----------------------------------------------------------


def test_json_round_trip() -> None:
    assert ShimOptions.from_json(EXPECTED_FULL.to_json()) == EXPECTED_FULL
    assert ShimOptions.from_json(ShimOptions().to_json()) == ShimOptions()


def test_json_leaves_out_defaults() -> None:
    assert json.loads(ShimOptions().to_json()) == {}
    assert json.loads(ShimOptions(root="/r").to_json()) == {"root": "/r"}


def test_json_ignores_unknown_keys() -> None:
    assert ShimOptions.from_json('{"root": "/r", "future": 1}') == ShimOptions(root="/r")


def test_json_go_runc_shim_format() -> None:
    # The Go runc shim's options.json uses the same (gogo json) names.
    text = '{"binary_name":"/x/runc","root":"/r","systemd_cgroup":true}'
    assert ShimOptions.from_json(text) == ShimOptions(
        binary_name="/x/runc", root="/r", systemd_cgroup=True
    )


# -- spool limit (ours: output kept while nobody reads a FIFO) ---------------------


def test_spool_limit_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(options.SPOOL_LIMIT_ENV, raising=False)
    assert ShimOptions().spool_limit == options.DEFAULT_SPOOL_LIMIT == 64 << 20


@pytest.mark.parametrize("key", ["SpoolLimitBytes", "spool_limit_bytes", "spoollimitbytes"])
def test_spool_limit_from_toml(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(options.SPOOL_LIMIT_ENV, "5")
    assert from_toml(f"{key} = 1048576").spool_limit == 1 << 20
    assert from_toml(f"{key} = 0").spool_limit == 0  # 0: never spool, block like Go


@pytest.mark.parametrize("text", ["SpoolLimitBytes = -1", 'SpoolLimitBytes = "64M"'])
def test_spool_limit_bad_values(text: str) -> None:
    with pytest.raises(ValueError, match="runtime option"):
        from_toml(text)


@pytest.mark.parametrize(("env", "expected"), [("2048", 2048), ("0", 0), ("lots", 64 << 20)])
def test_spool_limit_from_environment(
    env: str, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(options.SPOOL_LIMIT_ENV, env)
    assert ShimOptions().spool_limit == expected


def test_spool_limit_json_round_trip() -> None:
    for value in (0, 4096):
        o = ShimOptions(spool_limit_bytes=value)
        assert json.loads(o.to_json()) == {"spool_limit_bytes": value}
        assert ShimOptions.from_json(o.to_json()) == o
