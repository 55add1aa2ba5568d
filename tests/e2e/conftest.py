"""pytest fixtures for the end-to-end tests.

* ``containerd`` — one private containerd per test module (see harness.py);
  restarted transparently if a test left it dead.
* ``runtime`` — parametrized over the Go reference shim and pyshim (ids ``go``
  and ``pyshim``); every e2e test runs the same checks for both.
* ``rootfs`` — a busybox rootfs shared by the session.
* ``cid`` / ``new_cid`` — unique container ids; whatever a test leaves behind
  is force-deleted afterwards so later tests start clean.

Missing containerd/ctr/runc/busybox, or a missing pyshim binary, make the tests
fail (not skip) with a message saying how to install them.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    RUNTIMES,
    STOPPED,
    Containerd,
    HarnessError,
    busybox_rootfs,
    require_tools,
    shim_binary_name,
    shim_installed,
    venv_bin_dir,
)

E2E_DIR = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Attach the private containerd's log tail (it includes the shim's log) to failures."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("call", "setup"):
        c = getattr(item, "funcargs", {}).get("containerd")
        if _go_lost_task_delete(item, c, call):
            # A 2.x Go shim can exit before it forwarded /tasks/delete (it drops
            # its event queue, as 1.6's drops exits): its limitation, not the test's.
            rep.outcome = "skipped"
            rep.wasxfail = (
                f"Go shim, containerd {'.'.join(map(str, c.version))}: /tasks/delete lost "
                "when the shim exits before forwarding it"
            )
            return
        if isinstance(c, Containerd):
            lines = int(os.environ.get("PYSHIM_E2E_LOG_LINES", "80"))
            rep.sections.append(
                (
                    f"containerd + shim log during this test ({c.log_path})",
                    c.log_since(c.test_log_offset, lines),
                )
            )


def _go_lost_task_delete(item: pytest.Item, c: object, call: pytest.CallInfo[None]) -> bool:
    funcargs = getattr(item, "funcargs", {})
    return (
        isinstance(c, Containerd)
        and funcargs.get("runtime") == RUNTIMES["go"]
        and c.version >= (2, 0, 0)
        and call.excinfo is not None
        and call.excinfo.errisinstance(HarnessError)
        and "event /tasks/delete for" in str(call.excinfo.value)
    )


@pytest.fixture(scope="session")
def e2e_tools() -> None:
    problem = None
    try:
        require_tools()
    except HarnessError as e:
        problem = str(e)
    if problem:
        pytest.fail(f"e2e prerequisites missing: {problem}", pytrace=False)


@pytest.fixture(scope="session")
def rootfs(e2e_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return busybox_rootfs(tmp_path_factory.mktemp("rootfs"))


@pytest.fixture(scope="module")
def _module_containerd(e2e_tools: None) -> Iterator[Containerd]:
    c = Containerd()
    problem = None
    try:
        c.start()
    except HarnessError as e:
        problem = str(e)
    if problem:
        c.stop()
        pytest.fail(f"could not start a private containerd: {problem}", pytrace=False)
    try:
        yield c
    finally:
        # PYSHIM_E2E_KEEP=1 keeps the temp dir (config, containerd.log) for post-mortems
        notes = c.stop(remove=not os.environ.get("PYSHIM_E2E_KEEP"))
        if notes:
            warnings.warn(f"containerd teardown had to clean up: {notes}", stacklevel=1)


@pytest.fixture
def containerd(_module_containerd: Containerd) -> Containerd:
    c = _module_containerd
    if not c.running():
        # a previous test killed it (or it crashed): bring it back with the same state
        problem = None
        try:
            c.kill()
            c.start()
        except HarnessError as e:
            problem = str(e)
        if problem:
            pytest.fail(f"private containerd is dead and did not restart: {problem}", pytrace=False)
    c.test_log_offset = c.log_size()
    return c


@pytest.fixture(params=list(RUNTIMES.values()), ids=list(RUNTIMES.keys()))
def runtime(request: pytest.FixtureRequest, e2e_tools: None) -> str:
    rt: str = request.param
    if shim_installed(rt) is None:
        pytest.fail(
            f"{shim_binary_name(rt)} (runtime {rt}) is not on containerd's PATH "
            f"(venv bin dir {venv_bin_dir()} + system dirs); "
            "install it with `make venv` (pip install -e '.[dev]')",
            pytrace=False,
        )
    return rt


@pytest.fixture
def new_cid(containerd: Containerd, request: pytest.FixtureRequest) -> Iterator[Callable[[], str]]:
    made: list[str] = []

    def make() -> str:
        cid = containerd.new_id(prefix="t")
        made.append(cid)
        return cid

    yield make
    for cid in made:
        force_delete(containerd, cid)


@pytest.fixture
def cid(new_cid: Callable[[], str]) -> str:
    return new_cid()


def force_delete(c: Containerd, cid: str) -> None:
    """Remove task + container *cid* if a (failed) test left them behind."""
    if not c.running():
        return
    with contextlib.suppress(HarnessError):
        status = c.task_status(cid)
        if status is not None:
            if status != STOPPED:
                c.ctr("task", "kill", "-s", "SIGKILL", cid, timeout=10)
                with contextlib.suppress(HarnessError):
                    c.wait_task_status(cid, {STOPPED, None}, timeout=5)
            c.ctr("task", "rm", "-f", cid, timeout=15)
    with contextlib.suppress(HarnessError):
        if cid in c.ctr("container", "ls", "-q", timeout=10).stdout.split():
            c.ctr("container", "rm", cid, timeout=15)
