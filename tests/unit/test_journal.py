"""The on-disk event journal (shimv2/journal.py; issue 5 "nothing lost").

File level: order, replay without duplicates, cutting back and compaction,
torn or garbled tails, a full disk. Then ``shim delete`` taking the init's exit
from a journal, and the Task service keeping a journal per container bundle
and going on serving when the bundle's filesystem is full.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from test_service import Shim, run

from shimv2 import bundle as bundlefiles
from shimv2 import journal as journal_mod
from shimv2.api.containerd.events import task_pb2 as events
from shimv2.api.containerd.services.events.ttrpc.v1 import events_pb2
from shimv2.api.containerd.task.v2 import shim_pb2 as api
from shimv2.api.containerd.types.task import task_pb2 as tasktypes
from shimv2.bundle import ExitRecord
from shimv2.events import pack
from shimv2.journal import HEADER, Journal, Record, decode, journal_path, read, read_init_exit
from shimv2.options import ShimOptions

SHIM = Path(sys.executable).parent / "containerd-shim-pyshim-v2"


def payload(i: int) -> bytes:
    return f"event-{i}".encode() * (1 + i % 3)


def opened(path: Path, owner: str = "c1") -> Journal:
    journal, replay = Journal.open(str(path), owner)
    assert replay == []
    return journal


class FullDisk:
    """os.pwrite that fails with ENOSPC while ``full`` (optionally after a short write)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = False
        self.short_write_first = False
        self.calls = 0
        self._real: Callable[[int, Any, int], int] = os.pwrite
        monkeypatch.setattr(os, "pwrite", self)

    def __call__(self, fd: int, data: Any, offset: int) -> int:
        self.calls += 1
        if self.full:
            if self.short_write_first and len(data) > 4:
                self.short_write_first = False
                return self._real(fd, bytes(data[: len(data) // 2]), offset)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._real(fd, data, offset)


# -- file format and order ---------------------------------------------------------------


def test_records_keep_their_order_and_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "events.journal"
    journal = opened(path)
    seqs = [journal.append("/tasks/x", payload(i)) for i in range(50)]
    assert seqs == list(range(1, 51))
    delivered, records = read(str(path))
    assert delivered == 0
    assert records == [Record(i + 1, payload(i)) for i in range(50)]
    # A new daemon (the old one died) replays all of them, in order.
    again, replay = Journal.open(str(path), "c1")
    assert replay == records
    assert again.append("/tasks/x", b"new") == 51  # numbering goes on


def test_replay_skips_what_was_delivered(tmp_path: Path) -> None:
    path = tmp_path / "events.journal"
    journal = opened(path)
    for i in range(5):
        journal.append("/tasks/x", payload(i))
    journal.delivered(1)
    journal.delivered(3)  # deliveries come in order; marks are cumulative
    assert read(str(path))[0] == 3
    _, replay = Journal.open(str(path), "c1")
    assert replay == [Record(4, payload(3)), Record(5, payload(4))]


def test_no_duplicates_across_two_restarts(tmp_path: Path) -> None:
    path = str(tmp_path / "events.journal")
    first = opened(Path(path))
    for i in range(3):
        first.append("/tasks/x", payload(i))
    second, replay = Journal.open(path, "c1")  # first daemon died
    assert [r.seq for r in replay] == [1, 2, 3]
    for r in replay:
        second.delivered(r.seq)  # the second daemon delivered them ...
    _, replay = Journal.open(path, "c1")  # ... and died too
    assert replay == []


def test_fully_delivered_journal_is_cut_back_to_its_header(tmp_path: Path) -> None:
    path = tmp_path / "events.journal"
    journal = opened(path)
    assert path.stat().st_size == HEADER.size  # exists from the start
    for i in range(3):
        journal.append("/tasks/x", payload(i))
    assert path.stat().st_size > HEADER.size
    journal.delivered(3)
    assert path.stat().st_size == HEADER.size
    assert read(str(path)) == (3, [])
    assert journal.append("/tasks/x", b"later") == 4
    assert read(str(path)) == (3, [Record(4, b"later")])


def test_compaction_keeps_only_pending_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_mod, "COMPACT_BYTES", 200)
    path = tmp_path / "events.journal"
    journal = opened(path)
    for _ in range(40):
        journal.append("/tasks/x", b"x" * 50)
    inode = path.stat().st_ino
    for seq in range(1, 31):
        journal.delivered(seq)
    size = path.stat().st_size
    assert size < HEADER.size + 10 * 70 + 100  # the delivered ones are gone
    delivered, records = read(str(path))
    assert [r.seq for r in records if r.seq > delivered] == list(range(31, 41))
    assert path.stat().st_ino != inode  # a new file renamed over the old one
    assert sorted(os.listdir(tmp_path)) == ["events.journal"]
    journal.append("/tasks/x", b"after")  # the new file is the one written to
    assert read(str(path))[1][-1] == Record(41, b"after")


# -- torn and garbled writes ------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 5, 16, 20])
def test_a_torn_last_record_is_ignored_and_cut_away(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "events.journal"
    journal = opened(path)
    for i in range(3):
        journal.append("/tasks/x", payload(i))
    good = path.stat().st_size
    journal.append("/tasks/x", b"y" * 40)
    os.truncate(path, good + cut)  # the daemon died in mid-write
    _, replay = Journal.open(str(path), "c1")
    assert [r.seq for r in replay] == [1, 2, 3]
    assert path.stat().st_size == good  # the torn tail is gone ...
    again, _ = Journal.open(str(path), "c1")
    assert again.append("/tasks/x", b"z") == 4  # ... so new records are readable
    assert [r.seq for r in read(str(path))[1]] == [1, 2, 3, 4]


def test_a_garbled_record_ends_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "events.journal"
    journal = opened(path)
    for i in range(4):
        journal.append("/tasks/x", payload(i))
    data = bytearray(path.read_bytes())
    _, records, _ = decode(bytes(data))
    third = HEADER.size + sum(16 + len(r.payload) for r in records[:2])
    data[third + 20] ^= 0xFF  # a flipped byte in the third record's payload
    path.write_bytes(bytes(data))
    assert [r.seq for r in read(str(path))[1]] == [1, 2]


@pytest.mark.parametrize("content", [b"", b"garbage", b"NOTMAGIC" + bytes(40)])
def test_unreadable_files_count_as_empty(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "events.journal"
    path.write_bytes(content)
    journal, replay = Journal.open(str(path), "c1")
    assert replay == []
    journal.append("/tasks/x", b"one")
    assert read(str(path)) == (0, [Record(1, b"one")])


# -- a full disk --------------------------------------------------------------------------


def test_full_disk_keeps_events_in_memory_and_logs_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    disk = FullDisk(monkeypatch)
    path = tmp_path / "events.journal"
    journal = opened(path)
    journal.append("/tasks/start", b"one")
    disk.full = True
    with caplog.at_level(logging.INFO, logger="shimv2.journal"):
        journal.append("/tasks/exit", b"two")  # never raises
        journal.append("/tasks/delete", b"three")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        f"could not persist event /tasks/exit for c1 in {path}: No space left on device;"
        " kept in memory"
    ]
    assert journal.failed and journal.pending == 3
    assert [r.seq for r in read(str(path))[1]] == [1]  # on disk: what fitted
    caplog.clear()
    disk.full = False
    with caplog.at_level(logging.INFO, logger="shimv2.journal"):
        journal.append("/tasks/x", b"four")  # room again: everything pending is rewritten
    assert not journal.failed
    assert read(str(path)) == (
        0,
        [Record(1, b"one"), Record(2, b"two"), Record(3, b"three"), Record(4, b"four")],
    )
    assert "persisted in" in caplog.text and "(2 were kept in memory only)" in caplog.text


def test_full_disk_after_a_short_write_leaves_no_torn_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = FullDisk(monkeypatch)
    path = tmp_path / "events.journal"
    journal = opened(path)
    journal.append("/tasks/x", b"a" * 30)
    size = path.stat().st_size
    disk.full = disk.short_write_first = True
    journal.append("/tasks/x", b"b" * 30)
    assert path.stat().st_size == size
    assert [r.seq for r in read(str(path))[1]] == [1]


def test_delivery_during_a_full_disk_heals_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = FullDisk(monkeypatch)
    path = tmp_path / "events.journal"
    journal = opened(path)
    disk.full = True
    journal.append("/tasks/exit", b"lost on disk")
    disk.full = False
    journal.delivered(1)  # delivered from memory: nothing pending, file consistent
    assert not journal.failed
    assert read(str(path)) == (1, [])


def test_journal_in_a_missing_bundle_does_not_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gone" / "events.journal"
    journal, replay = Journal.open(str(path), "c1")
    assert replay == [] and journal.failed
    assert journal.append("/tasks/exit", b"x") == 1
    journal.delivered(1)
    journal.close()
    assert "could not persist the event journal for c1" in caplog.text


# -- removal ------------------------------------------------------------------------------


def test_released_journal_goes_after_the_last_delivery(tmp_path: Path) -> None:
    path = tmp_path / "events.journal"
    journal = opened(path)
    journal.append("/tasks/exit", b"exit")
    journal.append("/tasks/delete", b"delete")
    journal.released = True
    journal.delivered(1)
    assert path.exists()
    journal.delivered(2)
    assert not path.exists()


def test_remove_spares_a_new_file_at_the_same_path(tmp_path: Path) -> None:
    path = tmp_path / "events.journal"
    journal = opened(path)
    path.unlink()  # containerd removed the bundle; a new container got the same one
    path.write_bytes(b"someone else's")
    journal.remove()
    assert path.read_bytes() == b"someone else's"


def test_close_keeps_undelivered_events_only(tmp_path: Path) -> None:
    kept, gone = tmp_path / "kept", tmp_path / "gone"
    kept.mkdir()
    gone.mkdir()
    undelivered = opened(kept / "events.journal")
    undelivered.append("/tasks/exit", b"x")
    delivered = opened(gone / "events.journal")
    delivered.append("/tasks/exit", b"x")
    delivered.delivered(1)
    undelivered.close()
    delivered.close()
    assert read(str(kept / "events.journal"))[1] == [Record(1, b"x")]
    assert os.listdir(gone) == []


# -- shim delete after a dead shim ----------------------------------------------------------


def envelope(topic: str, event: Any) -> bytes:
    env = events_pb2.Envelope(namespace="ns", topic=topic, event=pack(event))
    env.timestamp.FromNanoseconds(1_700_000_000_000_000_000)
    return env.SerializeToString()


def task_exit(cid: str, process_id: str, pid: int, status: int, at_ns: int) -> events.TaskExit:
    ev = events.TaskExit(container_id=cid, id=process_id, pid=pid, exit_status=status)
    ev.exited_at.FromNanoseconds(at_ns)
    return ev


def test_read_init_exit_finds_the_init_exit_only(tmp_path: Path) -> None:
    journal = opened(Path(journal_path(str(tmp_path))))
    at = 1_795_311_827_075_962_349
    journal.append("/tasks/start", envelope("/tasks/start", events.TaskStart(container_id="c1")))
    journal.append("/tasks/exit", envelope("/tasks/exit", task_exit("c1", "c1", 42, 3, at)))
    journal.append("/tasks/exit", envelope("/tasks/exit", task_exit("c1", "e1", 9, 5, at + 1)))
    journal.append("/tasks/exit", envelope("/tasks/exit", task_exit("c2", "c2", 43, 4, at)))
    journal.delivered(2)  # delivered or not: a record still there is the truth
    assert read_init_exit(str(tmp_path), "c1") == ExitRecord(42, 3, at)
    assert read_init_exit(str(tmp_path), "c2") == ExitRecord(43, 4, at)
    assert read_init_exit(str(tmp_path), "e1") is None  # an exec's exit is no init exit
    assert read_init_exit(str(tmp_path / "missing"), "c1") is None
    journal.delivered(4)  # all delivered: cut back, nothing left to read
    assert read_init_exit(str(tmp_path), "c1") is None


def test_shim_delete_takes_the_exit_from_the_journal(tmp_path: Path) -> None:
    """init.exit.json could not be written (full disk) but the journal has the exit."""
    bundle = tmp_path / "t1"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text("{}")
    # A runc root without state for t1: delete does not need to run runc.
    bundlefiles.write_runc_options(str(bundle), ShimOptions(root=str(tmp_path / "runc-root")))
    (bundle / "init.pid").write_text("4321")
    at = 1_795_311_827_075_962_349
    journal = opened(Path(journal_path(str(bundle))), "t1")
    journal.append("/tasks/exit", envelope("/tasks/exit", task_exit("t1", "t1", 4321, 7, at)))
    result = subprocess.run(
        [str(SHIM), "-namespace", "unitns", "-address", "/run/containerd/containerd.sock",
         "-id", "t1", "-bundle", str(bundle), "delete"],
        cwd=bundle, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    response = api.DeleteResponse.FromString(result.stdout)
    assert (response.pid, response.exit_status) == (4321, 7)
    assert response.exited_at.ToNanoseconds() == at


# -- the Task service -------------------------------------------------------------------------


async def _journal_per_container(shim: Shim) -> None:
    bundles = {}
    for cid in ("c1", "c2"):
        req = shim.create_request(cid, ["sleep", "60"])
        bundles[cid] = Path(req.bundle)
        await shim.call("Create", req)
        await shim.call("Start", api.StartRequest(id=cid))
    await shim.events.wait_count("/tasks/start", 2)
    with trio.fail_after(10):
        assert await shim.service._publisher.flush(10)
    for bundle in bundles.values():
        path = bundle / "events.journal"
        assert path.exists()
        assert read(str(path)) == (2, [])  # create + start delivered; cut back
    await shim.kill_and_delete("c1")
    await shim.events.wait_count("/tasks/delete")
    assert await shim.service._publisher.flush(10)
    assert not (bundles["c1"] / "events.journal").exists()  # deleted: journal gone
    assert (bundles["c2"] / "events.journal").exists()  # the other one is untouched
    await shim.kill_and_delete("c2")
    await shim.events.wait_count("/tasks/delete", 2)
    assert await shim.service._publisher.flush(10)
    assert not (bundles["c2"] / "events.journal").exists()


def test_service_keeps_one_journal_per_container_bundle(tmp_path: Path) -> None:
    run(tmp_path, _journal_per_container)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def _full_bundle_filesystem(shim: Shim) -> list[str]:
    lines = _Lines()
    logging.getLogger("shimv2").addHandler(lines)
    req = shim.create_request("c1", ["sleep", "60"])
    pid = (await shim.call("Create", req)).pid
    await shim.call("Start", api.StartRequest(id="c1"))
    await shim.events.wait_count("/tasks/start")
    assert await shim.service._publisher.flush(10)

    def no_space(*args: Any, **kw: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # The bundle's filesystem is full from now on (this runs in a forked child).
    os.pwrite = no_space  # type: ignore[assignment]
    bundlefiles.write_exit = no_space  # type: ignore[assignment]
    assert (await shim.state("c1")).status == tasktypes.RUNNING
    await shim.call("Kill", api.KillRequest(id="c1", signal=signal.SIGKILL))
    waited = await shim.call("Wait", api.WaitRequest(id="c1"))
    assert waited.exit_status == 137
    state = await shim.state("c1")
    assert (state.status, state.exit_status) == (tasktypes.STOPPED, 137)
    deleted = await shim.call("Delete", api.DeleteRequest(id="c1"))
    assert (deleted.pid, deleted.exit_status) == (pid, 137)
    await shim.events.wait_count("/tasks/delete")
    assert shim.events.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    return lines.lines


def test_service_keeps_serving_on_a_full_bundle_filesystem(tmp_path: Path) -> None:
    lines = run(tmp_path, _full_bundle_filesystem)
    bundle = tmp_path / "bundles" / "c1"
    assert (
        "could not persist the exit of c1 in init.exit.json: No space left on device;"
        " kept in memory" in lines
    ), lines
    assert (
        f"could not persist event /tasks/exit for c1 in {bundle}/events.journal:"
        " No space left on device; kept in memory" in lines
    ), lines
