"""The Debian mirror(s) this machine's apt is configured with, read from /etc/apt (never hard-coded)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

APT_DIR = Path("/etc/apt")


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]

    @property
    def archive(self) -> str:
        """ "debian-security" for a security suite, else "debian"."""
        return (
            "debian-security" if any(s.endswith(("-security", "/updates")) for s in self.suites) else "debian"
        )


def parse_deb822(text: str) -> list[AptSource]:
    """Entries of a deb822 .sources file that carry binary or source packages."""
    sources: list[AptSource] = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if not line.strip() or line.lstrip().startswith("#") or line[0].isspace():
                continue
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no" or "uris" not in fields:
            continue
        suites = tuple(fields.get("suites", "").split())
        sources.extend(AptSource(uri.rstrip("/"), suites) for uri in fields["uris"].split())
    return sources


def parse_one_line(text: str) -> list[AptSource]:
    """Entries of a one-line-style sources.list."""
    sources: list[AptSource] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 3 or words[0] not in ("deb", "deb-src"):
            continue
        rest = words[1:]
        if rest[0].startswith("["):
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) >= 2:
            sources.append(AptSource(rest[0].rstrip("/"), (rest[1],)))
    return sources


def configured_sources(apt_dir: Path = APT_DIR) -> list[AptSource]:
    found: list[AptSource] = []
    main_list = apt_dir / "sources.list"
    if main_list.is_file():
        found += parse_one_line(main_list.read_text(errors="replace"))
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".sources":
                found += parse_deb822(path.read_text(errors="replace"))
            elif path.suffix == ".list":
                found += parse_one_line(path.read_text(errors="replace"))
    return found


def archive_bases(archive: str, apt_dir: Path = APT_DIR) -> list[str]:
    """Base URIs for a Debian archive ("debian" or "debian-security"), primary first, no duplicates.

    KERNEL_CI_DEBIAN_MIRROR (a base for the "debian" archive) comes first when set. A security base is also
    derived from each "debian" base by the archive's usual layout (…/debian -> …/debian-security).
    """
    bases: list[str] = []
    override = os.environ.get("KERNEL_CI_DEBIAN_MIRROR")
    sources = configured_sources(apt_dir)
    plain = ([override.rstrip("/")] if override else []) + [s.uri for s in sources if s.archive == "debian"]
    if archive == "debian":
        bases = plain
    else:
        bases = [s.uri for s in sources if s.archive == archive]
        bases += [uri + "-security" for uri in plain if uri.endswith("/debian")]
    unique: list[str] = []
    for base in bases:
        if base.startswith(("http://", "https://", "file:/")) and base not in unique:
            unique.append(base)
    return unique
