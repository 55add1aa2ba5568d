"""Packaging: packaging/install.sh and packaging/build-deb.sh (pyshim only).

* install.sh into a temp PREFIX/BINDIR, then a private containerd whose PATH
  has that BINDIR first and not the dev venv: containers run with the
  installed shim; a re-install while a container runs leaves its shim (and its
  release dir) alone; ``--uninstall`` removes the link.
* the wheel (``python -m build``): a platform wheel carrying the native
  launcher; ``pip install`` of it into a fresh venv, then a private containerd
  with that venv's bin dir first on its PATH: after the first ``start`` (which
  launches the fork server) no ``start`` or ``delete`` runs the Python launcher.
* build-deb.sh: the .deb's metadata and layout (``dpkg-deb --info/--contents``,
  extracted with ``dpkg-deb -x``), the extracted console script runs, and a
  real install / upgrade / purge with ``dpkg --root`` into a temp root (own
  dpkg database, maintainer scripts unchrooted with ``DPKG_ROOT``). Nothing is
  installed on this machine itself (no plain ``dpkg -i``).

The wheel is built once per module from this tree, as users build it; pip
fetches the build and runtime dependencies from the configured index (or its
cache).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import shimv2
from shimv2 import forkserver, launcher

from .harness import (
    RUNNING,
    STOPPED,
    SYSTEM_PATH,
    Containerd,
    HarnessError,
    exit_code_from_task_rm,
    pid_alive,
    wait_until,
)

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
NAME = "containerd-shim-pyshim-v2"
RUNTIME = "io.containerd.pyshim.v2"
VERSION = shimv2.__version__


def run(
    argv: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 300,
    cwd: str | os.PathLike[str] | None = None,
) -> str:
    r = subprocess.run(
        argv,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert r.returncode == 0, f"{argv} rc={r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build``: the sdist, then the wheel from it in an isolated
    environment, from a copy (setuptools writes build/ and *.egg-info/ into the
    source tree)."""
    src = tmp_path_factory.mktemp("src")
    for f in ("pyproject.toml", "README.md", "setup.py"):
        shutil.copy2(REPO / f, src / f)
    shutil.copytree(REPO / "shimv2", src / "shimv2",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "build", "-o", str(out), str(src)])
    (whl,) = out.glob("pyshim-*.whl")
    return whl


# --------------------------------------------------------------------------- the wheel


def test_wheel_carries_the_native_launcher(wheel: Path) -> None:
    # machine code, with the fork server version of this interpreter compiled in
    impl = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    assert wheel.name.startswith(f"pyshim-{VERSION}-{impl}-{impl}-linux_"), wheel.name
    scripts = f"pyshim-{VERSION}.data/scripts/"
    with zipfile.ZipFile(wheel) as z:
        assert z.read(scripts + NAME)[:4] == b"\x7fELF"
        assert z.getinfo(scripts + NAME).external_attr >> 16 & 0o111
        # pip points "#!python" at the interpreter it installs for
        assert z.read(f"{scripts}{NAME}.py").startswith(b"#!python\n")
        # no console script of pip's to replace the native launcher
        assert not [n for n in z.namelist() if n.endswith("/entry_points.txt")]


def test_pip_installed_wheel_starts_without_an_interpreter(
    wheel: Path, tmp_path: Path, e2e_tools: None, rootfs: Path
) -> None:
    """``pip install`` of the wheel into a fresh venv gives the native launcher,
    and containerd's ``start`` and ``delete`` reach the fork server from it: the
    Python launcher (the only way it starts an interpreter) runs for the first
    ``start`` only, which finds no server yet and launches one."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)])
    binary = venv / "bin" / NAME
    script = Path(f"{binary}.py")
    assert launcher.is_native(str(binary)), "pip install gave no native launcher"
    assert script.read_text().splitlines()[0] == f"#!{python}"
    tag = run([python, "-c", "from shimv2 import forkserver; print(forkserver.version_tag())"],
              cwd=tmp_path).strip()  # fmt: skip
    assert tag.encode() in binary.read_bytes(), "not the fork server of the installed files"
    assert f"Version:  {VERSION}" in run([str(binary), "-v"], cwd=tmp_path)

    # every run of the Python launcher appends its arguments here
    runs = tmp_path / "python-launcher-runs"
    lines = script.read_text().splitlines(keepends=True)
    record = f"open({str(runs)!r}, 'a').write(' '.join(__import__('sys').argv[1:]) + '\\n')\n"
    script.write_text("".join([lines[0], record, *lines[1:]]))

    c = Containerd(extra_env={"PATH": f"{venv / 'bin'}:{SYSTEM_PATH}"})
    try:
        c.start()
    except HarnessError as e:
        c.stop()
        pytest.fail(f"could not start a private containerd: {e}", pytrace=False)
    try:
        _, _, log, pid_file = (Path(p) for p in forkserver.paths(c.env[forkserver.DIR_ENV], tag))
        first = c.new_id("first")
        r = c.ctr("run", "-d", "--runtime", RUNTIME, "--rootfs", str(rootfs), first,
                  "/bin/sleep", "1000", timeout=30)  # fmt: skip
        assert r.returncode == 0, r.stderr
        c.wait_task_status(first, RUNNING)
        # (and so do the daemon and the fork server it launches)
        assert [r for r in runs.read_text().splitlines() if r.endswith(" start")], "no server yet"
        wait_until(lambda: pid_file.exists() and pid_alive(int(pid_file.read_text() or 0)),
                   timeout=30, what="the fork server")  # fmt: skip
        server = int(pid_file.read_text())
        runs.write_text("")

        hello(c, rootfs)  # start, delete
        second = c.new_id("second")
        r = c.ctr("run", "-d", "--runtime", RUNTIME, "--rootfs", str(rootfs), second,
                  "/bin/sleep", "1000", timeout=30)  # fmt: skip
        assert r.returncode == 0, r.stderr
        c.wait_task_status(second, RUNNING)
        (shim,) = c.shim_processes(second)
        assert shim.ppid() == server, "the daemon is not the fork server's child"
        for cid in (first, second):
            c.ctr("task", "kill", "-s", "SIGKILL", cid, timeout=15, check=True)
            c.wait_task_status(cid, STOPPED)
            c.ctr("task", "rm", cid, timeout=15, check=True)
            c.ctr("container", "rm", cid, timeout=15, check=True)
        c.assert_no_leaks(first, second)
        assert runs.read_text() == "", "start/delete started the Python launcher"
        assert log.read_text().count(": start runs in child") == 2, log.read_text()
    finally:
        c.stop(remove=not os.environ.get("PYSHIM_E2E_KEEP"))


# --------------------------------------------------------------------------- install.sh


class Installed:
    def __init__(self, root: Path, wheel: Path) -> None:
        self.prefix = root / "opt"
        self.bindir = root / "bin"
        self.wheel = wheel
        self.env = {"PREFIX": str(self.prefix), "BINDIR": str(self.bindir)}

    def install(self, *args: str) -> str:
        return run(["sh", str(PACKAGING / "install.sh"), *args], env=self.env)

    @property
    def link(self) -> Path:
        return self.bindir / NAME

    def current(self) -> Path:
        return (self.prefix / "current").resolve()

    def releases(self) -> list[str]:
        d = self.prefix / "releases"
        return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.fixture
def installed(tmp_path: Path, wheel: Path) -> Iterator[Installed]:
    inst = Installed(tmp_path, wheel)
    inst.install(str(wheel))
    yield inst
    if inst.link.is_symlink():
        inst.install("--uninstall")


@pytest.fixture
def pkg_containerd(installed: Installed, e2e_tools: None) -> Iterator[Containerd]:
    # PATH: the installed BINDIR first, then the system dirs; NOT the dev venv
    c = Containerd(extra_env={"PATH": f"{installed.bindir}:{SYSTEM_PATH}"})
    try:
        c.start()
    except HarnessError as e:
        c.stop()
        pytest.fail(f"could not start a private containerd: {e}", pytrace=False)
    try:
        yield c
    finally:
        c.stop(remove=not os.environ.get("PYSHIM_E2E_KEEP"))


def shim_release(c: Containerd, cid: str) -> tuple[int, str]:
    """(pid, argv[0]) of the one shim serving *cid*: argv[0] is <release>/bin/python."""
    (p,) = c.shim_processes(cid)
    return p.pid, p.cmdline()[0]


def hello(c: Containerd, rootfs: Path) -> None:
    cid = c.new_id("hello")
    r = c.ctr("run", "--rm", "--runtime", RUNTIME, "--rootfs", str(rootfs), cid,
              "/bin/sh", "-c", "echo hello; sleep 0.2", timeout=30)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.replace("\r", "") == "hello\n"


def test_install_sh_layout(installed: Installed) -> None:
    assert installed.link.is_symlink()
    assert os.readlink(installed.link) == f"{installed.prefix}/current/bin/{NAME}"
    assert os.readlink(installed.prefix / "current").startswith("releases/")
    (rel,) = installed.releases()
    assert rel.startswith(f"{VERSION}-")
    binary = installed.prefix / "releases" / rel / "bin" / NAME
    script = Path(f"{binary}.py") if launcher.is_native(str(binary)) else binary
    shebang = f"#!{installed.prefix}/releases/{rel}/bin/python -IS"  # the Python launcher
    assert script.read_text().splitlines()[0] == shebang
    out = run([str(installed.link), "-v"])
    assert f"Version:  {VERSION}" in out
    # idempotent: a second run ends in the same shape (one release, same links)
    installed.install(str(installed.wheel))
    (rel2,) = installed.releases()
    assert rel2 != rel
    assert installed.current().name == rel2
    installed.install("--uninstall")
    assert not installed.link.exists() and not installed.link.is_symlink()
    assert not installed.prefix.exists()
    installed.install("--uninstall")  # uninstalling twice is fine


def test_install_sh_refuses_foreign_binary(tmp_path: Path, wheel: Path) -> None:
    inst = Installed(tmp_path, wheel)
    inst.bindir.mkdir()
    inst.link.write_text("#!/bin/sh\n")
    r = subprocess.run(["sh", str(PACKAGING / "install.sh"), str(wheel)],
                       capture_output=True, text=True, env={**os.environ, **inst.env},
                       timeout=60)  # fmt: skip
    assert r.returncode != 0 and "not a link into" in r.stderr
    assert inst.link.read_text() == "#!/bin/sh\n"


def test_installed_shim_survives_upgrade(
    installed: Installed, pkg_containerd: Containerd, rootfs: Path
) -> None:
    c = pkg_containerd
    rel1 = installed.current()
    hello(c, rootfs)

    cid = c.new_id("up")
    r = c.ctr("run", "-d", "--runtime", RUNTIME, "--rootfs", str(rootfs), cid,
              "/bin/sleep", "1000", timeout=30)  # fmt: skip
    assert r.returncode == 0, r.stderr
    c.wait_task_status(cid, RUNNING)
    pid1, exe1 = shim_release(c, cid)
    assert exe1 == f"{rel1}/bin/python", "containerd did not use the installed shim"
    task_pid = c.task_pid(cid)

    # upgrade (re-install) while the container runs
    out = installed.install(str(installed.wheel))
    rel2 = installed.current()
    assert rel2 != rel1
    assert f"keeping {rel1}" in out
    assert rel1.is_dir() and sorted(installed.releases()) == sorted([rel1.name, rel2.name])
    assert shim_release(c, cid) == (pid1, exe1)
    assert c.tasks()[cid] == (task_pid, RUNNING)
    assert c.ctr("shim", "--id", cid, "state", timeout=15).returncode == 0

    # new containers get the new release; the old shim still serves its task
    cid2 = c.new_id("new")
    r = c.ctr("run", "-d", "--runtime", RUNTIME, "--rootfs", str(rootfs), cid2,
              "/bin/sleep", "1000", timeout=30)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert shim_release(c, cid2)[1] == f"{rel2}/bin/python"
    hello(c, rootfs)

    for t in (cid, cid2):
        c.ctr("task", "kill", "-s", "SIGKILL", t, timeout=15, check=True)
        c.wait_task_status(t, STOPPED)
        r = c.ctr("task", "rm", t, timeout=15, check=True)
        assert exit_code_from_task_rm(r.stderr) == 137
        c.ctr("container", "rm", t, timeout=15, check=True)
    c.assert_no_leaks(cid, cid2)
    c.assert_no_shims()

    # the next install collects the release nobody uses any more
    installed.install(str(installed.wheel))
    assert rel1.name not in installed.releases() and rel2.name not in installed.releases()
    installed.install("--uninstall")
    assert not installed.link.is_symlink()
    assert not installed.prefix.exists()


# --------------------------------------------------------------------------- build-deb.sh


@pytest.fixture(scope="module")
def deb(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(["sh", str(PACKAGING / "build-deb.sh"), str(wheel)], env={"OUT": str(out)})
    arch = run(["dpkg", "--print-architecture"]).strip()
    path = out / f"pyshim_{VERSION}_{arch}.deb"
    assert path.is_file(), list(out.iterdir())
    return path


def test_deb_metadata(deb: Path) -> None:
    info = run(["dpkg-deb", "--info", str(deb)])
    fields = dict(
        line.strip().split(": ", 1)
        for line in info.splitlines()
        if line.startswith(" ") and ": " in line
    )
    assert fields["Package"] == "pyshim"
    assert fields["Version"] == VERSION
    depends = fields["Depends"]
    # pinned to the minor version of the Debian python3 it was built with
    # (3.11 on bookworm, 3.13 on trixie)
    minor = run(["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
    for dep in (f"python3 (>= {minor.strip()})", "runc", "containerd"):
        assert dep in depends
    for script in ("preinst", "postinst", "prerm", "postrm"):
        assert script in info

    contents = run(["dpkg-deb", "--contents", str(deb)])
    rel = f"./opt/pyshim/releases/{VERSION}"
    assert f" {rel}/bin/{NAME}\n" in contents
    assert f" {rel}/pyvenv.cfg\n" in contents
    assert f" ./opt/pyshim/current -> releases/{VERSION}\n" in contents
    assert f" ./usr/bin/{NAME} -> /opt/pyshim/current/bin/{NAME}\n" in contents
    assert "/site-packages/shimv2/cli.py\n" in contents
    assert "/shimv2/__pycache__/cli.cpython-" in contents  # byte-compiled at build time
    assert "/bin/pip" not in contents
    assert "root/root" in contents.splitlines()[0]


def test_deb_extracted(deb: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    run(["dpkg-deb", "-x", str(deb), str(root)])
    rel = root / "opt/pyshim/releases" / VERSION
    binary = rel / "bin" / NAME
    assert launcher.is_native(str(binary)), "build-deb.sh had cc: the native launcher"
    script = Path(f"{binary}.py")
    assert script.read_text().splitlines()[0] == f"#!/opt/pyshim/releases/{VERSION}/bin/python -IS"
    # the fork server version compiled into it is the one of the files as installed
    (site_packages,) = rel.glob("lib/python3*/site-packages")
    tag = run(
        [str(rel / "bin/python"), "-I", "-S", "-c",
         f"import sys; sys.path[0:0] = [{str(site_packages)!r}]; "
         "from shimv2 import forkserver; print(forkserver.version_tag())"],
        cwd=tmp_path,
    ).strip()  # fmt: skip
    assert tag.encode() in binary.read_bytes()
    assert os.readlink(rel / "bin/python3") == "/usr/bin/python3"
    # no trace of the build's staging dir anywhere (text files)
    stale = subprocess.run(
        ["grep", "-rlI", "pyshim-deb.", str(root)], capture_output=True, text=True
    )
    assert stale.stdout == ""
    # the extracted console script runs (shebang path does not exist here: call its python)
    out = run([str(rel / "bin/python"), str(script), "-v"], cwd=tmp_path)
    assert f"Version:  {VERSION}" in out
    # its own site-packages, not the dev tree
    where = run(
        [str(rel / "bin/python"), "-c", "import shimv2; print(shimv2.__file__)"], cwd=tmp_path
    )
    assert where.startswith(str(rel / "lib"))


def dpkg_root(root: Path, *args: str) -> str:
    """dpkg on a private root: own database, maintainer scripts run unchrooted
    with DPKG_ROOT set (they honour it), dependencies not checked. Nothing on this
    machine outside *root* is changed."""
    return run(["dpkg", f"--root={root}", "--force-script-chrootless", "--force-depends",
                "--force-not-root", *args], timeout=120)  # fmt: skip


def test_deb_dpkg_root_upgrade_remove(deb: Path, wheel: Path, tmp_path: Path) -> None:
    """Real dpkg install, upgrade and purge into a temp root (``dpkg --root``):
    the current link follows the upgrade, the old release is kept while a
    process still runs from it and collected afterwards, purge leaves nothing."""
    run(["sh", str(PACKAGING / "build-deb.sh"), str(wheel)],
        env={"OUT": str(tmp_path / "dist2"), "DEB_VERSION": f"{VERSION}-2"})  # fmt: skip
    (deb2,) = (tmp_path / "dist2").glob("*.deb")
    root = tmp_path / "root"
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "var/log"):
        (root / d).mkdir(parents=True)
    for f in ("status", "available"):
        (root / "var/lib/dpkg" / f).touch()
    rels = root / "opt/pyshim/releases"
    current = root / "opt/pyshim/current"
    link = root / "usr/bin" / NAME

    dpkg_root(root, "-i", str(deb))
    assert os.readlink(current) == f"releases/{VERSION}"
    assert os.readlink(link) == f"/opt/pyshim/current/bin/{NAME}"
    assert "ii  pyshim" in dpkg_root(root, "-l", "pyshim")

    # a "running shim" of the old release (its argv names <release>/bin/python)
    old = rels / VERSION
    user = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", f"{old}/bin/python"]
    )
    try:
        dpkg_root(root, "-i", str(deb2))
        assert os.readlink(current) == f"releases/{VERSION}-2"
        assert (rels / f"{VERSION}-2/bin" / NAME).is_file()
        # dpkg deleted the old package's files; the scripts put them back
        assert launcher.is_native(str(old / "bin" / NAME))
        script = old / "bin" / f"{NAME}.py"
        assert script.read_text().startswith(f"#!/opt/pyshim/releases/{VERSION}/")
        assert not list(rels.glob(".keep-*"))
    finally:
        user.kill()
        user.wait()
    dpkg_root(root, "-i", str(deb2))  # re-install: collects the unused old release
    assert sorted(p.name for p in rels.iterdir()) == [f"{VERSION}-2"]

    dpkg_root(root, "--purge", "pyshim")
    assert not link.is_symlink()
    assert not (root / "opt/pyshim").exists()
