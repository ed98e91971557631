from __future__ import annotations

import hashlib
import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel_ci.build import source
from kernel_ci.host import aptmirror


def _tarball_bytes(top: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        data = b"VERSION = 5\nPATCHLEVEL = 10\nSUBLEVEL = 999\n"
        info = tarfile.TarInfo(f"{top}/Makefile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNEL_CI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(aptmirror, "configured_sources", lambda apt_dir=None: [])


def _lock(blob: bytes, *, first_sha: str = "") -> source.SourceLock:
    sha = hashlib.sha256(blob).hexdigest()
    tarballs = {
        "9.9.1": source.Tarball("9.9.1", "kernel.org", "v9.x/linux-9.9.1.tar.xz", first_sha, "linux-9.9.1"),
        "9.9.0": source.Tarball(
            "9.9.0", "debian", "pool/main/l/linux/linux_9.9.0.orig.tar.xz", sha, "linux-9.9.0"
        ),
    }
    return source.SourceLock(default="9.9", aliases={"9.9": ["9.9.1", "9.9.0"]}, tarballs=tarballs)


def test_falls_back_with_a_note_verifies_and_unpacks_once(server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    base, root = server
    blob = _tarball_bytes("linux-9.9.0")
    (root / "debian/pool/main/l/linux").mkdir(parents=True)
    (root / "debian/pool/main/l/linux/linux_9.9.0.orig.tar.xz").write_bytes(blob)
    monkeypatch.setenv("KERNEL_CI_KERNEL_ORG_MIRROR", f"{base}/nothing-here")
    monkeypatch.setenv("KERNEL_CI_DEBIAN_MIRROR", f"{base}/debian")
    # The first candidate is pinned (to some hash) but its mirror answers 404: fall back.
    lock = _lock(blob, first_sha="0" * 64)

    got = source.resolve("9.9", lock)

    assert got.version == "9.9.0" and got.requested == "9.9"
    assert got.url == f"{base}/debian/pool/main/l/linux/linux_9.9.0.orig.tar.xz"
    assert "Linux 9.9.1 is not available" in got.fallback_notes[0]
    assert "404" in got.fallback_notes[0]
    assert (got.tree / "Makefile").read_text().startswith("VERSION = 5")

    (root / "debian/pool/main/l/linux/linux_9.9.0.orig.tar.xz").unlink()  # now only the cache can serve it
    again = source.resolve("9.9.0", lock)
    assert again.tree == got.tree and again.url.startswith("cache:")


def test_wrong_bytes_are_refused(server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    base, root = server
    (root / "debian/pool/main/l/linux").mkdir(parents=True)
    (root / "debian/pool/main/l/linux/linux_9.9.0.orig.tar.xz").write_bytes(b"tampered")
    monkeypatch.setenv("KERNEL_CI_DEBIAN_MIRROR", f"{base}/debian")
    lock = _lock(_tarball_bytes("linux-9.9.0"))
    with pytest.raises(source.SourceError, match="does not match the pinned"):
        source.resolve("9.9.0", lock)
    assert not list((Path(source.cache_dir("downloads"))).iterdir())


def test_unpinned_tarball_is_not_used() -> None:
    lock = _lock(b"x")
    with pytest.raises(source.SourceError, match="no sha256 pinned"):
        source.fetch_tarball(lock.tarballs["9.9.1"])


def test_unknown_version_lists_known_ones() -> None:
    with pytest.raises(source.SourceError, match=r"known: 9\.9, 9\.9\.0, 9\.9\.1"):
        _lock(b"x").candidates("4.19")


def test_repo_lock_pins_every_reachable_tarball() -> None:
    lock = source.load_lock()
    assert lock.candidates(None)[0].version == "5.10.224"  # the course's target comes first
    for name in ("5.10.223", "5.10.262", "6.1.176"):
        tarball = lock.tarballs[name]
        assert len(tarball.sha256) == 64 and tarball.origin == "debian"


UNPACK_CHILD = """
import sys
from pathlib import Path
from kernel_ci.build import source
tarball = source.Tarball("9.9.0", "debian", "p/linux_9.9.0.orig.tar.xz", sys.argv[2], "linux-9.9.0")
tree = source.unpack(tarball, Path(sys.argv[1]))
print(tree.stat().st_ino, (tree / "Makefile").read_text().splitlines()[0])
"""


def test_two_processes_unpacking_the_same_tarball_unpack_it_once(tmp_path: Path) -> None:
    blob = _tarball_bytes("linux-9.9.0")
    archive = tmp_path / "linux_9.9.0.orig.tar.xz"
    archive.write_bytes(blob)
    # A slow tar that counts its runs: the two unpacks overlap for sure.
    shims = tmp_path / "bin"
    shims.mkdir()
    runs = tmp_path / "tar-runs"
    (shims / "tar").write_text(f'#!/bin/sh\necho run >> {runs}\nsleep 2\nexec /usr/bin/tar "$@"\n')
    (shims / "tar").chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}"}
    argv = [sys.executable, "-c", UNPACK_CHILD, str(archive), hashlib.sha256(blob).hexdigest()]
    children = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [child.communicate(timeout=60)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0]
    assert outputs[0] == outputs[1]  # the same tree (inode), complete, for both
    assert outputs[0].split()[1:] == ["VERSION", "=", "5"]
    assert runs.read_text().count("run") == 1


def test_a_cached_tarball_changed_after_its_check_is_checked_again(server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The remembered verdict of a cached tarball (its .verified stamp) does not survive a change of the
    file, even one that keeps its size and puts its mtime back: the next fetch hashes it again, finds the
    mismatch and downloads it anew."""
    base, root = server
    blob = _tarball_bytes("linux-9.9.0")
    (root / "debian/pool/main/l/linux").mkdir(parents=True)
    (root / "debian/pool/main/l/linux/linux_9.9.0.orig.tar.xz").write_bytes(blob)
    monkeypatch.setenv("KERNEL_CI_DEBIAN_MIRROR", f"{base}/debian")
    tarball = _lock(blob).tarballs["9.9.0"]
    cached, url = source.fetch_tarball(tarball)
    assert not url.startswith("cache:")
    assert source.fetch_tarball(tarball)[1].startswith("cache:")  # verified, then remembered
    assert cached.with_name(cached.name + ".verified").is_file()

    st = cached.stat()
    with cached.open("r+b") as handle:  # same size, other bytes, mtime put back
        handle.write(b"\0" * 16)
    os.utime(cached, ns=(st.st_atime_ns, st.st_mtime_ns))

    again, url = source.fetch_tarball(tarball)
    assert not url.startswith("cache:")  # the change was seen: downloaded again
    assert again.read_bytes() == blob
