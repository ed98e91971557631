"""`kernel-ci` exits with the code of what went wrong: usage 2, build 10, infrastructure 7 (a bug too, with
the path of its traceback), never a bare traceback and 1 (which reads as a failed test)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_ci.cli import main as cli
from kernel_ci.core.errors import ExitCode
from kernel_ci.host import setup as hostsetup
from kernel_ci.report import junit
from kernel_ci.report.model import RunReport

REPO = Path(__file__).resolve().parents[2]


def _kernel_dir(tmp_path: Path) -> Path:
    """A directory shaped like a build output (what --kernel-dir is checked for up front)."""
    kernel_dir = tmp_path / "build"
    kernel_dir.mkdir()
    (kernel_dir / "bzImage").write_bytes(b"")
    (kernel_dir / "metadata.json").write_text("{}")
    return kernel_dir


def test_a_bad_option_exits_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["-o", str(tmp_path), "build", "--jobs", "many"])
    assert caught.value.code == 2


def test_an_unknown_kernel_exits_2_before_anything_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["-o", str(tmp_path), "build", "--kernel", "9.99-nonexistent"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "9.99-nonexistent" in err and "known:" in err and "Traceback" not in err
    assert not (tmp_path / "build").exists()  # nothing started
    assert cli.main(["-o", str(tmp_path), "test", "--kernel", "9.99-nonexistent"]) == ExitCode.USAGE


@pytest.mark.parametrize("shape", ["missing", "not-a-build", "a-file"])
def test_a_wrong_kernel_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], shape: str) -> None:
    target = tmp_path / "typo"
    if shape == "not-a-build":
        target.mkdir()
        (target / "bzImage").write_bytes(b"")  # no metadata.json: a kernel tree, not kernel-ci's output
    elif shape == "a-file":
        target.write_text("")
    assert cli.main(["-o", str(tmp_path / "out"), "test", "--kernel-dir", str(target)]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "--kernel-dir" in err and "Traceback" not in err


def test_an_unknown_suite_exits_2_before_anything_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["-o", str(tmp_path), "test", "--suite", "no-such-suite", "--kernel", "6.1"])
    assert code == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "unknown suite(s) no-such-suite" in err and "smoke-c" in err  # says which exist
    assert not (tmp_path / "build").exists()


def test_repro_of_a_directory_that_is_no_run_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["-o", str(tmp_path), "repro", str(tmp_path / "nothing-here")]) == ExitCode.USAGE
    assert "no run.json" in capsys.readouterr().err


def test_an_unreadable_matrix_file_is_a_usage_error(tmp_path: Path) -> None:
    """Not UTF-8: was an internal error (UnicodeDecodeError escaped), now the file's fault, exit 2."""
    bad = tmp_path / "matrix.toml"
    bad.write_bytes(b"\xff\xfe kernels = []")
    assert cli.main(["-o", str(tmp_path), "matrix", "--file", str(bad)]) == ExitCode.USAGE


def _path_without(command: str, tmp_path: Path) -> str:
    """A PATH holding every command `kernel-ci test` checks for but one (links to the real ones)."""
    shims = tmp_path / "bin"
    shims.mkdir()
    for name in hostsetup.TEST_PACKAGES:
        real = shutil.which(name) or next(
            (p for p in (Path("/usr/sbin", name), Path("/sbin", name)) if p.exists()), None
        )
        if name != command and real is not None:
            (shims / name).symlink_to(real)
    return str(shims)


def test_qemu_missing_in_test_exits_7_not_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A host without QEMU is infrastructure (7): the run must not read as a failed test (1) or a failed
    build (10, what every error exited with before)."""
    if not Path("/usr/bin/qemu-system-x86_64").exists() and shutil.which("qemu-system-x86_64") is None:
        pytest.skip("no QEMU on this host to take away")
    env = {**os.environ, "PATH": _path_without("qemu-system-x86_64", tmp_path), "KERNEL_CI_NO_INSTALL": "1"}
    argv = [sys.executable, "-m", "kernel_ci.cli.main", "-o", str(tmp_path / "out"), "test"]
    done = subprocess.run(
        [*argv, "--kernel-dir", str(_kernel_dir(tmp_path))], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == ExitCode.INFRASTRUCTURE, done.stderr
    assert "qemu-system-x86" in done.stderr and "Traceback" not in done.stderr


def _a_bug(path: Path) -> RunReport:
    raise ZeroDivisionError("a bug in kernel-ci itself")


def test_an_unexpected_exception_exits_7_with_the_log_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug (an exception that is not ours) is injected into a real command: 7, one line, the log."""
    monkeypatch.setattr(junit, "read_report", _a_bug)
    out = tmp_path / "out"
    assert cli.main(["-o", str(out), "summary", str(tmp_path / "junit.xml")]) == ExitCode.INFRASTRUCTURE
    err = capsys.readouterr().err
    log = out / cli.ERROR_LOG
    assert f"internal error: ZeroDivisionError: a bug in kernel-ci itself; traceback in {log}" in " ".join(
        err.split()
    )
    assert "Traceback" not in err
    text = log.read_text()
    assert text.startswith("Traceback") and "_a_bug" in text and "ZeroDivisionError" in text


def test_an_unexpected_exception_without_a_writable_output_still_leaves_its_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(junit, "read_report", _a_bug)
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # --output below a regular file cannot be created
    code = cli.main(["-o", str(blocker / "out"), "summary", str(tmp_path / "junit.xml")])
    assert code == ExitCode.INFRASTRUCTURE
    err = " ".join(capsys.readouterr().err.split())
    logged = Path(err.split("traceback in ", 1)[1].split()[0])
    try:
        assert "ZeroDivisionError" in logged.read_text()
    finally:
        logged.unlink(missing_ok=True)


def test_an_unexpected_exception_in_a_real_process_prints_no_traceback(tmp_path: Path) -> None:
    """The same through a real interpreter and its real stderr (no capture fixture in between)."""
    driver = (
        "import sys\n"
        "from kernel_ci.report import junit\n"
        "def bug(path): raise KeyError('not ours')\n"
        "junit.read_report = bug\n"
        "from kernel_ci.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", driver, "-o", str(out), "summary", str(tmp_path / "j.xml")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == ExitCode.INFRASTRUCTURE
    assert "internal error: KeyError" in done.stderr and "Traceback" not in done.stderr
    assert "KeyError" in (out / cli.ERROR_LOG).read_text()


def test_interrupted_exits_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(path: Path) -> RunReport:
        raise KeyboardInterrupt

    monkeypatch.setattr(junit, "read_report", interrupted)
    assert cli.main(["-o", str(tmp_path), "summary", str(tmp_path / "j.xml")]) == 130


def test_a_relative_cache_root_is_taken_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KERNEL_CI_CACHE=.cache (or a relative XDG_CACHE_HOME) gave relative paths to the builder's bind
    mounts, which Docker refuses ("expected /HOST:/GUEST"): the root is made absolute where it is read."""
    from kernel_ci.core.settings import default_cache_root

    monkeypatch.chdir(tmp_path)
    assert default_cache_root({"KERNEL_CI_CACHE": "rel"}) == tmp_path / "rel"
    assert default_cache_root({"XDG_CACHE_HOME": "xdg"}) == tmp_path / "xdg" / "kernel-ci"
    assert default_cache_root({"KERNEL_CI_CACHE": "/abs/cache"}) == Path("/abs/cache")
