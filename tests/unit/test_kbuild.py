"""kernel_ci.build.kbuild without a container: handing trees to the build user."""

from __future__ import annotations

import os
from pathlib import Path

from kernel_ci.build import kbuild


def test_handing_a_tree_to_the_build_user_survives_files_vanishing_meanwhile(tmp_path: Path) -> None:
    """The ccache dir is shared by concurrent builds: a lock file listed by the walk may be gone before
    its lstat. Seen as a FileNotFoundError that failed a build; now the vanished entry is skipped."""
    gone = tmp_path / "ccache" / "6" / "7" / "stats.lock"
    kbuild._chown_if_needed(os.fspath(gone), os.getuid(), os.getgid())  # absent: no error
    present = tmp_path / "kept"
    present.write_text("")
    kbuild._chown_if_needed(os.fspath(present), os.getuid(), os.getgid())
    assert present.exists()
