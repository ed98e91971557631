"""The typed records between stages that the report stage owns or reads: one JSON round trip each, and a
clear error for a file this kernel-ci did not write (RunRecord, Plan, PatchRejection, the digest helper)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from kernel_ci.build.records import PatchRejection, RecordError
from kernel_ci.core.digest import file_digest, sha256_file
from kernel_ci.core.paths import GUEST_INIT, GUEST_RUNNER
from kernel_ci.guest import protocol
from kernel_ci.guest.protocol import EndKind, Plan, PlanSuite
from kernel_ci.guest.scanner import scan
from kernel_ci.report import junit
from kernel_ci.report.model import Case, Outcome, RootfsRef, RunRecord, RunRecordError, RunReport, SuiteResult


def record() -> RunRecord:
    return RunRecord(
        created="20261204T170000",
        build_key="ab" * 32,
        kernel_dir="/out/kernel",
        kernel={"version": "5.10.223", "requested": "5.10", "fallbacks": ["5.10.224: not found"]},
        reproduce_build="kernel-ci build --kernel 5.10",
        rootfs=RootfsRef("cd" * 32, "/cache/rootfs.ext4"),
        suites=("smoke-c", "smoke-py"),
        options={"memory": "1024M", "cpus": 2, "keep_overlay": False, "suites": None},
        accelerator="tcg",
        qemu_command=("qemu-system-x86_64", "-kernel", "/out/kernel/bzImage"),
        overlay=None,
        payload="/out/runs/x/payload",
        outcome="KERNEL_OOPS",
        exit_code=3,
        guest_end=str(EndKind.POWEROFF),
        seconds=12.5,
        boot_seconds=1.25,
        first_test_seconds=None,
    )


def test_run_record_round_trips_through_run_json(tmp_path: Path) -> None:
    written = record()
    path = written.write(tmp_path)
    assert path == tmp_path / "run.json" and not list(tmp_path.glob(".*tmp"))
    assert RunRecord.read(tmp_path) == written
    assert RunRecord.from_json(written.to_json()) == written
    assert written.outcome_value() is Outcome.KERNEL_OOPS


def test_run_json_keeps_the_keys_its_readers_use() -> None:
    """The e2e tests, the CI workflow and people read run.json by these names."""
    data = json.loads(record().to_json())
    assert data["schema"] == 1 and data["rootfs"] == {"key": "cd" * 32, "path": "/cache/rootfs.ext4"}
    for key in ("build_key", "outcome", "exit_code", "guest_end", "first_test_seconds", "qemu_command"):
        assert key in data
    assert data["guest_end"] == "poweroff" and data["qemu_command"][0] == "qemu-system-x86_64"


def test_the_record_before_the_guest_ran_round_trips_too() -> None:
    before = RunRecord(**{**record().__dict__, "accelerator": "", "outcome": "", "exit_code": None})
    assert RunRecord.from_json(before.to_json()) == before
    assert before.outcome_value() is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("build_key"), "missing build_key"),
        (lambda d: d.update(surprise=1), "unknown surprise"),
        (lambda d: d.update(schema=7), "schema 7"),
        (lambda d: d.update(exit_code="3"), "exit_code is not an integer"),
        (lambda d: d.update(suites="smoke-c"), "list of strings"),
        (lambda d: d.update(rootfs={"key": "x"}), "wrong type"),
        (lambda d: d.update(seconds=True), "seconds is not a number"),
    ],
)
def test_a_run_json_it_did_not_write_is_a_clear_error(change, message: str) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(record().to_json())
    change(data)
    with pytest.raises(RunRecordError, match=message):
        RunRecord.from_json(json.dumps(data), "out/latest/run.json")


def test_no_run_json_and_not_json(tmp_path: Path) -> None:
    with pytest.raises(RunRecordError, match="is not a kernel-ci test run"):
        RunRecord.read(tmp_path)
    (tmp_path / "run.json").write_text("{")
    with pytest.raises(RunRecordError, match="not JSON"):
        RunRecord.read(tmp_path)
    assert RunRecord.beside(tmp_path / "junit.xml") is None  # a summary without it still works


def test_the_summary_reads_the_outcome_from_the_run_json_beside_the_report(tmp_path: Path) -> None:
    report = RunReport(Outcome.KERNEL_OOPS, [SuiteResult("s", [Case("a", "s", "failed", message="m")])])
    path = junit.write_junit(report, tmp_path / "runs" / "r" / "junit.xml")
    assert junit.read_report(path).outcome is None
    record().write(path.parent)
    assert junit.read_report(path).verdict == "KERNEL_OOPS (exit 3)"


def test_plan_round_trips_through_plan_json(tmp_path: Path) -> None:
    plan = Plan(
        "5.10.223-kci",
        (
            PlanSuite("smoke-c", "c", 60, ("modules/kci_smoke.ko",), ("./smoke-c",), "suites/smoke-c", False),
            PlanSuite(
                "net",
                "kselftest",
                300,
                (),
                ("sh", "./kci-kselftest.sh"),
                "suites/net",
                False,
                (("t1", "why"),),
            ),
        ),
    )
    protocol.write_plan(plan, tmp_path / "plan.json")
    assert protocol.read_plan(tmp_path / "plan.json") == plan
    bad = json.loads((tmp_path / "plan.json").read_text())
    bad["suites"][0]["language"] = "rust"
    (tmp_path / "plan.json").write_text(json.dumps(bad))
    with pytest.raises(protocol.PlanError, match="unknown language 'rust'"):
        protocol.read_plan(tmp_path / "plan.json")


def test_patch_rejection_round_trips_and_refuses_another_layout() -> None:
    rejection = PatchRejection(
        "ci-smoke", "0001-x.patch", "init/main.c", ("init/main.c: hunk #1 FAILED at line 3",), "rebase", None
    )
    assert PatchRejection.from_json(rejection.to_json()) == rejection
    assert PatchRejection.from_json(replace(rejection, tree="/src/linux").to_json()).tree == "/src/linux"
    data = json.loads(rejection.to_json())
    del data["problems"]
    with pytest.raises(RecordError, match="missing problems"):
        PatchRejection.from_json(json.dumps(data))


def test_the_console_markers_are_the_ones_the_guest_prints() -> None:
    """The guest prints these literally (kci-init, kci-runner.py); the scanner reads them via protocol."""
    sources = GUEST_INIT.read_text() + GUEST_RUNNER.read_text()
    for marker in (protocol.INIT_READY, protocol.SUITE_START, protocol.SUITE_END, protocol.RUNNER_DONE):
        assert marker in sources
    for word in (protocol.WARM_ARG, protocol.WARM_READY, protocol.GO_PREFIX):  # warm start's, the runner's
        assert f'"{word}"' in GUEST_RUNNER.read_text() or f'b"{word} "' in GUEST_RUNNER.read_text()
    found = scan(f"{protocol.INIT_READY}\n{protocol.SUITE_START} a\n{protocol.RUNNER_DONE}\n")
    assert found.init_ready_line == 1 and found.suites[0].name == "a" and found.runner_done_line == 3


def test_one_sha256_of_a_file(tmp_path: Path) -> None:
    data = b"x" * (3 << 20) + b"tail"  # more than one chunk
    path = tmp_path / "f"
    path.write_bytes(data)
    assert file_digest(path) == (hashlib.sha256(data).hexdigest(), len(data))
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_the_cache_service_reads_a_report_through_report_junit() -> None:
    from kernel_ci.cache.server.service import parse_junit

    report = RunReport(
        Outcome.TEST_FAILURE,
        [
            SuiteResult("boot", [Case("boot", "boot", "passed", 0.5)]),
            SuiteResult("s", [Case("a", "s", "failed", message="m"), Case("b", "s", "skipped", message="n")]),
        ],
    )
    read = parse_junit(junit.to_junit(report).encode())
    assert read["counts"] == {"tests": 3, "passed": 1, "failed": 1, "errors": 0, "skipped": 1}
    assert [(c["suite"], c["name"], c["status"], c["message"]) for c in read["cases"]] == [
        ("boot", "boot", "passed", ""),
        ("s", "a", "failed", "m"),
        ("s", "b", "skipped", "n"),
    ]
    assert "not a JUnit report" in parse_junit(b"<html/>")["junit_error"]


def test_the_cache_service_refuses_a_report_with_entities() -> None:
    """An uploaded report is a client's bytes: an entity (harmless here, a file or a billion laughs
    elsewhere) is refused before any parsing, wherever the declaration is."""
    from kernel_ci.cache.server.service import parse_junit

    padding = b"<!-- " + b"x" * 8192 + b" -->"
    entity = (
        b'<?xml version="1.0"?>' + padding + b'<!DOCTYPE t [<!ENTITY e "expanded">]>'
        b'<testsuites><testsuite name="s"><testcase name="&e;"/></testsuite></testsuites>'
    )
    assert "refused" in parse_junit(entity)["junit_error"]
