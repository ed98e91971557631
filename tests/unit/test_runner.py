"""The guest runner (guest-tests/runner/kci-runner.py) run on the host with --no-reboot: real suites,
real process groups, real timeouts. Only insmod/rmmod are replaced (the host kernel is not ours to load
modules into) by a script that records its calls."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from kernel_ci.core import proc
from kernel_ci.core.paths import GUEST_RUNNER
from kernel_ci.guest.payload import PYTEST_ARGV, read_plan
from kernel_ci.guest.scanner import scan
from kernel_ci.report.model import GuestEnd, Outcome
from kernel_ci.report.verdict import collect

RUNNER = GUEST_RUNNER


def suite(
    name: str, argv: list[str], timeout: float = 10, modules: tuple[str, ...] = (), junit: bool = False
):
    return {
        "name": name,
        "language": "python" if junit else "c",
        "timeout": timeout,
        "modules": list(modules),
        "argv": argv,
        "workdir": f"suites/{name}",
        "junit": junit,
    }


def run_runner(
    tmp_path: Path, suites: list[dict], *extra: str, grace: float = 0.5, attempt: int | None = None
) -> proc.Result:
    payload = tmp_path / "payload"
    for entry in suites:
        (payload / entry["workdir"]).mkdir(parents=True, exist_ok=True)
    plan = payload / "plan.json"
    document: dict = {"kernel_release": "9.9.9-kci", "suites": suites}
    if attempt is not None:
        document["attempt"] = attempt
    plan.write_text(json.dumps(document))
    argv = [sys.executable, str(RUNNER), "--no-reboot", "--results", str(tmp_path / "results")]
    argv += ["--kill-grace", str(grace), *extra, str(plan)]
    return proc.run(argv, quiet=True, check=False, timeout=120)


def status(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "results" / name / "status.json").read_text())


def alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


def test_passing_suite_markers_output_env_and_status(tmp_path):
    script = (
        'echo "KTAP version 1"; echo "1..1"; echo "ok 1 env # $KCI_SUITE"; '
        'echo "$KCI_KERNEL_RELEASE $KCI_PAYLOAD $1" > "$KCI_ARTIFACTS/env.txt"; echo to-stderr >&2'
    )
    result = run_runner(tmp_path, [suite("ok-suite", ["sh", "-c", script, "sh", "$KCI_JUNIT"])])
    assert result.returncode == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "KCI-SUITE-START: ok-suite"
    assert "[ok-suite] ok 1 env # ok-suite" in lines
    assert "[ok-suite] to-stderr" in lines
    assert lines[-2].startswith("KCI-SUITE-END: ok-suite rc=0 seconds=")
    assert lines[-2].endswith("timed_out=0")
    assert lines[-1] == "KCI-RUNNER: done"
    results = tmp_path / "results" / "ok-suite"
    assert (results / "output.txt").read_text() == "KTAP version 1\n1..1\nok 1 env # ok-suite\nto-stderr\n"
    release, payload, junit = (results / "artifacts" / "env.txt").read_text().split()
    assert release == "9.9.9-kci"
    assert payload == str(tmp_path / "payload")
    assert junit == str(results / "junit.xml")  # argv expanded from the suite's environment
    assert status(tmp_path, "ok-suite") == {
        "name": "ok-suite",
        "rc": 0,
        "seconds": status(tmp_path, "ok-suite")["seconds"],
        "timed_out": False,
        "module_errors": [],
    }


@pytest.mark.parametrize(("attempt", "seen"), [(None, "0"), (0, "0"), (2, "2")])
def test_a_suite_sees_the_plan_s_attempt_number(tmp_path, attempt, seen):
    """$KCI_ATTEMPT: 0 for a run (also from a plan written before attempts existed), n for the n-th retry."""
    script = 'echo "KTAP version 1"; echo "1..1"; echo "ok 1 attempt-$KCI_ATTEMPT"'
    result = run_runner(tmp_path, [suite("attempt", ["sh", "-c", script])], attempt=attempt)
    assert result.returncode == 0, result.output
    assert f"[attempt] ok 1 attempt-{seen}" in result.output.splitlines()


def test_hanging_suite_is_killed_with_its_whole_process_group(tmp_path):
    hang = (
        "trap '' INT; echo $$ > \"$KCI_ARTIFACTS/shell.pid\"; "
        'sleep 300 & echo $! > "$KCI_ARTIFACTS/child.pid"; echo started; wait'
    )
    started = time.monotonic()
    result = run_runner(tmp_path, [suite("hangs", ["sh", "-c", hang], timeout=1), suite("after", ["true"])])
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.output
    assert elapsed < 20
    st = status(tmp_path, "hangs")
    assert st["timed_out"] is True
    assert st["rc"] == -9  # SIGINT was ignored, so SIGKILL after the grace period
    assert 1.0 <= st["seconds"] < 10
    assert "KCI-SUITE-END: hangs rc=-9" in result.output and "timed_out=1" in result.output
    assert "[hangs] started" in result.output
    artifacts = tmp_path / "results" / "hangs" / "artifacts"
    for name in ("shell.pid", "child.pid"):
        pid = int((artifacts / name).read_text())
        deadline = time.monotonic() + 5
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), f"{name} {pid} survived the suite timeout"
    assert status(tmp_path, "after")["rc"] == 0  # the next suite still ran


def test_suite_that_closes_its_output_is_not_cut_short(tmp_path):
    script = 'exec >/dev/null 2>&1; sleep 1; echo finished > "$KCI_ARTIFACTS/done.txt"'
    result = run_runner(tmp_path, [suite("quiet", ["sh", "-c", script], timeout=20)])
    assert result.returncode == 0, result.output
    assert (tmp_path / "results" / "quiet" / "artifacts" / "done.txt").read_text() == "finished\n"
    assert status(tmp_path, "quiet")["timed_out"] is False


def test_leftover_background_process_does_not_block_and_is_killed(tmp_path):
    script = 'sleep 300 & echo $! > "$KCI_ARTIFACTS/bg.pid"; echo bye'
    started = time.monotonic()
    result = run_runner(tmp_path, [suite("leaves", ["sh", "-c", script], timeout=60)])
    assert time.monotonic() - started < 20
    assert result.returncode == 0
    assert status(tmp_path, "leaves")["rc"] == 0
    pid = int((tmp_path / "results" / "leaves" / "artifacts" / "bg.pid").read_text())
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def test_missing_program_is_exit_127(tmp_path):
    result = run_runner(tmp_path, [suite("nothing", ["./does-not-exist"])])
    assert result.returncode == 0
    assert status(tmp_path, "nothing")["rc"] == 127
    assert "cannot start ./does-not-exist" in (tmp_path / "results" / "nothing" / "output.txt").read_text()


def fake_modutil(tmp_path: Path, name: str, fail_on: str = "") -> str:
    """A stand-in for insmod/rmmod that records its argument and fails for one target."""
    log = tmp_path / "modules.log"
    script = tmp_path / name
    script.write_text(
        f'#!/bin/sh\necho "{name} $1" >> {log}\n'
        f'case "$1" in *{fail_on or "@never@"}*)\n'
        f'  echo "{name}: ERROR: could not insert: Invalid module format" >&2; exit 1;;\nesac\n'
    )
    script.chmod(0o755)
    return str(script)


def test_modules_loaded_before_and_unloaded_after_in_reverse(tmp_path):
    insmod, rmmod = fake_modutil(tmp_path, "insmod"), fake_modutil(tmp_path, "rmmod")
    modules = ("modules/kci_smoke.ko", "modules/kci-other.ko")
    script = f"cat {tmp_path / 'modules.log'}"
    result = run_runner(
        tmp_path, [suite("mods", ["sh", "-c", script], modules=modules)], "--insmod", insmod, "--rmmod", rmmod
    )
    assert result.returncode == 0, result.output
    payload = tmp_path / "payload"
    assert (tmp_path / "modules.log").read_text().splitlines() == [
        f"insmod {payload}/modules/kci_smoke.ko",
        f"insmod {payload}/modules/kci-other.ko",
        "rmmod kci_other",
        "rmmod kci_smoke",
    ]
    # the suite ran after both loads and before any unload
    assert (tmp_path / "results" / "mods" / "output.txt").read_text().count("insmod") == 2
    assert status(tmp_path, "mods")["module_errors"] == []


def test_module_load_failure_skips_the_suite(tmp_path):
    insmod = fake_modutil(tmp_path, "insmod", fail_on="bad")
    rmmod = fake_modutil(tmp_path, "rmmod")
    modules = ("modules/good.ko", "modules/bad.ko")
    marker = tmp_path / "ran"
    result = run_runner(
        tmp_path,
        [suite("mods", ["touch", str(marker)], modules=modules)],
        "--insmod",
        insmod,
        "--rmmod",
        rmmod,
    )
    assert result.returncode == 0
    st = status(tmp_path, "mods")
    assert st["rc"] is None
    assert len(st["module_errors"]) == 1 and "Invalid module format" in st["module_errors"][0]
    assert not marker.exists()
    assert (tmp_path / "modules.log").read_text().splitlines()[-1] == "rmmod good"  # what loaded is unloaded
    assert "KCI-SUITE-END: mods rc=none" in result.output


def test_insmod_replacement_from_the_environment(tmp_path):
    insmod = fake_modutil(tmp_path, "insmod", fail_on="kci_smoke")
    os.environ["KCI_RUNNER_INSMOD"] = insmod
    try:
        run_runner(tmp_path, [suite("envmod", ["true"], modules=("modules/kci_smoke.ko",))])
    finally:
        del os.environ["KCI_RUNNER_INSMOD"]
    assert "Invalid module format" in status(tmp_path, "envmod")["module_errors"][0]


def test_unreadable_plan_crashes_loudly(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text("{broken")
    result = proc.run([sys.executable, str(RUNNER), "--no-reboot", str(plan)], quiet=True, check=False)
    assert result.returncode == 1
    assert "KCI-RUNNER: crashed" in result.output
    assert "KCI-RUNNER: done" not in result.output
    assert "JSONDecodeError" in (scan(result.output).runner_error or "")


PYTEST_SLOW = """\
import time

def test_quick():
    pass

def test_forever():
    time.sleep(120)
"""


@pytest.mark.parametrize("preload", ["0", "1"], ids=["exec", "forked"])
def test_pytest_timeout_keeps_the_finished_results(tmp_path, monkeypatch, preload):
    """SIGINT first: pytest still writes junit.xml with the tests that finished; the report shows both.
    The same whether pytest runs as its own process or forked from a runner that imported it (warm start)."""
    # As in the guest (no plugins there): the host venv's plugins (hypothesis, schemathesis) would make
    # pytest's start-up slow enough under load to reach the timeout before the tests run.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("KCI_RUNNER_PRELOAD", preload)
    payload = tmp_path / "payload" / "suites" / "py"
    payload.mkdir(parents=True)
    (payload / "test_slow.py").write_text(PYTEST_SLOW)
    entry = suite("py", [*PYTEST_ARGV, "test_slow.py"], timeout=10, junit=True)
    result = run_runner(tmp_path, [entry], grace=10)
    assert result.returncode == 0, result.output
    st = status(tmp_path, "py")
    assert st["timed_out"] is True and st["rc"] == 2  # pytest's "interrupted", not a SIGKILL
    assert (tmp_path / "results" / "py" / "junit.xml").is_file()
    console = "KCI-INIT: ready\n" + result.output
    report = collect(
        read_plan(tmp_path / "payload" / "plan.json"),
        tmp_path / "results",
        scan(console),
        GuestEnd("poweroff"),
    )
    cases = {case.name: case for suite in report.suites for case in suite.cases if suite.name == "py"}
    assert cases["test_quick"].state == "passed"
    assert cases["py"].state == "error"
    assert cases["py"].message.startswith("suite timed out after 10s")
    assert "KeyboardInterrupt" in cases["py"].detail
    assert report.outcome is Outcome.TEST_FAILURE


def test_unwritable_results_still_print_both_markers(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the results folder should be")
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "plan.json").write_text(json.dumps({"kernel_release": "x", "suites": [suite("a", ["true"])]}))
    argv = [sys.executable, str(RUNNER), "--no-reboot", "--results", str(blocker), str(payload / "plan.json")]
    result = proc.run(argv, quiet=True, check=False)
    report = scan("KCI-INIT: ready\n" + result.output)
    (span,) = report.suites
    assert span.ended and span.rc is None
    assert "KCI-RUNNER: suite a failed: NotADirectoryError" in result.output
    assert report.runner_done_line is not None


# A stand-in for a kselftest_harness binary, as the harness does it: print "RUN <case>", fork the case into
# its own process group, alarm(), waitpid(); SIGALRM kills the case and reports the timeout. The processes
# are named like the binary (prctl), as a real vmaccess and its forked case are.
FAKE_HARNESS = """\
import ctypes, os, signal, sys, time
ctypes.CDLL(None).prctl(15, b"vmaccess", 0, 0, 0)
print("# #  RUN           global.attach ...", flush=True)
child = os.fork()
if child == 0:
    os.setpgrp()
    time.sleep(60)  # the attach that never returns
    os._exit(0)
def timeout(sig, frame):
    os.killpg(child, signal.SIGKILL)
    print("# # attach: Test terminated by timeout", flush=True)
signal.signal(signal.SIGALRM, timeout)
signal.alarm(20)  # the harness's own timeout
os.waitpid(child, 0)
print("# #          FAIL  global.attach", flush=True)
sys.exit(1)
"""


def test_a_case_timeout_fires_the_harness_timeout_early(tmp_path):
    """expected-failures.toml's timeout: the runner sends the harness SIGALRM after 1 s, not its own 20 s;
    the harness reports the case terminated by timeout as it would have after 20 s."""
    script = tmp_path / "harness.py"
    script.write_text(FAKE_HARNESS)
    entry = suite("kst", [sys.executable, str(script)], timeout=60)
    entry["case_timeouts"] = [{"binary": "vmaccess", "case": "global.attach", "seconds": 1}]
    result = run_runner(tmp_path, [entry])
    assert result.returncode == 0, result.output
    output = (tmp_path / "results" / "kst" / "output.txt").read_text()
    assert "Test terminated by timeout" in output and "FAIL  global.attach" in output
    assert "global.attach: the harness timeout fired after 1 s" in result.output
    done = status(tmp_path, "kst")
    assert done["rc"] == 1 and not done["timed_out"]
    assert done["seconds"] < 10  # the harness's own alarm is 20 s


def test_a_case_timeout_for_another_case_changes_nothing(tmp_path):
    script = tmp_path / "harness.py"
    script.write_text(FAKE_HARNESS.replace("signal.alarm(20)", "signal.alarm(2)"))
    entry = suite("kst", [sys.executable, str(script)], timeout=60)
    entry["case_timeouts"] = [{"binary": "vmaccess", "case": "global.other", "seconds": 0.1}]
    result = run_runner(tmp_path, [entry])
    assert "harness timeout fired" not in result.output
    assert status(tmp_path, "kst")["seconds"] >= 2


def test_runner_options_take_their_value_after_equals_too(tmp_path: Path) -> None:
    """The hand-written command line (argparse cost ~0.1 s under TCG): `--results=DIR` as `--results DIR`."""
    payload = tmp_path / "payload"
    (payload / "suites" / "one").mkdir(parents=True)
    plan = payload / "plan.json"
    plan.write_text(json.dumps({"kernel_release": "9.9.9-kci", "suites": [suite("one", ["true"])]}))
    argv = [sys.executable, str(RUNNER), f"--results={tmp_path / 'elsewhere'}", "--kill-grace=0.5", str(plan)]
    result = proc.run(argv, quiet=True, check=False, timeout=60, env={"KCI_RUNNER_NO_REBOOT": "1"})
    assert result.returncode == 0, result.output
    assert json.loads((tmp_path / "elsewhere" / "one" / "status.json").read_text())["rc"] == 0


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--bogus", "plan.json"], "unknown option --bogus"),
        (["--no-reboot"], "one plan.json expected"),
        (["--no-reboot", "a.json", "b.json"], "unexpected arguments"),
        (["--no-reboot", "--kill-grace", "soon", "plan.json"], "not a number"),
        (["--no-reboot", "plan.json", "--results"], "--results needs a value"),
    ],
)
def test_runner_refuses_a_bad_command_line(tmp_path: Path, args: list[str], why: str) -> None:
    result = proc.run([sys.executable, str(RUNNER), *args], quiet=True, check=False, timeout=60)
    assert result.returncode == 2
    assert why in result.output and "usage: kci-runner.py" in result.output
    assert "KCI-RUNNER" not in result.output  # refused before it ran anything


def test_runner_makes_the_dev_links_udev_would(tmp_path: Path) -> None:
    """As PID 1 the runner links /dev/fd and the standard streams (kci-init no longer spends four `ln`
    processes on them); an existing entry is left as it is."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kci_runner_under_test", RUNNER)
    assert spec is not None and spec.loader is not None
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    (tmp_path / "stdin").write_text("already here\n")
    runner.dev_links(str(tmp_path))
    runner.dev_links(str(tmp_path))  # again: nothing to do, no error
    assert os.readlink(tmp_path / "fd") == "/proc/self/fd"
    assert os.readlink(tmp_path / "stdout") == "/proc/self/fd/1"
    assert os.readlink(tmp_path / "stderr") == "/proc/self/fd/2"
    assert (tmp_path / "stdin").read_text() == "already here\n"


def test_suites_run_without_pytest_plugin_autoload(tmp_path: Path) -> None:
    """The rootfs has no pytest plugin: the runner spares each Python suite pytest's entry-point search."""
    script = 'echo "autoload=$PYTEST_DISABLE_PLUGIN_AUTOLOAD"'
    result = run_runner(tmp_path, [suite("env", ["sh", "-c", script])])
    assert result.returncode == 0, result.output
    assert "autoload=1" in (tmp_path / "results" / "env" / "output.txt").read_text()


FORKED_SUITE = """\
import os
import sys

import helper


def test_runs_forked_in_its_own_world():
    with open(os.environ["KCI_ARTIFACTS"] + "/seen.txt", "w") as out:
        out.write(f"{' '.join(sys.orig_argv)}\\n{os.getcwd()}\\n{os.environ['KCI_SUITE']}\\n")
        out.write(f"{os.getsid(0) == os.getpid()}\\n{helper.VALUE}\\n{sys.dont_write_bytecode}\\n")
    print("hello from the forked suite")


def test_fails():
    assert helper.VALUE == 2
"""


def test_preloaded_runner_forks_python_suites_that_behave_as_their_own_process(tmp_path, monkeypatch):
    """With pytest imported (warm start), a Python suite is a fork of the runner, not `python3 -m pytest`:
    the runner's command line is the suite's, yet it runs in the suite's folder, session and environment,
    imports modules beside it, writes no .pyc, and its output, junit.xml and exit status come back."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("KCI_RUNNER_PRELOAD", "1")
    folder = tmp_path / "payload" / "suites" / "py"
    folder.mkdir(parents=True)
    (folder / "test_forked.py").write_text(FORKED_SUITE)
    (folder / "helper.py").write_text("VALUE = 1\n")
    result = run_runner(tmp_path, [suite("py", [*PYTEST_ARGV, "test_forked.py"], junit=True)])
    assert result.returncode == 0, result.output
    assert status(tmp_path, "py")["rc"] == 1  # one test failed
    argv, cwd, name, own_session, value, no_pyc = (
        (tmp_path / "results" / "py" / "artifacts" / "seen.txt").read_text().splitlines()
    )
    assert "kci-runner.py" in argv  # forked from the runner
    assert (cwd, name, own_session, value, no_pyc) == (str(folder), "py", "True", "1", "True")
    assert not (folder / "__pycache__").exists()
    junit = (tmp_path / "results" / "py" / "junit.xml").read_text()
    assert 'failures="1"' in junit and "test_runs_forked_in_its_own_world" in junit
    assert "1 failed, 1 passed" in (tmp_path / "results" / "py" / "output.txt").read_text()
