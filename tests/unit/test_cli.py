"""Command line of ``containerd-shim-pyshim-v2`` (spec: shim-contract.md §3, §10).

Go ``flag`` syntax: ``-f v``, ``-f=v``, ``--f``; booleans never take the next
argument; parsing stops at the first non-flag (the action) or at ``--``.
"""

from __future__ import annotations

import sys

import pytest

from shimv2 import __version__, cli
from shimv2.cli import main
from shimv2.flags import Flags, UsageError, parse_flags

CONTAINERD_START = [
    "-namespace",
    "pyspec",
    "-address",
    "/tmp/pyspec/c.sock",
    "-publish-binary",
    "/usr/bin/containerd",
    "-id",
    "t1",
    "-debug",
    "start",
]


def test_containerd_start_command_line() -> None:
    flags = parse_flags(CONTAINERD_START)
    assert flags == Flags(
        namespace="pyspec",
        id="t1",
        address="/tmp/pyspec/c.sock",
        publish_binary="/usr/bin/containerd",
        debug=True,
        action="start",
    )


def test_containerd_delete_command_line() -> None:
    argv = ["-namespace", "ns", "-address", "/a", "-publish-binary", "/c", "-id", "t1"]
    flags = parse_flags([*argv, "-bundle", "/run/b/t1", "-debug", "delete"])
    assert (flags.bundle, flags.debug, flags.action) == ("/run/b/t1", True, "delete")


def test_daemon_command_line_has_no_action() -> None:
    flags = parse_flags(["-namespace", "ns", "-id", "t1", "-address", "/a"])
    assert flags.action == ""
    assert (flags.namespace, flags.id, flags.address) == ("ns", "t1", "/a")


@pytest.mark.parametrize(
    "argv",
    [
        ["-namespace", "ns"],
        ["-namespace=ns"],
        ["--namespace", "ns"],
        ["--namespace=ns"],
    ],
)
def test_string_flag_spellings(argv: list[str]) -> None:
    assert parse_flags(argv).namespace == "ns"


def test_value_with_equals_sign_and_empty_value() -> None:
    assert parse_flags(["-id=a=b"]).id == "a=b"
    assert parse_flags(["-id="]).id == ""
    assert parse_flags(["-id", ""]).id == ""


def test_value_that_looks_like_a_flag_is_taken_verbatim() -> None:
    # Go: a string flag consumes the next argument whatever it is.
    flags = parse_flags(["-id", "-debug", "start"])
    assert (flags.id, flags.debug, flags.action) == ("-debug", False, "start")


def test_all_string_flags() -> None:
    flags = parse_flags(
        [
            "-socket",
            "/s.sock",
            "-debug-socket=/d.sock",
            "-bundle",
            "/b",
            "-publish-binary",
            "/p",
        ]
    )
    assert (flags.socket, flags.debug_socket, flags.bundle, flags.publish_binary) == (
        "/s.sock",
        "/d.sock",
        "/b",
        "/p",
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-debug"], True),
        (["--debug"], True),
        (["-debug=true"], True),
        (["-debug=1"], True),
        (["-debug=t"], True),
        (["-debug=T"], True),
        (["-debug=TRUE"], True),
        (["-debug=True"], True),
        (["-debug=false"], False),
        (["-debug=0"], False),
        (["-debug=f"], False),
        (["-debug=F"], False),
        (["-debug=FALSE"], False),
        (["-debug=False"], False),
        (["-debug", "-debug=false"], False),
        (["-debug=false", "-debug"], True),
    ],
)
def test_bool_flag_values(argv: list[str], expected: bool) -> None:
    assert parse_flags(argv).debug is expected


def test_bool_flag_does_not_consume_the_next_argument() -> None:
    # Go: "-debug false" is -debug followed by the positional argument "false".
    flags = parse_flags(["-debug", "false"])
    assert flags.debug is True
    assert flags.action == "false"


@pytest.mark.parametrize("value", ["yes", "no", "", "2", "on"])
def test_bad_bool_value_is_a_usage_error(value: str) -> None:
    with pytest.raises(UsageError, match="invalid boolean value"):
        parse_flags([f"-debug={value}"])


def test_parsing_stops_at_first_non_flag() -> None:
    flags = parse_flags(["-id", "t1", "start", "-namespace", "ns", "extra"])
    assert flags.action == "start"
    assert flags.namespace == ""


def test_double_dash_ends_flags() -> None:
    flags = parse_flags(["-id", "t1", "--", "-namespace"])
    assert flags.action == "-namespace"
    assert flags.namespace == ""
    assert parse_flags(["--", "start"]).action == "start"
    assert parse_flags(["--"]).action == ""


def test_single_dash_is_a_positional_argument() -> None:
    assert parse_flags(["-", "start"]).action == "-"


def test_unknown_flag_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="flag provided but not defined: -bogus"):
        parse_flags(["-bogus", "start"])
    with pytest.raises(UsageError, match="not defined: -bogus"):
        parse_flags(["--bogus=1"])


def test_missing_argument_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="flag needs an argument: -namespace"):
        parse_flags(["-namespace"])
    with pytest.raises(UsageError, match="flag needs an argument: -id"):
        parse_flags(["-namespace", "ns", "-id"])


def test_empty_argv() -> None:
    assert parse_flags([]) == Flags()


# -- main ---------------------------------------------------------------------


def test_main_unknown_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-bogus", "start"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "flag provided but not defined: -bogus" in err


def test_main_missing_argument_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-namespace"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "flag needs an argument: -namespace" in err


def test_main_unknown_action_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from shimv2 import daemon

    monkeypatch.setattr(daemon, "run", lambda flags: pytest.fail("daemon must not run"))
    assert main(["-namespace", "ns", "-id", "t1", "frobnicate"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "unknown action 'frobnicate'" in err


def test_main_version(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/containerd-shim-pyshim-v2", "-v"])
    assert main(["-v"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.split("\n")
    assert lines[0] == "containerd-shim-pyshim-v2:"
    assert lines[1] == f"  Version:  {__version__}"
    assert lines[2].startswith("  Python version: 3.")
    assert out.endswith("\n\n")  # a trailing blank line, as the Go shims print


def test_version_text_uses_basename_of_argv0() -> None:
    assert cli.version_text("/x/y/my-shim").startswith("my-shim:\n")
    assert cli.version_text("").startswith(f"{cli.BINARY_NAME}:\n")


def test_version_wins_over_action(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from shimv2 import manager

    monkeypatch.setattr(manager, "start", lambda flags: pytest.fail("start must not run"))
    assert main(["-v", "start"]) == 0
    assert "Version:" in capsys.readouterr().out


class Recorder:
    def __init__(self, result: int) -> None:
        self.result = result
        self.calls: list[Flags | None] = []

    def __call__(self, flags: Flags | None = None) -> int:
        self.calls.append(flags)
        return self.result


@pytest.fixture
def dispatch(monkeypatch: pytest.MonkeyPatch) -> dict[str, Recorder]:
    from shimv2 import daemon, manager

    recorders = {
        "start": Recorder(11),
        "delete": Recorder(12),
        "info": Recorder(13),
        "daemon": Recorder(14),
    }
    monkeypatch.setattr(manager, "start", recorders["start"])
    monkeypatch.setattr(manager, "delete", recorders["delete"])
    monkeypatch.setattr(manager, "info", recorders["info"])
    monkeypatch.setattr(daemon, "run", recorders["daemon"])
    return recorders


def called(recorders: dict[str, Recorder]) -> list[str]:
    return [name for name, r in recorders.items() if r.calls]


def test_dispatch_start(dispatch: dict[str, Recorder]) -> None:
    assert main(CONTAINERD_START) == 11
    assert called(dispatch) == ["start"]
    flags = dispatch["start"].calls[0]
    assert flags is not None and (flags.namespace, flags.id) == ("pyspec", "t1")


def test_dispatch_delete(dispatch: dict[str, Recorder]) -> None:
    assert main(["-namespace", "ns", "-id", "t1", "-bundle", "/b", "delete"]) == 12
    assert called(dispatch) == ["delete"]
    flags = dispatch["delete"].calls[0]
    assert flags is not None and flags.bundle == "/b"


def test_dispatch_info(dispatch: dict[str, Recorder]) -> None:
    # containerd 2.x runs `<shim> -info` as the only argument.
    assert main(["-info"]) == 13
    assert called(dispatch) == ["info"]


def test_dispatch_daemon(dispatch: dict[str, Recorder]) -> None:
    assert main(["-namespace", "ns", "-id", "t1", "-address", "/a", "-debug"]) == 14
    assert called(dispatch) == ["daemon"]
    flags = dispatch["daemon"].calls[0]
    assert flags is not None and flags.debug and flags.namespace == "ns"


def test_dispatch_reads_sys_argv(
    dispatch: dict[str, Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["shim", "-namespace", "ns", "delete"])
    assert main() == 12


def test_usage_error_dispatches_nothing(dispatch: dict[str, Recorder]) -> None:
    assert main(["-namespace"]) == 2
    assert called(dispatch) == []


def test_console_script_usage_error_exit_status() -> None:
    import subprocess
    from pathlib import Path

    script = Path(sys.executable).parent / "containerd-shim-pyshim-v2"
    result = subprocess.run([str(script), "-bogus"], capture_output=True, timeout=30)
    assert result.returncode == 2
    assert result.stdout == b""
    assert b"flag provided but not defined: -bogus" in result.stderr
