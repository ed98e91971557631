"""A hostile guest, for real: suites that, as root in a real QEMU guest, try to reach the host through the
results share and the console. The host must end with a well-formed, failed report that contains none of
its own files, and with nothing on its disk that a guest could use later (no symlink, device, FIFO,
setuid or executable file, no security./trusted. xattr) and nothing written outside the results share.

tests/unit/test_guest_limits.py checks the host readers against the same tricks made by hand; this file
checks what the 9p share itself lets a guest create on the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from junitparser import JUnitXml

from kernel_ci.guest import qemu, rootfs, scanner
from kernel_ci.guest.payload import read_plan
from kernel_ci.report import junit as report_junit
from kernel_ci.report import model, verdict
from tests.e2e.test_guest_boot import accel, base_image, bzimage, guest_config, make_payload, shell_suite

__all__ = ["accel", "base_image", "bzimage"]  # fixtures, imported for pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SECRET = "host-secret-5d0a7e: never in a report"
CONSOLE_LIMIT = 256 * 1024  # the test's console.log cap (the default is qemu.CONSOLE_LOG_LIMIT)
FLOOD_BYTES = 2 * 2**20  # what the flood suite prints (bounded: TCG's UART takes a while)

# $SECRET is the host path of the secret file (the guest cannot open it: a symlink to it is only text
# in the guest, but a host that followed it would read the host's file).
LEAK = r"""
set -x
R=/kci-results/$KCI_SUITE; A=$KCI_ARTIFACTS
ln -s "$SECRET" "$A/leak.txt"
ln -s "$SECRET_DIR" "$A/hostdir"
ln -s /dev/zero "$A/zero-link"
mknod "$A/zero" c 1 5
mknod "$A/disk" b 254 0
mkfifo "$A/pipe"
cp /bin/dash "$A/suid-sh" && chown 0:0 "$A/suid-sh" && chmod 4755 "$A/suid-sh"
cp /bin/dash "$A/sgid-sh" && chmod 2755 "$A/sgid-sh"
python3 -c 'import os, struct, sys
os.setxattr(sys.argv[1], "security.capability", struct.pack("<5I", 0x02000001, 1 << 7, 0, 0, 0))
' "$A/suid-sh" && echo CAPABILITY-SET
touch "$A/$(printf 'bell\a')" "$A/$(printf 'esc\033[31m')" "$A/$(printf 'new\nline')"
echo real > "$A/real.txt"
python3 -c 'import os, sys; os.setxattr(sys.argv[1], "trusted.overlay.opaque", b"y")' "$A/real.txt" \
    && echo TRUSTED-XATTR-SET
ls -la "$A"
echo "KTAP version 1"; echo "1..1"; echo "ok 1 decoy"
rm -f "$R/output.txt" && ln -s "$SECRET" "$R/output.txt"
"""
FIFO = r"""
R=/kci-results/$KCI_SUITE
echo "KTAP version 1"; echo "1..1"; echo "ok 1 decoy"
rm -f "$R/output.txt" && mkfifo "$R/output.txt"
mkfifo "$R/junit.xml"
"""
ZERO = r"""
R=/kci-results/$KCI_SUITE
rm -f "$R/output.txt" && ln -s /dev/zero "$R/output.txt"
"""
DIRLINK = r"""
R=/kci-results/$KCI_SUITE
echo "KTAP version 1"; echo "1..1"; echo "ok 1 decoy"
cd / && mv "$R" "$R.moved" && ln -s "$SECRET_DIR" "$R"
"""
DEEP = r"""
python3 -c '
print("KTAP version 1"); print("1..1")
for n in range(1, 3000): print("  " * n + "KTAP version 1")
for n in reversed(range(1, 3000)): print("  " * n + "ok 1 level%d" % n)
print("ok 1 top")'
"""
FLOOD = rf"""
for n in $(seq 1 400); do echo "WARNING: fake kernel report $n" > /dev/kmsg; done
head -c {FLOOD_BYTES} /dev/zero | tr '\0' A | fold -w 200
echo "KTAP version 1"; echo "1..1"; echo "ok 1 flooded"
"""


def _c_suite(name: str, script: str, secret: Path) -> dict:
    env = f'SECRET="{secret}" SECRET_DIR="{secret.parent}"; '
    return shell_suite(name, env + script, timeout=300)


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(os.fsencode(path.relative_to(root)))
        if path.is_file() and not path.is_symlink():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _dangerous(results_dir: Path) -> list[str]:
    """Every entry the guest left on the host that is not a plain file or directory, or that is
    setuid/setgid/executable, or that carries a file capability."""
    found = []
    for dirpath, dirnames, filenames in os.walk(results_dir):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            if kind not in (stat.S_IFREG, stat.S_IFDIR):
                found.append(f"{path}: {stat.filemode(st.st_mode)}")
            elif st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                found.append(f"{path}: set-id {stat.filemode(st.st_mode)} uid={st.st_uid}")
            elif kind == stat.S_IFREG and st.st_mode & 0o111:
                found.append(f"{path}: executable {stat.filemode(st.st_mode)}")
            if kind != stat.S_IFLNK:
                privileged = [x for x in os.listxattr(path) if x.startswith(("security.", "trusted."))]
                if privileged:
                    found.append(f"{path}: privileged xattrs {privileged}")
    return found


def test_a_hostile_guest_cannot_reach_the_host(
    tmp_path: Path, bzimage: Path, base_image: rootfs.RootfsImage, accel: qemu.Accel
) -> None:
    secret = tmp_path / "host-only" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text(SECRET + "\n")
    (secret.parent / "output.txt").write_text(f"KTAP version 1\n1..1\nok 1 {SECRET.replace(':', '')}\n")
    suites = [
        _c_suite("leak", LEAK, secret),
        _c_suite("fifo", FIFO, secret),
        _c_suite("zero", ZERO, secret),
        _c_suite("dirlink", DIRLINK, secret),
        _c_suite("deep", DEEP, secret),
        _c_suite("flood", FLOOD, secret),
    ]
    payload = make_payload(tmp_path / "payload", suites)
    payload_before = _tree_digest(payload)
    host_only_before = _tree_digest(secret.parent)
    cfg = replace(guest_config(tmp_path, bzimage, base_image, accel, payload), console_limit=CONSOLE_LIMIT)
    live = scanner.ConsoleScanner()
    run = qemu.run_guest(cfg, live.feed)
    live.finish()
    assert run.end == "poweroff", run.detail

    # The share: nothing the guest made is a real symlink/device/FIFO/set-id/executable on the host.
    assert _dangerous(cfg.results_dir) == []
    # Nothing written outside the results share.
    assert _tree_digest(payload) == payload_before
    assert _tree_digest(secret.parent) == host_only_before

    # The console: the log on disk is capped and says so; the scanner kept a bounded number of reports.
    console_text = run.console_log.read_text()
    assert run.console_log.stat().st_size <= CONSOLE_LIMIT + 1024
    assert run.console_dropped_bytes > FLOOD_BYTES // 2
    assert "console.log cut at" in console_text
    report_in = live.report()
    assert report_in.runner_done_line is not None  # the scanner still saw the end past the cut
    assert report_in.dropped_faults > 0 and len(report_in.faults) <= scanner.MAX_FAULTS + 1

    # The report: well-formed, failed, and without the host's secret.
    end = model.GuestEnd(kind=run.end, detail=run.detail, console_dropped_bytes=run.console_dropped_bytes)
    report = verdict.collect(read_plan(payload / "plan.json"), cfg.results_dir, report_in, end)
    junit = report_junit.write_junit(report, tmp_path / "junit.xml")
    text = junit.read_text()
    assert SECRET not in text and SECRET.replace(":", "") not in text
    assert report.outcome is not model.Outcome.PASS
    cases = {(s.name, c.name): c for s in JUnitXml.fromfile(str(junit)) for c in s}
    for suite in ("leak", "fifo", "zero"):
        assert (suite, "results: output.txt") in cases, suite
    assert (("dirlink", "results: status.json")) in cases
    assert ("deep", "results: KTAP") in cases
    assert ("flood", "flooded") in cases
    assert cases[("boot", "console")].result[0].message.startswith("the guest flooded the console")
    status = json.loads((cfg.results_dir / "leak" / "status.json").read_text())
    assert status["rc"] == 0
