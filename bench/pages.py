#!/usr/bin/env python3
"""What an idle pyshim daemon's private pages are, page by page.

A daemon is a fork of the fork server. Its USS is the pages only it maps
(``/proc/kpagecount`` = 1). For each of them this reads the daemon's copy, the
server's page at the same address and a sibling daemon's (``/proc/PID/mem``)
and counts, per kind of mapping (malloc's [heap], anonymous mappings, i.e.
pymalloc's arenas and malloc's mmaps, CPython's data and bss: libpython's, or
the executable's where python is linked statically; other libraries' data):

- ``same as server``: written and then restored (a reference count that came
  back), byte-identical to the server's page again;
- ``same as sibling``: differs from the server but equals the sibling's page
  (the same objects in the same state: what KSM would merge among daemons);
- ``unique``: differs from both.

Pages that differ from the server are then explained word by word: an 8-byte
word that moved by a small amount, followed by a pointer to a type object, is
an object's reference count (named by its type's ``tp_name``); other words
are attributed to the object whose header precedes them (bytecode
specialization, dict and list contents, new objects). In CPython's data the
words are named by the symbol that holds them (``nm``, where not stripped).

    .venv/bin/python bench/pages.py --start 5         # a private containerd, 5 idle shims
    .venv/bin/python bench/pages.py --pid PID         # a running daemon (root)

Root only (``/proc/kpagecount`` and other processes' memory). A measuring
tool: it changes nothing in the processes it reads.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
PFN_MASK = (1 << 55) - 1
PRESENT = 1 << 63
INTERPRETER = "CPython data and bss"  # libpython, or the python executable when static
SMALL_DELTA = 1 << 16  # reference counts move by less than this
TP_FLAGS = 168  # offsetof(PyTypeObject, tp_flags) on 64-bit CPython 3.11-3.13
READY = 1 << 12  # Py_TPFLAGS_READY
TYPE_SUBCLASS = 1 << 31  # Py_TPFLAGS_TYPE_SUBCLASS


class Proc:
    """Another process's maps, page table and memory (read only)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.maps = parse_maps(Path(f"/proc/{pid}/maps").read_text())
        self.mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        self.pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        # where CPython's data lives: libpython, or the executable when linked statically
        exe = os.readlink(f"/proc/{pid}/exe")
        self.interpreter = next((m[4] for m in self.maps if "libpython" in m[4]), exe)

    def close(self) -> None:
        os.close(self.mem)
        os.close(self.pagemap)

    def pfns(self, start: int, end: int) -> list[int]:
        """PFN of each page in [start, end); -1 where not present."""
        n = (end - start) // PAGE
        data = os.pread(self.pagemap, 8 * n, start // PAGE * 8)
        out = []
        for (entry,) in struct.iter_unpack("<Q", data):
            out.append(entry & PFN_MASK if entry & PRESENT else -1)
        return out

    def read(self, addr: int, size: int) -> bytes | None:
        if not 0 < addr < 1 << 47:
            return None
        try:
            return os.pread(self.mem, size, addr)
        except OSError:
            return None

    def word(self, addr: int) -> int | None:
        data = self.read(addr, 8)
        return struct.unpack("<Q", data)[0] if data and len(data) == 8 else None

    def mapping(self, addr: int) -> tuple[int, int, str, int, str] | None:
        for m in self.maps:
            if m[0] <= addr < m[1]:
                return m
        return None


def parse_maps(text: str) -> list[tuple[int, int, str, int, str]]:
    """(start, end, perms, offset, path) per line of /proc/PID/maps."""
    out = []
    for line in text.splitlines():
        f = line.split(None, 5)
        if len(f) < 5:
            continue
        a, b = f[0].split("-")
        out.append((int(a, 16), int(b, 16), f[1], int(f[2], 16), f[5] if len(f) > 5 else ""))
    return out


def kpagecount(pfns: list[int]) -> dict[int, int]:
    counts = {}
    with open("/proc/kpagecount", "rb") as f:
        for pfn in set(pfns):
            if pfn > 0:
                f.seek(pfn * 8)
                counts[pfn] = struct.unpack("<Q", f.read(8))[0]
    return counts


def kind(proc: Proc, m: tuple[int, int, str, int, str]) -> str:
    start, _, _, _, path = m
    if path == "[heap]":
        return "malloc heap"
    if path.startswith("["):
        return path
    if path == proc.interpreter:
        return INTERPRETER
    if path:
        return "other libraries' data"
    # anonymous: right after libpython's data it is libpython's bss
    prev = [x for x in proc.maps if x[1] == start]
    if prev and prev[0][4] == proc.interpreter and "w" in prev[0][2]:
        return INTERPRETER
    return "anonymous (arenas, mmaps)"


class Symbols:
    """libpython's data symbols (nm), to name the words it wrote there."""

    def __init__(self, proc: Proc) -> None:
        self.entries: list[tuple[int, int, str]] = []
        lib = next((m for m in proc.maps if m[4] == proc.interpreter), None)
        if lib is None or not shutil.which("nm"):
            return
        base = min(m[0] - m[3] for m in proc.maps if m[4] == lib[4])
        out = subprocess.run(
            ["nm", "-S", "--defined-only", lib[4]], capture_output=True, text=True
        ).stdout
        for line in out.splitlines():
            f = line.split()
            if len(f) == 4 and f[2] in "dDbB":
                self.entries.append((base + int(f[0], 16), int(f[1], 16), f[3]))
        self.entries.sort()
        self.type_type = next((a for a, _, n in self.entries if n == "PyType_Type"), 0)

    def name(self, addr: int) -> str:
        import bisect

        i = bisect.bisect_right(self.entries, (addr, 1 << 62, "")) - 1
        if i >= 0:
            a, size, name = self.entries[i]
            if a <= addr < a + max(size, 8):
                return name
        return "?"


class Objects:
    """Names the object an address belongs to, from its header (refcount, type)."""

    def __init__(self, proc: Proc, symbols: Symbols) -> None:
        self.proc = proc
        self.type_type = getattr(symbols, "type_type", 0)
        self.names: dict[int, str | None] = {}

    def type_name(self, tp: int) -> str | None:
        """tp_name if ``tp`` is a type object (its type is type, or a metatype of type)."""
        if tp in self.names:
            return self.names[tp]
        name = None
        meta = self.proc.word(tp + 8) if tp > 4096 else None
        flags = self.proc.word(tp + TP_FLAGS) or 0
        if meta and flags & READY and self._is_metatype(meta):
            ptr = self.proc.word(tp + 24)
            raw = self.proc.read(ptr, 64) if ptr else None
            if raw:
                name = raw.split(b"\0", 1)[0].decode(errors="replace") or None
        self.names[tp] = name
        return name

    def _is_metatype(self, meta: int) -> bool:
        """``type`` itself, or a subclass of it (ABCMeta, EnumMeta, MessageMeta)."""
        if meta == self.type_type:
            return True
        flags = self.proc.word(meta + TP_FLAGS) or 0
        return bool(flags & TYPE_SUBCLASS and flags & READY)

    def header_at(self, addr: int, data: bytes, offset: int) -> str | None:
        """The type name if ``data[offset:]`` starts a plausible object header."""
        if offset + 16 > len(data):
            return None
        refcnt, tp = struct.unpack_from("<QQ", data, offset)
        if not 0 < refcnt < 1 << 40 or not 4096 < tp < 1 << 47 or tp & 7:
            return None
        return self.type_name(tp)

    def headers(self, page: bytes, page_addr: int) -> list[tuple[int, str]]:
        """(address, type name) of the plausible object headers in this page and
        the one before it, in address order."""
        prev = self.proc.read(page_addr - PAGE, PAGE) or b""
        data = prev + page
        base = page_addr - len(prev)
        found = []
        for o in range(0, len(data) - 8, 8):
            name = self.header_at(base + o, data, o)
            if name:
                found.append((base + o, name))
        return found

    @staticmethod
    def enclosing(addr: int, headers: list[tuple[int, str]]) -> str:
        """The type of the closest header at or before ``addr``, else "?"."""
        import bisect

        i = bisect.bisect_right(headers, (addr, "\uffff")) - 1
        return headers[i][1] if i >= 0 else "?"


def analyse(daemon: int, server: int, sibling: int | None) -> dict[str, object]:
    d, s = Proc(daemon), Proc(server)
    b = Proc(sibling) if sibling else None
    symbols = Symbols(d)
    objects = Objects(d, symbols)
    totals: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    # per mapping kind: cause -> KiB of pages that differ from the server's
    causes_by_kind: dict[str, dict[str, float]] = collections.defaultdict(
        lambda: collections.defaultdict(float)
    )
    try:
        for m in d.maps:
            start, end, perms, _, path = m
            if "w" not in perms or path in ("[vvar]", "[vvar_vclock]", "[vdso]"):
                continue
            pfns = d.pfns(start, end)
            counts = kpagecount(pfns)
            k = kind(d, m)
            for i, pfn in enumerate(pfns):
                if pfn < 0 or counts.get(pfn, 0) != 1:
                    continue
                addr = start + i * PAGE
                mine = d.read(addr, PAGE)
                if mine is None:
                    continue
                theirs = s.read(addr, PAGE) if s.mapping(addr) else None
                sib = b.read(addr, PAGE) if b and b.mapping(addr) else None
                totals[k]["private"] += PAGE
                if theirs == mine:
                    totals[k]["same as server"] += PAGE
                    continue
                if sib == mine:
                    totals[k]["same as sibling"] += PAGE
                else:
                    totals[k]["unique"] += PAGE
                if theirs is None:
                    totals[k]["not in server"] += PAGE
                    causes_by_kind[k]["(not mapped in the server)"] += PAGE
                    continue
                causes = explain(mine, theirs, addr, k, symbols, objects)
                n = sum(causes.values())
                for cause, c in causes.items():
                    causes_by_kind[k][cause] += PAGE * c / n
    finally:
        for p in (d, s, b):
            if p:
                p.close()
    return {
        "totals": {k: dict(v) for k, v in totals.items()},
        "causes": {k: dict(v) for k, v in causes_by_kind.items()},
    }


def explain(
    mine: bytes, theirs: bytes, addr: int, k: str, symbols: Symbols, objects: Objects
) -> collections.Counter[str]:
    """Count the differing 8-byte words of a page by cause."""
    causes: collections.Counter[str] = collections.Counter()
    headers: list[tuple[int, str]] | None = None
    for off in range(0, PAGE, 8):
        a = struct.unpack_from("<Q", mine, off)[0]
        z = struct.unpack_from("<Q", theirs, off)[0]
        if a == z:
            continue
        if k == INTERPRETER:
            causes[symbol_group(symbols.name(addr + off))] += 1
            continue
        if 0 < abs(a - z) < SMALL_DELTA and off + 16 <= PAGE:
            name = objects.header_at(addr + off, mine, off)
            if name:
                causes[f"refcount of {name}"] += 1
                continue
        if headers is None:
            headers = objects.headers(mine, addr)
        causes[f"inside {objects.enclosing(addr + off, headers)}"] += 1
    return causes


def symbol_group(name: str) -> str:
    """libpython's data symbols in a few groups."""
    if name == "_PyRuntime":
        return "_PyRuntime (interpreter state, small ints, static strings)"
    if name in ("_Py_NoneStruct", "_Py_TrueStruct", "_Py_FalseStruct", "_Py_EllipsisObject",
                "_Py_NotImplementedStruct"):  # fmt: skip
        return "None, True, False, ... (refcounts)"
    if name.startswith("const_") or "_toplevel" in name:
        return "deep-frozen stdlib modules' code and constants (refcounts, bytecode)"
    if name.startswith("_parser") or name.startswith("_kwtuple"):
        return "Argument Clinic parsers (initialized at first call)"
    if name.endswith("_Type") or name.endswith("Type") or "_type" in name.lower():
        return "static type objects"
    if name in ("usedpools", "arenas", "unused_arena_objects", "usable_arenas") or name.startswith(
        "arena_map"
    ):
        return "pymalloc state"
    return "other: " + name


def report(res: dict[str, object], top: int = 40) -> str:
    kib = 1024
    lines = []
    totals: dict[str, dict[str, int]] = res["totals"]  # type: ignore[assignment]
    cols = ["private", "same as server", "same as sibling", "unique", "not in server"]
    lines.append(f"{'mapping':<28}" + "".join(f"{c:>17}" for c in cols) + "   (KiB)")
    grand: collections.Counter[str] = collections.Counter()
    for k, sizes in sorted(totals.items(), key=lambda kv: -kv[1].get("private", 0)):
        grand.update(sizes)
        lines.append(f"{k:<28}" + "".join(f"{sizes.get(c, 0) / kib:>17.0f}" for c in cols))
    lines.append(f"{'total':<28}" + "".join(f"{grand.get(c, 0) / kib:>17.0f}" for c in cols))
    causes: dict[str, dict[str, float]] = res["causes"]  # type: ignore[assignment]
    for k, why in sorted(causes.items(), key=lambda kv: -sum(kv[1].values())):
        lines.append("")
        lines.append(
            f"{k}: pages that differ from the server's, by what changed in them "
            f"(KiB; a page is split among its changed words), total {sum(why.values()) / kib:.0f}"
        )
        for name, v in sorted(why.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {v / kib:8.1f}  {name}")
    return "\n".join(lines)


def start_and_analyse(n: int, settle: float) -> int:
    repo = Path(__file__).resolve().parent.parent
    sys.path[:0] = [str(repo / "tests" / "e2e"), str(repo)]
    import harness

    work = Path(tempfile.mkdtemp(prefix="pyshim-pages-"))
    try:
        rootfs = harness.busybox_rootfs(work / "rootfs")
        with harness.private_containerd(log_level="info") as c:
            ids = []
            for _ in range(n):
                cid = c.new_id("pages")
                ids.append(cid)
                c.ctr("run", "--runtime", harness.RUNTIMES["pyshim"], "-d", "--rootfs",
                      str(rootfs), cid, "/bin/sleep", "1000000", check=True)  # fmt: skip
            time.sleep(settle)
            pids = [c.shim_processes(cid)[0].pid for cid in ids]
            served = [p for p in pids if _ppid(p) != 1]  # the first start ran without a server
            if len(served) < 2:
                print("need two daemons forked by the fork server", file=sys.stderr)
                return 1
            daemon, sibling = served[-1], served[-2]
            print(f"daemon {daemon}, fork server {_ppid(daemon)}, sibling {sibling}")
            print(report(analyse(daemon, _ppid(daemon), sibling)))
            for cid in ids:
                c.ctr("task", "kill", "-s", "SIGKILL", cid)
            for cid in ids:
                with contextlib.suppress(harness.HarnessError):
                    harness.wait_until(lambda cid=cid: c.task_status(cid) == "STOPPED", 10)
                c.ctr("task", "rm", "-f", cid)
                c.ctr("container", "rm", cid)
    finally:
        harness.unmount_all_under(work)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _ppid(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text.rsplit(")", 1)[1].split()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pid", type=int, help="a running daemon (a child of its fork server)")
    ap.add_argument("--sibling", type=int, help="another daemon of the same server")
    ap.add_argument("--start", type=int, default=0, help="start N idle containers and analyse one")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds idle before reading")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("root only: /proc/kpagecount and other processes' memory", file=sys.stderr)
        return 2
    if args.pid:
        server = _ppid(args.pid)
        sibling = args.sibling
        if sibling is None:
            with contextlib.suppress(OSError):
                kids = Path(f"/proc/{server}/task/{server}/children").read_text().split()
                sibling = next((int(k) for k in kids if int(k) != args.pid), None)
        print(report(analyse(args.pid, server, sibling)))
        return 0
    return start_and_analyse(max(args.start, 3), args.settle)


if __name__ == "__main__":
    sys.exit(main())
