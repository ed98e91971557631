from __future__ import annotations

from pathlib import Path

from kernel_ci.host import aptmirror

DEB822 = """Types: deb deb-src
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://mirror.invalid/debian-security
Suites: bookworm-security
Components: main

Types: deb
Enabled: no
URIs: http://disabled.invalid/debian
Suites: sid
"""


def _apt_dir(tmp_path: Path, sources: str, one_line: str = "") -> Path:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(sources)
    if one_line:
        (tmp_path / "sources.list").write_text(one_line)
    return tmp_path


def test_deb822_archives(tmp_path: Path) -> None:
    apt = _apt_dir(tmp_path, DEB822)
    assert aptmirror.archive_bases("debian", apt) == ["http://mirror.invalid/debian"]
    assert aptmirror.archive_bases("debian-security", apt) == ["http://mirror.invalid/debian-security"]


def test_one_line_sources_come_first_and_options_are_skipped(tmp_path: Path) -> None:
    apt = _apt_dir(
        tmp_path, DEB822, "deb [arch=amd64 signed-by=/k.gpg] http://first.invalid/debian bookworm main\n"
    )
    assert aptmirror.archive_bases("debian", apt) == [
        "http://first.invalid/debian",
        "http://mirror.invalid/debian",
    ]


def test_security_base_is_derived_when_not_configured(tmp_path: Path) -> None:
    apt = _apt_dir(tmp_path, "Types: deb\nURIs: http://only.invalid/debian/\nSuites: bookworm\n")
    assert aptmirror.archive_bases("debian-security", apt) == ["http://only.invalid/debian-security"]


def test_override_comes_first(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("KERNEL_CI_DEBIAN_MIRROR", "http://local.invalid/debian")
    apt = _apt_dir(tmp_path, DEB822)
    assert aptmirror.archive_bases("debian", apt)[0] == "http://local.invalid/debian"


def test_this_machine_has_a_mirror() -> None:
    # The project relies on apt's configuration for kernel tarballs and debootstrap.
    assert aptmirror.archive_bases("debian"), "no Debian mirror configured in /etc/apt"
