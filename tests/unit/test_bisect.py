"""kernel-ci under `git bisect run`: one exit code mapping, and how kernel-ci knows it is bisecting."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel_ci.cli import main as cli
from kernel_ci.cli.bisect import bisect_exit, bisect_reason
from kernel_ci.core.errors import BISECT_SKIP, ExitCode, bisect_exit_code
from kernel_ci.core.proc import capture
from kernel_ci.flow import bisect as flow

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false"]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (ExitCode.PASS, 0),
        (ExitCode.TEST_FAILURE, 1),
        (ExitCode.OOPS, 1),
        (ExitCode.PANIC, 1),
        (ExitCode.HANG, 1),
        (ExitCode.BOOT_TIMEOUT, 1),
        (ExitCode.BUILD_FAILED, 125),
        (ExitCode.INFRASTRUCTURE, 125),
        (ExitCode.USAGE, 128),
        (ExitCode.INTERRUPTED, 130),
        (99, BISECT_SKIP),
    ],
)
def test_every_exit_code_has_a_git_bisect_meaning(code: int, expected: int) -> None:
    assert bisect_exit_code(code) == expected


def test_every_exit_code_is_mapped_explicitly() -> None:
    from kernel_ci.core import errors

    assert set(errors._BISECT) == set(ExitCode)


@pytest.fixture
def history(tmp_path: Path) -> Path:
    """A kernel-like git tree with three commits: v1 good, v2, v3."""
    root = tmp_path / "linux"
    root.mkdir()
    (root / "Makefile").write_text("VERSION = 5\nPATCHLEVEL = 10\nSUBLEVEL = 223\n")
    (root / "Kconfig").write_text("")
    capture([*GIT, "init", "-q"], cwd=root)
    for number in (1, 2, 3):
        (root / "step").write_text(f"{number}\n")
        capture([*GIT, "add", "-A"], cwd=root)
        capture([*GIT, "commit", "-q", "-m", f"v{number}"], cwd=root)
        capture([*GIT, "tag", f"v{number}"], cwd=root)
    return root


def test_bisect_mode_follows_the_flag_and_the_tree_s_bisect_state(
    history: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = cli.parser().parse_args(["test", "--tree", str(history)])
    assert bisect_reason(args) is None
    assert bisect_exit(args, int(ExitCode.BUILD_FAILED)) == 10  # not bisecting: the plain code
    flagged = cli.parser().parse_args(["build", "--tree", str(history), "--bisect"])
    assert bisect_exit(flagged, int(ExitCode.BUILD_FAILED)) == 125
    capture([*GIT, "bisect", "start", "v3", "v1"], cwd=history)
    assert "BISECT_START" in (bisect_reason(args) or "")
    assert bisect_exit(args, int(ExitCode.TEST_FAILURE)) == 1
    assert "bisect mode" in capsys.readouterr().err  # the console is stderr: stdout stays for data


def test_a_usage_error_under_bisect_aborts_git_bisect(tmp_path: Path) -> None:
    """A bad command line fails every step the same way: exit >127, which stops `git bisect run`."""
    assert cli.main(["-o", str(tmp_path), "test", "--bisect", "--tree", str(tmp_path / "nope")]) == 128


def test_bisect_refuses_a_tree_it_cannot_bisect(history: Path, tmp_path: Path) -> None:
    with pytest.raises(flow.BisectError, match="not a commit"):
        flow.check_tree(history, "v0", "v3")
    (history / "step").write_text("dirty\n")
    with pytest.raises(flow.BisectError, match="uncommitted"):
        flow.check_tree(history, "v1", "v3")
    with pytest.raises(flow.BisectError, match="not the top of a git checkout"):
        flow.check_tree(tmp_path, "v1", "v3")


def test_bisect_finds_the_first_bad_commit_with_a_real_git_bisect_run(
    history: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver with a step command that reads the tree (the e2e test uses `kernel-ci test`)."""
    script = tmp_path / "step.sh"
    script.write_text('#!/bin/sh\ntest "$(cat step)" -lt 3\n')  # v3 is bad
    script.chmod(0o755)
    monkeypatch.setattr(flow, "step_command", lambda tree, output, args: [str(script)])
    result = flow.bisect(history, "v1", "v3", tmp_path / "out", [])
    assert result.first_bad == capture(["git", "rev-parse", "v3"], cwd=history).strip()
    assert result.subject == "v3"
    assert "git bisect start" in result.log
    assert capture(["git", "rev-parse", "HEAD"], cwd=history) == capture(
        ["git", "rev-parse", "v3"], cwd=history
    )
    assert not (history / ".git" / "BISECT_START").exists()  # reset afterwards
