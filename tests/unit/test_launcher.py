"""shimv2.launcher: the launcher pair a wheel carries (setup.py) and how the
native launcher runs the Python one (the e2e test in test_packaging.py installs
a real wheel)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shimv2 import forkserver, launcher

REPO = Path(__file__).resolve().parents[2]


def native(directory: Path) -> Path:
    cc = launcher.compiler()
    if cc is None:
        pytest.skip("no C compiler: no native launcher")
    binary = directory / "shim"
    launcher.build_native(str(binary), cc, "0" * 20)
    return binary


def test_the_python_launcher_runs_isolated_whatever_its_shebang(tmp_path: Path) -> None:
    """pip rewrites a wheel's ``#!python`` to the bare interpreter path: the
    native launcher adds -I -S itself."""
    binary = native(tmp_path)
    script = Path(f"{binary}.py")
    body = "import sys\nprint(sys.flags.isolated, sys.flags.no_site, sys.argv[1:])\n"
    for shebang in (sys.executable, f"{sys.executable} -IS"):
        script.write_text(f"#!{shebang}\n{body}")
        script.chmod(0o755)
        out = subprocess.run([binary, "-x", "a b"], capture_output=True, text=True, check=True)
        assert out.stdout == "1 1 ['-x', 'a b']\n"
    # no python named: the kernel runs it as it is
    script.write_text('#!/bin/sh\necho "sh $*"\n')
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True)
    assert out.stdout == "sh -v\n"


def test_write_scripts_native(tmp_path: Path) -> None:
    if launcher.compiler() is None:
        pytest.skip("no C compiler: no native launcher")
    package = os.path.dirname(os.path.realpath(forkserver.__file__))
    assert launcher.write_scripts(str(tmp_path), package, []) == "native"
    binary = tmp_path / launcher.NAME
    assert launcher.is_native(str(binary))
    assert forkserver.version_tag(package).encode() in binary.read_bytes()
    script = Path(f"{binary}.py")
    assert script.read_text() == launcher.wheel_script_text([])
    assert os.access(script, os.X_OK)


def test_write_scripts_without_a_compiler_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CC", "no-such-cc")
    (tmp_path / f"{launcher.NAME}.py").write_text("left by an earlier build")
    assert launcher.write_scripts(str(tmp_path), str(REPO / "shimv2"), []) == "python"
    assert (
        "WARNING: pyshim: no native launcher (no C compiler (no-such-cc))"
        in capsys.readouterr().err
    )
    assert (tmp_path / launcher.NAME).read_text() == launcher.wheel_script_text([])
    assert not (tmp_path / f"{launcher.NAME}.py").exists()


@pytest.mark.parametrize("paths", [[str(REPO)], []])
def test_the_wheel_script_finds_its_packages(tmp_path: Path, paths: list[str]) -> None:
    """With -I -S it puts this venv's site-packages on sys.path (the dev venv's
    shimv2 is an editable install, found only through a .pth file: without the
    source tree given it runs itself again with site)."""
    script = tmp_path / "launcher.py"
    script.write_text(launcher.wheel_script_text(paths))
    out = subprocess.run(
        [sys.executable, "-I", "-S", str(script), "-v"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert "Version:  " in out.stdout
