"""smoke-py: the kernel release, loading and unloading kci_smoke by hand, and an artifact for the report."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

MODULE = "kci_smoke"


def loaded_modules() -> set[str]:
    return {line.split()[0] for line in Path("/proc/modules").read_text().splitlines() if line.strip()}


def test_uname_matches_the_built_kernel():
    assert os.uname().release == os.environ["KCI_KERNEL_RELEASE"]


def test_kci_smoke_loads_and_unloads():
    ko = Path(os.environ["KCI_PAYLOAD"]) / "modules" / f"{MODULE}.ko"
    assert ko.is_file(), f"{ko} is not in the payload"
    assert MODULE not in loaded_modules(), "kci_smoke is already loaded before the test"
    subprocess.run(["insmod", str(ko)], check=True, capture_output=True, text=True)
    try:
        assert MODULE in loaded_modules()
        assert Path("/sys/module", MODULE).is_dir()
    finally:
        subprocess.run(["rmmod", MODULE], check=True, capture_output=True, text=True)
    assert MODULE not in loaded_modules()


def test_writes_an_artifact():
    artifacts = Path(os.environ["KCI_ARTIFACTS"])
    artifacts.mkdir(parents=True, exist_ok=True)
    text = f"hello from smoke-py on {os.uname().release}\n"
    (artifacts / "hello.txt").write_text(text)
    assert (artifacts / "hello.txt").read_text() == text
