"""containerd 2.x contracts, played from containerd's side as compat.md records them:
the 2.3 start protocol (BootstrapParams in, BootstrapResult out), its socket_dir,
and ``-info``. CI has only containerd 1.6, so these are byte-level tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio
from google.protobuf import any_pb2
from test_manager import SHIM, RealShim, connect_and_shutdown, real_shim  # noqa: F401

from shimv2 import bootstrap, manager, protowire
from shimv2.api.containerd.runc.options import oci_pb2
from shimv2.api.containerd.runtime.bootstrap.v1 import bootstrap_pb2
from shimv2.api.containerd.types import introspection_pb2
from shimv2.api.runtimeoptions.v1 import api_pb2 as runtimeoptions

# compat.md §3.3: 2.3.4 at info level, no options (184 bytes).
OBSERVED_PARAMS = (
    b"\x0a\x11jn-baseline-28125"
    b"\x12\x06judge2"
    b"\x22\x06v2.3.4"
    b"\x2a\x2f/srv/ctd-judge2/run/2.3.4/containerd.sock.ttrpc"
    b"\x32\x29/srv/ctd-judge2/run/2.3.4/containerd.sock"
    b"\x3a\x24/srv/ctd-judge2/bin/2.3.4/containerd"
    b"\x4a\x11/run/containerd/s"
)
# compat.md §3.3: the runtime options extension ctr adds for --runtime-config-path.
OBSERVED_EXTENSION = (
    b"\x42\x41\x0a\x3f\x0a\x19runtimeoptions.v1.Options"
    b"\x12\x22\x12\x20/etc/ctd-judge/fake-runtime.toml"
)
# shim-contract.md §3: what 1.6 writes for runc Options (a bare Any).
OBSERVED_ANY = b"\x0a\x1acontainerd.runc.v1.Options\x12\x16\x32\x14/tmp/pyspec/runcwrap"
DEBUG_LEVEL = b"\x18\xfc\xff\xff\xff\xff\xff\xff\xff\xff\x01"  # log_level = -4


def test_observed_bootstrap_params_are_recognised() -> None:
    assert len(OBSERVED_PARAMS) == 184
    given = bootstrap.classify(OBSERVED_PARAMS, "jn-baseline-28125", "judge2")
    assert given == bootstrap.StartInput(bootstrap=True, socket_dir="/run/containerd/s")


def test_options_come_from_the_extension() -> None:
    given = bootstrap.classify(OBSERVED_PARAMS + OBSERVED_EXTENSION)
    any_msg = bootstrap_pb2.Extension.FromString(OBSERVED_EXTENSION[2:]).value
    assert given.options == any_msg.SerializeToString()  # the original Any, not rewrapped
    options = runtimeoptions.Options.FromString(any_msg.value)
    assert options.config_path == "/etc/ctd-judge/fake-runtime.toml"
    assert len(OBSERVED_PARAMS + OBSERVED_EXTENSION) == 184 + 67


def test_unknown_extensions_are_ignored() -> None:
    other = protowire.encode([(8, protowire.encode([(1, protowire.encode([(1, "x.y.Z")]))]))])
    assert bootstrap.classify(OBSERVED_PARAMS + other).options == b""


def test_debug_log_level_is_a_ten_byte_varint() -> None:
    assert bootstrap.classify(OBSERVED_PARAMS + DEBUG_LEVEL).debug
    info_level = bootstrap.classify(OBSERVED_PARAMS)
    assert not info_level.debug


def test_a_bare_any_is_not_bootstrap_params() -> None:
    # It decodes as BootstrapParams too (compat.md §3.5): field numbers decide.
    bootstrap_pb2.BootstrapParams.FromString(OBSERVED_ANY)
    assert bootstrap.classify(OBSERVED_ANY, "t1", "pyspec") == bootstrap.StartInput(
        options=OBSERVED_ANY
    )


def test_degenerate_params_with_only_id_and_namespace() -> None:
    raw = protowire.encode([(1, "t1"), (2, "ns")])
    assert bootstrap.classify(raw, "t1", "ns").bootstrap
    assert not bootstrap.classify(raw, "t2", "ns").bootstrap


@pytest.mark.parametrize("raw", [b"", b"\xff\xff\xff", b"\x0a\x7f short"])
def test_nothing_or_garbage_means_no_options(raw: bytes) -> None:
    assert bootstrap.classify(raw) == bootstrap.StartInput()


def test_bootstrap_result_bytes() -> None:
    address = "unix:///run/containerd/s/" + "a" * 64
    out = bootstrap.bootstrap_result(address)
    # The runc shim's answer has this shape (with version 3): 08 0v 12 59 <address> 1a 05 ttrpc
    assert out == b"\x08\x02\x12\x59" + address.encode() + b"\x1a\x05ttrpc"
    result = bootstrap_pb2.BootstrapResult.FromString(out)
    assert (result.version, result.address, result.protocol) == (2, address, "ttrpc")


def test_bootstrap_result_long_address_uses_a_varint_length() -> None:
    address = "unix://" + "/d" * 60 + "/" + "b" * 64
    out = bootstrap.bootstrap_result(address)
    assert bootstrap_pb2.BootstrapResult.FromString(out).address == address
    assert out[3] & 0x80  # two-byte length


def params(shim: RealShim, socket_dir: str, options: bytes = b"") -> bytes:
    fields: list[tuple[int, int | bytes | str]] = [
        (1, "t1"),
        (2, shim.namespace),
        (4, "v2.3.4"),
        (5, shim.address + ".ttrpc"),
        (6, shim.address),
        (7, "/usr/bin/containerd"),
    ]
    if options:
        fields.append((8, protowire.encode([(1, options)])))
    fields.append((9, socket_dir))
    return protowire.encode(fields)


def start(shim: RealShim, bundle: Path, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        shim.argv(),
        cwd=bundle,
        env={**shim.env(), "MAX_SHIM_VERSION": "2", "GRPC_ADDRESS": shim.address},
        input=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # containerd: CombinedOutput
        timeout=20,
    )
    pid = int((bundle / "shim.pid").read_text()) if (bundle / "shim.pid").exists() else 0
    if pid:
        shim.daemons.append(pid)
    return result


def test_real_start_answers_bootstrap_params_in_kind(real_shim: RealShim) -> None:  # noqa: F811
    socket_dir = tempfile.mkdtemp(prefix="pyshim-s", dir="/tmp")
    try:
        bundle = real_shim.bundle("b1")
        result = start(real_shim, bundle, params(real_shim, socket_dir))
        assert result.returncode == 0, result.stdout
        answer = bootstrap_pb2.BootstrapResult.FromString(result.stdout)  # nothing else
        path = manager.socket_path(real_shim.address, real_shim.namespace, "t1", socket_dir)
        real_shim.sockets.append(path)
        assert (answer.version, answer.address, answer.protocol) == (2, f"unix://{path}", "ttrpc")
        assert result.stdout == bootstrap.bootstrap_result(f"unix://{path}")
        assert (bundle / "address").read_text() == f"unix://{path}"  # plain, for 1.x/2.x reloads
        assert os.readlink(bundle / "s") == socket_dir  # for `delete`
        trio.run(connect_and_shutdown, f"unix://{path}", "t1")  # it serves at that path
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


def test_real_start_gives_1x_callers_a_plain_address(real_shim: RealShim) -> None:  # noqa: F811
    bundle = real_shim.bundle("b1")
    options = oci_pb2.Options(no_pivot_root=True)
    raw = any_pb2.Any(type_url="containerd.runc.v1.Options", value=options.SerializeToString())
    result = start(real_shim, bundle, raw.SerializeToString())
    assert result.returncode == 0
    assert result.stdout == f"unix://{real_shim.expected_path()}".encode()
    trio.run(connect_and_shutdown, f"unix://{real_shim.expected_path()}", "t1")


def run_info(stdin: bytes, tmp_path: Path) -> subprocess.CompletedProcess[bytes]:
    # compat.md §4.2: exactly `-info`, containerd's cwd, no shim env variables.
    env = {k: v for k, v in os.environ.items() if k not in ("TTRPC_ADDRESS", "NAMESPACE")}
    return subprocess.run(
        [str(SHIM), "-info"], cwd=tmp_path, env=env, input=stdin, capture_output=True, timeout=20
    )


def test_info_without_options(tmp_path: Path) -> None:
    result = run_info(b"", tmp_path)
    assert (result.returncode, result.stderr) == (0, b"")
    answer = introspection_pb2.RuntimeInfo.FromString(result.stdout)
    assert answer.name == "io.containerd.pyshim.v2"
    assert answer.version.version
    assert not answer.HasField("options")
    assert answer.features.type_url == manager.FEATURES_TYPE_URL
    assert b'"ociVersionMin"' in answer.features.value  # runc features JSON
    assert list(tmp_path.iterdir()) == []  # no daemon, no files


def test_info_echoes_the_options(tmp_path: Path) -> None:
    options = runtimeoptions.Options(config_path=str(tmp_path / "none.toml"))
    raw = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=options.SerializeToString())
    (tmp_path / "none.toml").write_text('BinaryName = "runc"\n')
    result = run_info(raw.SerializeToString(), tmp_path)
    assert result.returncode == 0, result.stderr
    answer = introspection_pb2.RuntimeInfo.FromString(result.stdout)
    assert answer.options.SerializeToString() == raw.SerializeToString()


def test_info_with_unreadable_options_fails_clearly(tmp_path: Path) -> None:
    result = run_info(b"\xff\xff", tmp_path)
    assert result.returncode == 1
    assert b"cannot read the runtime options" in result.stderr
    assert result.stdout == b""
