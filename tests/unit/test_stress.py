"""The stress tool's consistency rules (shimv2.tools.stress), fed made-up observations.

The end-to-end run against a real containerd is tests/e2e/test_stress.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shimv2.tools import stress
from shimv2.tools.containerd import ContainerdError
from shimv2.tools.stress import (
    LINE_LEN,
    Observations,
    Output,
    ProcRecord,
    attach_exit_events,
    count_log_exit_events,
    evaluate,
    format_summary,
    output_problem,
)

OUT = b"o" * (LINE_LEN - 1) + b"\n"
ERR = b"e" * (LINE_LEN - 1) + b"\n"


def rec(cid: str = "c1-a", exec_id: str = "", code: int | None = 7, **kw: object) -> ProcRecord:
    r = ProcRecord(cycle=1, cid=cid, exec_id=exec_id, role=str(kw.pop("role", "exit-down")))
    r.expected_code = code
    r.output = Output(2, 1) if code is not None else None
    r.received_code = code
    r.code_source = "ctr task rm"
    r.received_bytes = 0 if code is None else 3 * LINE_LEN
    r.exit_events = [] if code is None else [code]
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def clean_obs(*records: ProcRecord) -> Observations:
    records = records or (rec(), rec("c1-b", role="start"), rec("c1-b", "x1", 5, role="exec"))
    expected = sum(1 for r in records if r.expected_code is not None)
    return Observations(
        runtime="io.containerd.pyshim.v2",
        cycles=1,
        containers=2,
        restarts=1,
        records=list(records),
        forwarded_exit_events=expected,
        synthesized_exit_events=0,
    )


# --------------------------------------------------------------------------- output


def test_output_exact_and_interleaved() -> None:
    want = Output(out_lines=3, err_lines=2)
    assert output_problem(want, OUT * 3 + ERR * 2) is None
    # stdout and stderr share the log file: chunks interleave at any byte
    mixed = OUT[:10] + ERR + OUT[10:] + OUT + ERR[:5] + OUT + ERR[5:]
    assert output_problem(want, mixed) is None
    assert want.size == 5 * LINE_LEN


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (OUT * 3 + ERR, "stderr bytes 63/126"),  # a line of stderr lost
        (OUT * 2 + OUT[:-1] + ERR * 2, "newlines 4/5"),  # one byte short
        (OUT * 3 + ERR * 2 + b"X", "foreign bytes 1"),
        (OUT * 4 + ERR * 2, "stdout bytes 252/189"),  # duplicated output
        (b"", "got 0 bytes, expected 320"),
    ],
)
def test_output_problems(data: bytes, fragment: str) -> None:
    problem = output_problem(Output(3, 2), data)
    assert problem is not None and fragment in problem, problem


def test_output_trailer_and_never_ran() -> None:
    want = Output(out_lines=2, trailer="END 2\n")
    assert output_problem(want, OUT * 2 + b"END 2\n") is None
    assert "missing trailer" in (output_problem(want, OUT * 2) or "")
    assert output_problem(None, b"") is None
    assert output_problem(None, b"abc") == "3 bytes from a process that never ran"


# --------------------------------------------------------------------------- events


def test_attach_exit_events_keys_and_defaults() -> None:
    init, ex = rec("c1", code=0), rec("c1", "x1", 5)
    init.exit_events, ex.exit_events = [], []
    unknown = attach_exit_events(
        [init, ex],
        [
            {"container_id": "c1", "id": "c1", "pid": 10},  # exit_status 0 is omitted (proto3)
            {"container_id": "c1", "id": "x1", "pid": 11, "exit_status": 5},
            {"container_id": "c1", "id": "x1", "pid": 11, "exit_status": 5},
            {"container_id": "zz", "id": "zz", "exit_status": 1},
        ],
    )
    assert init.exit_events == [0]
    assert ex.exit_events == [5, 5]
    assert unknown == ["/tasks/exit for unknown process zz/zz status 1"]


def test_count_log_exit_events() -> None:
    log = "\n".join(
        [
            'time="t" level=debug msg="event forwarded" ns=s1 topic=/tasks/exit type=x',
            'time="t" level=debug msg="event forwarded" ns=s1 topic=/tasks/exit type=x',
            'time="t" level=debug msg="event forwarded" ns=s1 topic=/tasks/start type=x',
            'time="t" level=debug msg="event forwarded" ns=other topic=/tasks/exit type=x',
            'time="t" level=debug msg="event published" ns=s1 topic=/tasks/exit type=x',
            'time="t" level=debug msg="event published" ns=s1 topic=/containers/create type=x',
        ]
    )
    assert count_log_exit_events(log, "s1") == (2, 1)
    assert count_log_exit_events("", "s1") == (0, 0)


# --------------------------------------------------------------------------- evaluate


def test_clean_run() -> None:
    s = evaluate(clean_obs())
    assert s.ok, s.failures
    assert (s.exits_expected, s.exits_received, s.exits_lost, s.exits_duplicate) == (3, 3, 0, 0)
    assert s.bytes_expected == s.bytes_received == 3 * 3 * LINE_LEN
    assert s.exit_events_seen == 3 and s.processes == 3 and s.processes_not_run == 0
    d = s.to_dict()
    assert d["ok"] is True and json.loads(json.dumps(d)) == d
    text = format_summary(s)
    assert "exits expected / received              3 / 3" in text
    assert "result" in text and "OK" in text


def test_never_ran_is_fine_when_silent() -> None:
    s = evaluate(clean_obs(rec(), rec("c1-s", code=None, role="start")))
    assert s.ok, s.failures
    assert s.processes_not_run == 1 and s.exits_expected == 1


def test_lost_wrong_duplicate_and_unexpected_exits() -> None:
    lost = rec("c-lost", received_code=None, notes=["ctr run -d rc=1"])
    wrong = rec("c-wrong", received_code=9)
    dup = rec("c-dup", exit_events=[7, 7])
    bad_ev = rec("c-badev", exit_events=[3])
    ghost = rec("c-ghost", code=None, role="start", received_code=137, exit_events=[137])
    s = evaluate(clean_obs(lost, wrong, dup, bad_ev, ghost))
    assert not s.ok
    assert (s.exits_lost, s.exits_wrong_code, s.exits_duplicate, s.exits_unexpected) == (1, 1, 1, 2)
    assert s.exit_events_wrong_code == 1
    assert s.failure_kinds == {
        stress.EXIT_LOST: 1,
        stress.EXIT_WRONG: 1,
        stress.EVENT_DUPLICATE: 1,
        stress.EVENT_WRONG: 1,
        stress.EXIT_UNEXPECTED: 2,
    }
    text = "\n".join(s.failures)
    assert "c-lost: exit status never received (want 7) [ctr run -d rc=1]" in text
    assert "c-wrong: exit 9 (ctr task rm), want 7" in text


@pytest.mark.parametrize(
    ("forwarded", "kind", "dup"),
    [(2, stress.EVENTS_LOST, 0), (5, stress.EVENTS_DUPLICATED, 2)],
)
def test_forwarded_exit_events_must_match(forwarded: int, kind: str, dup: int) -> None:
    obs = clean_obs()
    obs.forwarded_exit_events = forwarded
    s = evaluate(obs)
    assert s.failure_kinds == {kind: 1}
    assert s.exits_duplicate == dup
    assert f"containerd got {forwarded} /tasks/exit events from shims for 3 exits" in s.failures[0]


def test_unknown_log_format_is_not_a_failure() -> None:
    obs = clean_obs()
    obs.forwarded_exit_events = obs.synthesized_exit_events = None
    s = evaluate(obs)
    assert s.ok
    assert "exit events forwarded to containerd    n/a" in format_summary(s)


def test_made_up_events_output_leaks_and_errors() -> None:
    obs = clean_obs(rec(output_error="got 0 bytes, expected 192"))
    obs.synthesized_exit_events = 1
    obs.inconsistencies = ["cycle 1: task c1-a pid 5 became 6 after the restart"]
    obs.stray_shims = [
        f"cycle 1 (start c1-s, {stress.INTERRUPTED_MARK}): pid 9: shim -id c1-s",
        "cycle 1 (exit-down c1-a): pid 10: shim -id c1-a",
    ]
    obs.leaked_sockets = ["end (long l-1): /run/containerd/s/abc"]
    obs.leaked_runc_state = [f"cycle 1 (start c1-s, {stress.INTERRUPTED_MARK}): /run/x"]
    obs.errors = ["cycle 1: ctr run -d c1-q failed before any kill: boom"]
    s = evaluate(obs)
    assert s.failure_kinds == {
        stress.OUTPUT: 1,
        stress.EVENTS_MADE_UP: 1,
        stress.INCONSISTENT: 1,
        stress.INTERRUPTED_CREATE_LEFTOVER: 2,
        stress.STRAY_SHIM: 1,
        stress.LEAK: 1,
        stress.ERROR: 1,
    }
    text = format_summary(s, max_failures=3)
    assert "FAILED (8 problems)" in text
    assert "... and 5 more (see --json)" in text


# --------------------------------------------------------------------------- options


def test_roles_rotate_over_cycles() -> None:
    run = stress.StressRun(stress.StressOptions(containers_per_cycle=2, seed=1))
    seen = [role for n in range(1, 4) for role in run.roles_for(n)]
    assert seen[:5] == list(stress.ROLES)
    assert len(run.roles_for(1)) == 2


def test_cli_defaults_and_missing_shim(capsys: pytest.CaptureFixture[str]) -> None:
    args = stress.parse_args([])
    assert (args.runtime, args.cycles, args.containers_per_cycle) == (
        "io.containerd.pyshim.v2",
        10,
        len(stress.ROLES),
    )
    with pytest.raises(ContainerdError, match="containerd-shim-nope-v9"):
        stress.containerd_path_for("io.containerd.nope.v9")
    assert stress.main(["--runtime", "io.containerd.nope.v9", "--cycles", "1"]) == 2
    assert "containerd-shim-nope-v9" in capsys.readouterr().err


def test_a_private_containerd_removes_its_namespace_cgroups(tmp_path: Path) -> None:
    """The per-namespace parents containerd leaves in each hierarchy go at stop;
    a cgroup still holding something (here: a file, as a process would) stays."""
    from shimv2.tools.containerd import remove_empty_cgroups

    for parent in ("", "memory", "pids", "unified"):
        (tmp_path / parent / "e2e-1" / "c1").mkdir(parents=True)
    (tmp_path / "cpu" / "e2e-1" / "busy").mkdir(parents=True)
    (tmp_path / "cpu" / "e2e-1" / "busy" / "cgroup.procs").write_text("42\n")
    (tmp_path / "memory" / "e2e-2").mkdir()
    remove_empty_cgroups("e2e-1", tmp_path)
    assert not any((tmp_path / p / "e2e-1").exists() for p in ("", "memory", "pids", "unified"))
    assert (tmp_path / "cpu" / "e2e-1" / "busy").is_dir()  # not empty: left alone
    assert (tmp_path / "memory" / "e2e-2").is_dir()  # another namespace: not ours
