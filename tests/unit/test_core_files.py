"""core.files.write_text_atomic: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel_ci.core.files import write_text_atomic


def test_the_new_text_replaces_the_old_and_no_temporary_file_stays(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    target.write_text("old")
    assert write_text_atomic(target, "new") == target
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_a_write_that_fails_leaves_the_old_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "junit.xml"
    target.write_text("<testsuites/>")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(target, "half \udc80 written")  # a lone surrogate cannot be encoded: fails mid-way
    assert target.read_text() == "<testsuites/>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junit.xml"]
