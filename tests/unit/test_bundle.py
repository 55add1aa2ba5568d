"""Files the shim keeps in the bundle (spec: shim-contract.md §2, §6)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from shimv2 import bundle as bundlefiles
from shimv2.bundle import ExitRecord
from shimv2.options import ShimOptions


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_write_atomic_creates_the_file(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "address"
    bundlefiles.write_atomic(str(path), "unix:///run/containerd/s/abc")
    assert path.read_bytes() == b"unix:///run/containerd/s/abc"  # verbatim, no newline
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["address"]  # no temporary file left


def test_write_atomic_mode(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "options.json"
    bundlefiles.write_atomic(str(path), "{}", mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_write_atomic_replaces_by_rename(tmp_path: Path) -> None:
    path = tmp_path / "shim.pid"
    path.write_text("1111")
    with open(path) as old_reader:
        old_inode = os.fstat(old_reader.fileno()).st_ino
        bundlefiles.write_atomic(str(path), "2222")
        # A reader of the old file still sees the whole old content: the new
        # content went to a new inode that was renamed over the name.
        assert old_reader.read() == "1111"
    assert path.read_text() == "2222"
    assert path.stat().st_ino != old_inode


def test_write_atomic_removes_a_stale_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "address"
    stale = tmp_path / ".address.tmp"
    stale.write_text("half-written garbage from a crashed start")
    bundlefiles.write_atomic(str(path), "unix:///x")
    assert path.read_text() == "unix:///x"
    assert not stale.exists()


def test_write_atomic_into_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        bundlefiles.write_atomic(str(tmp_path / "nope" / "address"), "x")


def test_write_atomic_empty_and_unicode(tmp_path: Path) -> None:
    path = tmp_path / "f"
    bundlefiles.write_atomic(str(path), "")
    assert path.read_bytes() == b""
    bundlefiles.write_atomic(str(path), "ünïcode")
    assert path.read_text() == "ünïcode"


def test_read_text(tmp_path: Path) -> None:
    assert bundlefiles.read_text(str(tmp_path / "missing")) is None
    assert bundlefiles.read_text(str(tmp_path)) is None  # a directory
    (tmp_path / "bad").write_bytes(b"\xff\xfe\x00")
    assert bundlefiles.read_text(str(tmp_path / "bad")) is None
    (tmp_path / "ok").write_text("hi\n")
    assert bundlefiles.read_text(str(tmp_path / "ok")) == "hi\n"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("13852", 13852),  # runc writes the decimal pid without a newline
        ("13852\n", 13852),
        ("  42 \n", 42),
        ("", 0),
        ("\n", 0),
        ("abc", 0),
        ("12abc", 0),
        ("1.5", 0),
    ],
)
def test_read_pid(tmp_path: Path, content: str, expected: int) -> None:
    path = tmp_path / "init.pid"
    path.write_text(content)
    assert bundlefiles.read_pid(str(path)) == expected


def test_read_pid_missing_or_binary(tmp_path: Path) -> None:
    assert bundlefiles.read_pid(str(tmp_path / "missing.pid")) == 0
    (tmp_path / "b.pid").write_bytes(b"\xff\xff")
    assert bundlefiles.read_pid(str(tmp_path / "b.pid")) == 0


def test_exit_record_round_trip(tmp_path: Path) -> None:
    record = ExitRecord(pid=13852, status=137, exited_at_ns=1_795_311_827_075_962_349)
    bundlefiles.write_exit(str(tmp_path), record)
    assert (tmp_path / bundlefiles.EXIT_FILE).exists()
    assert bundlefiles.EXIT_FILE == "init.exit.json"
    assert bundlefiles.read_exit(str(tmp_path)) == record
    data = json.loads((tmp_path / "init.exit.json").read_text())
    assert data == {"pid": 13852, "status": 137, "exited_at_ns": 1_795_311_827_075_962_349}


def test_exit_record_overwrite(tmp_path: Path) -> None:
    bundlefiles.write_exit(str(tmp_path), ExitRecord(1, 2, 3))
    bundlefiles.write_exit(str(tmp_path), ExitRecord(4, 5, 6))
    assert bundlefiles.read_exit(str(tmp_path)) == ExitRecord(4, 5, 6)


def test_read_exit_missing(tmp_path: Path) -> None:
    assert bundlefiles.read_exit(str(tmp_path)) is None
    assert bundlefiles.read_exit(str(tmp_path / "no-such-bundle")) is None


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{",
        "not json",
        "null",
        "[]",
        "[1, 2, 3]",
        '"text"',
        "42",
        "{}",
        '{"pid": 1, "status": 0}',
        '{"pid": "x", "status": 0, "exited_at_ns": 1}',
        '{"pid": 1, "status": null, "exited_at_ns": 1}',
        '{"pid": [], "status": 0, "exited_at_ns": 1}',
    ],
)
def test_read_exit_corrupt(tmp_path: Path, content: str) -> None:
    (tmp_path / bundlefiles.EXIT_FILE).write_text(content)
    assert bundlefiles.read_exit(str(tmp_path)) is None


def test_read_exit_binary_garbage(tmp_path: Path) -> None:
    (tmp_path / bundlefiles.EXIT_FILE).write_bytes(b"\x00\xff\xfe")
    assert bundlefiles.read_exit(str(tmp_path)) is None


def test_runc_options_round_trip(tmp_path: Path, umask_022: None) -> None:
    options = ShimOptions(binary_name="/x/runc", root="/r", systemd_cgroup=True, io_uid=1000)
    bundlefiles.write_runc_options(str(tmp_path), options)
    path = tmp_path / bundlefiles.OPTIONS_FILE
    assert bundlefiles.OPTIONS_FILE == "options.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bundlefiles.read_runc_options(str(tmp_path)) == options
    # gogo-json-like names, defaults left out
    assert json.loads(path.read_text()) == {
        "binary_name": "/x/runc",
        "root": "/r",
        "systemd_cgroup": True,
        "io_uid": 1000,
    }


def test_read_runc_options_missing_gives_defaults(tmp_path: Path) -> None:
    assert bundlefiles.read_runc_options(str(tmp_path)) == ShimOptions()
    assert bundlefiles.read_runc_options(str(tmp_path / "gone")) == ShimOptions()


@pytest.mark.parametrize("content", ["", "{", "not json", "\x00"])
def test_read_runc_options_corrupt_gives_defaults(tmp_path: Path, content: str) -> None:
    (tmp_path / bundlefiles.OPTIONS_FILE).write_text(content)
    assert bundlefiles.read_runc_options(str(tmp_path)) == ShimOptions()


def test_read_runc_options_ignores_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / bundlefiles.OPTIONS_FILE).write_text('{"root": "/r", "task_api_address": "x"}')
    assert bundlefiles.read_runc_options(str(tmp_path)) == ShimOptions(root="/r")


@pytest.mark.parametrize("content", ["null", "[]", '"x"', "1"])
def test_read_runc_options_non_object_json_gives_defaults(tmp_path: Path, content: str) -> None:
    (tmp_path / bundlefiles.OPTIONS_FILE).write_text(content)
    assert bundlefiles.read_runc_options(str(tmp_path)) == ShimOptions()
