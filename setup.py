"""Build hook: every wheel (``pip install .``, ``python -m build``, ``pip install
-e .``) carries the launcher containerd runs, as scripts pip puts in the bin dir:

- ``containerd-shim-pyshim-v2``: the native launcher (shimv2/launcher.c, built
  with the system ``cc``), with the fork server version of the wheel's files
  compiled in. Machine code tied to this interpreter (the version includes
  it): the wheel is tagged for this platform and Python, not py3-none-any.
- ``containerd-shim-pyshim-v2.py``: the Python launcher it runs for everything
  but ``start``/``delete``; pip rewrites its ``#!python`` line.

Without a compiler (or with PYSHIM_NATIVE_LAUNCHER=0) the Python launcher is
the binary, the wheel is pure, and the build prints a warning. The metadata is
in pyproject.toml; see shimv2/launcher.py.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from setuptools import setup
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # this tree's shimv2 (stdlib-only modules), not an installed one
from shimv2 import launcher  # noqa: E402

if TYPE_CHECKING:
    from setuptools._distutils.command.build_scripts import build_scripts
else:  # setuptools' own is distutils': no public module to import it from
    build_scripts = Distribution().get_command_class("build_scripts")


class BuildLauncher(build_scripts):
    """Writes the launcher pair instead of copying script files."""

    editable_mode = False  # set by setuptools for an editable install

    def get_source_files(self) -> list[str]:
        return []  # launcher.c is package data, in the sdist already

    def run(self) -> None:
        if self.editable_mode:
            # the package stays in this tree, which only a .pth file names
            package, paths = os.path.join(HERE, "shimv2"), [HERE]
        else:
            # the files as the wheel will install them (build_py ran before us)
            build_py = self.get_finalized_command("build_py")
            package, paths = os.path.join(build_py.build_lib, "shimv2"), []  # type: ignore[attr-defined]
        self.mkpath(self.build_dir)
        kind = launcher.write_scripts(self.build_dir, package, paths)
        # install_scripts copies build_dir only when the distribution names scripts
        self.distribution.scripts = sorted(os.listdir(self.build_dir))
        print(f"pyshim: {launcher.NAME} is the {kind} launcher", file=sys.stderr)


class WithLauncher(Distribution):
    def has_scripts(self) -> bool:  # there are no script files: run build_scripts anyway
        return True

    def has_ext_modules(self) -> bool:
        # the native launcher counts as one: a platform wheel, files in platlib
        return launcher.compiler() is not None


setup(distclass=WithLauncher, cmdclass={"build_scripts": BuildLauncher})
