"""shimv2.ksm (which mappings a daemon marks MADV_MERGEABLE, and when) and the
daemon's IdleMarker (marks once serving went quiet, never wakes an idle daemon)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from shimv2 import daemon, ksm
from shimv2.ttrpc import Method

MAPS = """\
55d0c0a00000-55d0c0a2e000 r--p 00000000 fe:00 1234  /usr/bin/python3.11
55d0c0a2e000-55d0c0b1c000 r-xp 0002e000 fe:00 1234  /usr/bin/python3.11
55d0c0d00000-55d0c0d3f000 rw-p 00300000 fe:00 1234  /usr/bin/python3.11
55d0c1000000-55d0c1512000 rw-p 00000000 00:00 0  [heap]
7f2b55300000-7f2b55400000 rw-p 00000000 00:00 0
7f2b55400000-7f2b55401000 ---p 00000000 00:00 0
7f2b55500000-7f2b55600000 rw-s 00000000 00:01 99  /dev/zero (deleted)
7f2b55600000-7f2b55700000 rw-s 00000000 00:01 98  /memfd:journal (deleted)
7f2b55700000-7f2b55701000 rw-p 00000000 00:05 12  /dev/shm/x
7f2b56e44000-7f2b56f78000 rw-p 00443000 fe:00 26933  /opt/py/lib/libpython3.11.so.1.0
7f2b57000000-7f2b57001000 rw-p 00000000 fe:00 777  /tmp/name with spaces (deleted)
7ffe45200000-7ffe45311000 rw-p 00000000 00:00 0  [stack]
7ffe453f0000-7ffe453f4000 r--p 00000000 00:00 0  [vvar]
7ffe453f4000-7ffe453f6000 r-xp 00000000 00:00 0  [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]
garbage line
"""


@pytest.mark.parametrize(
    ("value", "on"),
    [("1", True), ("on", True), ("TRUE", True), (" yes ", True), ("0", False), ("", False),
     ("off", False), ("2", False)],
)  # fmt: skip
def test_enabled_only_when_the_operator_opts_in(value: str, on: bool) -> None:
    assert ksm.enabled({ksm.ENV: value}) is on
    assert ksm.enabled({}) is False


def test_node_runs_ksm_reads_run(tmp_path: Path) -> None:
    assert ksm.node_runs_ksm(str(tmp_path)) is False  # no such file: a kernel without KSM
    (tmp_path / "run").write_text("0\n")
    assert ksm.node_runs_ksm(str(tmp_path)) is False
    (tmp_path / "run").write_text("1\n")
    assert ksm.node_runs_ksm(str(tmp_path)) is True


def test_parse_maps() -> None:
    regions = ksm.parse_maps(MAPS)
    assert len(regions) == 15  # the garbage line is skipped
    assert regions[3] == (0x55D0C1000000, 0x55D0C1512000, "rw-p", "[heap]")
    assert regions[4] == (0x7F2B55300000, 0x7F2B55400000, "rw-p", "")  # anonymous
    assert regions[10][3] == "/tmp/name with spaces (deleted)"


def test_mergeable_takes_private_writable_mappings_only() -> None:
    ranges = ksm.mergeable(ksm.parse_maps(MAPS))
    assert ranges == [
        (0x55D0C0D00000, 0x55D0C0D3F000),  # the executable's data (its copied pages)
        (0x55D0C1000000, 0x55D0C1512000),  # [heap]
        (0x7F2B55300000, 0x7F2B55400000),  # anonymous: pymalloc arenas, mmaps
        (0x7F2B56E44000, 0x7F2B56F78000),  # libpython's data
        (0x7F2B57000000, 0x7F2B57001000),
    ]
    # not: read-only or guard pages, shared mappings (memfd, /dev/zero), files under
    # /dev, the stack, the kernel's special mappings


class FakeLibc:
    def __init__(self, errno_for: dict[int, int] | None = None) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.errno_for = errno_for or {}

    def madvise(self, start: int, length: int, advice: int) -> int:
        self.calls.append((start, length, advice))
        err = self.errno_for.get(start)
        if err:
            import ctypes

            ctypes.set_errno(err)
            return -1
        return 0


@pytest.fixture
def fake_libc(monkeypatch: pytest.MonkeyPatch) -> FakeLibc:
    fake = FakeLibc()
    monkeypatch.setattr(ksm, "libc", fake)
    return fake


def test_marker_marks_each_range_once(tmp_path: Path, fake_libc: FakeLibc) -> None:
    maps = tmp_path / "maps"
    maps.write_text(MAPS)
    marker = ksm.Marker(str(maps))
    done = marker.mark()
    assert [(s, n) for s, n, _ in fake_libc.calls] == [
        (s, e - s) for s, e in ksm.mergeable(ksm.parse_maps(MAPS))
    ]
    assert {a for _, _, a in fake_libc.calls} == {ksm.MADV_MERGEABLE}
    assert done == sum(n for _, n, _ in fake_libc.calls)
    fake_libc.calls.clear()
    assert marker.mark() == 0  # nothing new: one read of the maps, no madvise
    assert fake_libc.calls == []
    # the heap grew and a new arena appeared: only those are marked
    grown = MAPS.replace("55d0c1000000-55d0c1512000", "55d0c1000000-55d0c1600000")
    grown += "7f2b58000000-7f2b58100000 rw-p 00000000 00:00 0 \n"
    maps.write_text(grown)
    assert marker.mark() == 0x600000 + 0x100000
    assert [(s, n) for s, n, _ in fake_libc.calls] == [
        (0x55D0C1000000, 0x600000),
        (0x7F2B58000000, 0x100000),
    ]


def test_marker_retries_a_failed_range_and_gives_up_without_ksm(
    tmp_path: Path, fake_libc: FakeLibc
) -> None:
    maps = tmp_path / "maps"
    maps.write_text(MAPS)
    fake_libc.errno_for = {0x7F2B55300000: 12}  # ENOMEM: unmapped meanwhile
    marker = ksm.Marker(str(maps))
    marker.mark()
    assert marker.failed is None
    fake_libc.calls.clear()
    fake_libc.errno_for = {}
    marker.mark()
    assert [s for s, _, _ in fake_libc.calls] == [0x7F2B55300000]  # tried again
    # a kernel without CONFIG_KSM answers EINVAL: stop trying
    fresh = ksm.Marker(str(maps))
    fake_libc.errno_for = {0x55D0C0D00000: 22}
    fake_libc.calls.clear()
    assert fresh.mark() == 0
    assert isinstance(fresh.failed, OSError)
    assert len(fake_libc.calls) == 1
    assert fresh.mark() == 0
    assert len(fake_libc.calls) == 1


def test_marker_without_maps_fails_quietly(tmp_path: Path, fake_libc: FakeLibc) -> None:
    marker = ksm.Marker(str(tmp_path / "missing"))
    assert marker.mark() == 0
    assert marker.failed is not None
    assert fake_libc.calls == []


@pytest.mark.skipif(not Path("/sys/kernel/mm/ksm").exists(), reason="kernel without KSM")
def test_a_real_process_gets_its_mappings_marked() -> None:
    """In a child (not this test process): its heap and an anonymous mmap show
    ``mg`` (VM_MERGEABLE) in /proc/self/smaps, its stack does not."""
    code = textwrap.dedent(
        """
        import mmap, re
        from shimv2 import ksm
        area = mmap.mmap(-1, 1 << 20)
        area.write(b"x" * (1 << 20))
        marker = ksm.Marker()
        assert marker.mark() > 0, marker.failed
        flags = {}
        for block in re.split(r"\\n(?=[0-9a-f]+-[0-9a-f]+ )", open("/proc/self/smaps").read()):
            head = block.split("\\n", 1)[0].split()
            name = head[5] if len(head) > 5 else "anon"
            vm = block.split("VmFlags:")[1].split()
            flags.setdefault(name, set()).add("mg" in vm)
        assert flags["[heap]"] == {True}, flags["[heap]"]
        assert True in flags["anon"]
        assert flags["[stack]"] == {False}
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


class FakeMarker:
    def __init__(self) -> None:
        self.times: list[float] = []
        self.failed: OSError | None = None

    def mark(self) -> int:
        self.times.append(trio.current_time())
        return 4096


async def test_idle_marker_marks_after_serving_and_after_each_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeMarker()
    idle = daemon.IdleMarker(fake)  # type: ignore[arg-type]

    async def handler(request: Any, ctx: Any) -> str:
        return f"answer {request}"

    methods = idle.watch({"State": Method(object, handler)})  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        nursery.start_soon(idle.run)
        await trio.sleep(0.5)
        assert await methods["State"].handler(1, None) == "answer 1"
        await trio.sleep(1.0)
        await methods["State"].handler(2, None)  # requests keep it busy: no mark yet
        await trio.sleep(daemon.IDLE_AFTER + 0.1)
        assert fake.times == [pytest.approx(t0 + 1.5 + daemon.IDLE_AFTER)]
        await trio.sleep(3600)  # idle: never woken again
        assert len(fake.times) == 1
        await methods["State"].handler(3, None)
        await trio.sleep(daemon.IDLE_AFTER + 0.1)
        assert len(fake.times) == 2
        nursery.cancel_scope.cancel()


async def test_idle_marker_keeps_plain_handlers_plain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A plain handler (answered from the read loop) stays plain once watched."""
    fake = FakeMarker()
    idle = daemon.IdleMarker(fake)  # type: ignore[arg-type]

    def handler(request: Any, ctx: Any) -> str:
        return f"now {request}"

    [method] = idle.watch({"State": Method(object, handler)}).values()  # type: ignore[arg-type]
    assert not method.is_async
    await trio.sleep(10)
    assert method.handler(1, None) == "now 1"
    assert idle._last == trio.current_time()  # noted as activity


async def test_idle_marker_stops_where_there_is_no_ksm(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeMarker()
    fake.failed = OSError(22, "no KSM")
    idle = daemon.IdleMarker(fake)  # type: ignore[arg-type]
    with trio.move_on_after(60) as scope:
        await idle.run()  # returns: nothing left to do
    assert not scope.cancelled_caught
    assert len(fake.times) == 1
