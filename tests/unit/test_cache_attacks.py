"""Poisoned cache entries against the real client (kernel_ci.cache.remote, kernel_ci.cache.store)
and a real service.

The attacker holds a write token: they publish whatever blobs and manifest they like under a build key
(through the service's ordinary API, as any builder does). A client restoring that key must write nothing
outside its staging directory, must publish nothing it could not verify, and must call it a miss.
Each test also checks a sentinel directory outside the cache, which the attack aims at.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kernel_ci.cache import tarformat
from kernel_ci.cache.remote import DIGESTS_OUTPUT, CacheClient, RemoteConfig, RemoteStore
from kernel_ci.cache.server.server import ServerConfig
from kernel_ci.cache.store import (
    CacheStoreError,
    FileRecord,
    LocalStore,
    TreeWriter,
    UnsafeEntryError,
    WrittenTree,
)
from kernel_ci.cache.tarformat import extract_members
from kernel_ci.flow import build as buildpipeline
from tests.cacheservice import TOKEN, server_in_thread

KEY = "ba" * 32
INPUTS = {"source": "linux-5.10.223 sha256:" + "f" * 64}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Member:
    """One tar member as the attacker writes it."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644
    listed: bool = True  # whether the attacker lists it in the per-file digests
    listed_data: bytes | None = None  # what the per-file digest claims (default: the real bytes)
    listed_mode: int | None = None  # the mode it claims (default: the member's, without setuid & co)


@dataclass
class Attack:
    tars: dict[str, list[Member]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # plain-file outputs, in manifest order after tars
    modes: dict[str, int] = field(default_factory=dict)
    raw: dict[str, bytes] = field(default_factory=dict)  # tar bytes crafted by hand, in place of make_tar's
    dirs: list[str] = field(default_factory=list)  # more directories for the digests to list
    ghosts: dict[str, bytes] = field(default_factory=dict)  # files the digests list and no output brings


def make_tar(members: Iterable[Member]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type = member.type
            info.mode = member.mode
            info.linkname = member.linkname
            if member.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
            if member.type == tarfile.REGTYPE:
                info.size = len(member.data)
                tar.addfile(info, io.BytesIO(member.data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def digests_document(attack: Attack) -> bytes:
    """The per-file digests the attacker publishes with the entry (the format of an honest push)."""
    files = {}
    dirs = []
    for members in attack.tars.values():
        for member in members:
            if member.type == tarfile.DIRTYPE:
                dirs.append(member.name.rstrip("/"))
            elif member.listed:
                claimed = member.data if member.listed_data is None else member.listed_data
                mode = member.mode & 0o777 if member.listed_mode is None else member.listed_mode
                files[member.name] = {"sha256": sha(claimed), "size": len(claimed), "mode": mode}
    for name, data in [*attack.files.items(), *attack.ghosts.items()]:
        files[name] = {"sha256": sha(data), "size": len(data), "mode": attack.modes.get(name, 0o644)}
    return json.dumps(
        {"schema": 2, "key": KEY, "files": files, "dirs": sorted([*dirs, *attack.dirs])}
    ).encode()


def publish(client: CacheClient, tmp: Path, attack: Attack) -> None:
    """Upload the attack's blobs and its manifest, as a write-token holder can."""
    outputs = []
    blobs: list[tuple[str, bytes]] = [
        (name, attack.raw.get(name) or make_tar(m)) for name, m in attack.tars.items()
    ]
    blobs += list(attack.files.items())
    blobs.append((DIGESTS_OUTPUT, digests_document(attack)))
    for index, (name, data) in enumerate(blobs):
        path = tmp / f"blob-{index}"
        path.write_bytes(data)
        if client.missing([sha(data)]):
            client.put_blob(sha(data), len(data), path)
        outputs.append(
            {
                "name": name,
                "sha256": sha(data),
                "size": len(data),
                "kind": "tar" if name in attack.tars else "file",
            }
        )
    client.put_manifest(KEY, {"outputs": outputs, "inputs": INPUTS, "metadata": {}})


def tree(root: Path) -> dict[str, str]:
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        found[path.relative_to(root).as_posix()] = f"{stat.filemode(st.st_mode)}:{st.st_size}"
    return found


@pytest.fixture
def victim(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A running service, the attacker's client, and the victim's store + the directory the attack aims at."""
    outside = tmp_path / "home" / ".ssh"
    outside.mkdir(parents=True)
    (outside / "known").write_text("untouched\n")
    with server_in_thread(ServerConfig(data=tmp_path / "server")) as server:
        attacker = CacheClient(RemoteConfig(server.url, TOKEN))
        store = RemoteStore(LocalStore(tmp_path / "victim"), CacheClient(RemoteConfig(server.url)))
        yield attacker, store, outside
        attacker.close()
        store.client.close()


def assert_refused(store: RemoteStore, outside: Path) -> None:
    before = tree(outside.parent.parent)
    restored = store.get(KEY)
    assert sorted(p.name for p in outside.iterdir()) == ["known"], "something was written outside the cache"
    assert tree(outside.parent.parent) == before
    assert restored is None, "the poisoned entry was restored"
    assert store.local.get(KEY) is None
    assert list(store.local.tmp_dir.iterdir()) == [], "staging was not discarded"
    assert list(store.local.entries_dir.rglob("*")) == []


def honest_members() -> list[Member]:
    return [Member("kbuild", tarfile.DIRTYPE, mode=0o755), Member("kbuild/Makefile", data=b"all:\n")]


def test_absolute_symlink_then_a_file_output_through_it(tmp_path: Path, victim) -> None:  # type: ignore[no-untyped-def]
    attacker, store, outside = victim
    attack = Attack(
        tars={"kbuild": [*honest_members(), Member("kbuild/x", tarfile.SYMTYPE, linkname=str(outside))]},
        files={"kbuild/x/authorized_keys": b"ssh-ed25519 AAAA attacker\n"},
    )
    publish(attacker, tmp_path, attack)
    assert_refused(store, outside)


def test_relative_symlink_escape_then_a_file_output_through_it(tmp_path: Path, victim) -> None:  # type: ignore[no-untyped-def]
    attacker, store, outside = victim
    # staging is <victim>/tmp/restore-*/ : five levels up is tmp_path
    up = os.path.relpath(outside, store.local.tmp_dir / "restore-x" / "kbuild")
    attack = Attack(
        tars={"kbuild": [*honest_members(), Member("kbuild/y", tarfile.SYMTYPE, linkname=up)]},
        files={"kbuild/y/authorized_keys": b"ssh-ed25519 AAAA attacker\n"},
    )
    publish(attacker, tmp_path, attack)
    assert_refused(store, outside)


def test_symlink_then_a_tar_member_through_it(tmp_path: Path, victim) -> None:  # type: ignore[no-untyped-def]
    attacker, store, outside = victim
    attack = Attack(
        tars={
            "kbuild": [
                *honest_members(),
                Member("kbuild/z", tarfile.SYMTYPE, linkname=str(outside)),
                Member("kbuild/z/authorized_keys", data=b"ssh-ed25519 AAAA attacker\n"),
            ]
        }
    )
    publish(attacker, tmp_path, attack)
    assert_refused(store, outside)


@pytest.mark.parametrize(
    "name",
    ["kbuild/../../../../home/.ssh/authorized_keys", "/kbuild/abs", "kbuild/a/../../escape", "modules/x"],
)
def test_member_names_with_dotdot_absolute_or_outside_their_output(
    tmp_path: Path,
    victim,
    name: str,  # type: ignore[no-untyped-def]
) -> None:
    attacker, store, outside = victim
    attack = Attack(tars={"kbuild": [*honest_members(), Member(name, data=b"pwned\n")]})
    publish(attacker, tmp_path, attack)
    assert_refused(store, outside)


@pytest.mark.parametrize("target", ["home/.ssh/known", "/etc/passwd", "kbuild/Makefile"])
def test_hard_link_members(tmp_path: Path, victim, target: str) -> None:  # type: ignore[no-untyped-def]
    attacker, store, outside = victim
    if target == "home/.ssh/known":
        target = str(outside / "known")
    attack = Attack(
        tars={"kbuild": [*honest_members(), Member("kbuild/h", tarfile.LNKTYPE, linkname=target)]}
    )
    publish(attacker, tmp_path, attack)
    assert_refused(store, outside)


@pytest.mark.parametrize(
    "member",
    [
        Member("kbuild/dev", tarfile.BLKTYPE),
        Member("kbuild/chr", tarfile.CHRTYPE),
        Member("kbuild/fifo", tarfile.FIFOTYPE),
        Member("kbuild/suid", data=b"#!/bin/sh\nid\n", mode=0o4755),
        Member("kbuild/sgid", data=b"#!/bin/sh\nid\n", mode=0o2755),
        Member("kbuild/suid-listed", data=b"#!/bin/sh\nid\n", mode=0o4755, listed_mode=0o4755),
        Member("kbuild/world-writable", data=b"#!/bin/sh\nid\n", mode=0o777, listed_mode=0o777),
        Member("kbuild/sticky", tarfile.DIRTYPE, mode=0o1777),
        Member("kbuild/sparse", tarfile.GNUTYPE_SPARSE),
    ],
    ids=lambda m: m.name,
)
def test_special_members(tmp_path: Path, victim, member: Member) -> None:  # type: ignore[no-untyped-def]
    attacker, store, outside = victim
    publish(attacker, tmp_path, Attack(tars={"kbuild": [*honest_members(), member]}))
    assert_refused(store, outside)


def test_a_file_whose_bytes_do_not_match_its_digest(tmp_path: Path, victim) -> None:  # type: ignore[no-untyped-def]
    attacker, store, outside = victim
    evil = Member("kbuild/scripts/sign-file", data=b"evil!!\n", mode=0o755, listed_data=b"honest\n")
    publish(attacker, tmp_path, Attack(tars={"kbuild": [*honest_members(), evil]}))
    assert_refused(store, outside)


def test_a_file_the_digests_do_not_list(tmp_path: Path, victim) -> None:  # type: ignore[no-untyped-def]
    attacker, store, outside = victim
    hidden = Member("kbuild/hidden", data=b"not in the digests\n", listed=False)
    publish(attacker, tmp_path, Attack(tars={"kbuild": [*honest_members(), hidden]}))
    assert_refused(store, outside)


def test_a_listed_file_that_no_output_brings(tmp_path: Path, victim) -> None:  # type: ignore[no-untyped-def]
    """The digests list a file that neither a tar nor a file output carries: every member that did arrive
    matches, but the entry would be published without a file its entry.json promises (the restore's
    publish trusts what it wrote, not a scan of staging: it must still find the file missing)."""
    attacker, store, outside = victim
    attack = Attack(
        tars={"kbuild": honest_members()},
        files={"bzImage": b"kernel"},
        ghosts={"kbuild/include/generated/autoconf.h": b"#define X 1\n"},
    )
    publish(attacker, tmp_path, attack)
    assert_refused(store, outside)


def test_a_duplicate_member_cannot_overwrite_a_verified_file(tmp_path: Path, victim) -> None:  # type: ignore[no-untyped-def]
    attacker, store, outside = victim
    second = Member("kbuild/Makefile", data=b"ALL:\n", listed=False)  # same size as the listed one
    publish(attacker, tmp_path, Attack(tars={"kbuild": [*honest_members(), second]}))
    assert_refused(store, outside)


def test_an_entry_without_per_file_digests_is_a_miss(tmp_path: Path, victim) -> None:  # type: ignore[no-untyped-def]
    attacker, store, outside = victim
    tar = make_tar(honest_members())
    path = tmp_path / "blob"
    path.write_bytes(tar)
    attacker.put_blob(sha(tar), len(tar), path)
    output = {"name": "kbuild", "sha256": sha(tar), "size": len(tar), "kind": "tar"}
    attacker.put_manifest(KEY, {"outputs": [output], "inputs": INPUTS, "metadata": {}})  # the old format
    assert_refused(store, outside)


def test_a_well_formed_entry_of_the_same_shape_is_restored(tmp_path: Path, victim) -> None:  # type: ignore[no-untyped-def]
    """The control: the attack tests fail because of what they smuggle, not because of their shape."""
    attacker, store, _outside = victim
    attack = Attack(
        tars={"kbuild": [*honest_members(), Member("kbuild/scripts/tool", data=b"#!/bin/sh\n", mode=0o755)]},
        files={"bzImage": b"kernel"},
    )
    publish(attacker, tmp_path, attack)
    entry = store.get(KEY)
    assert entry is not None
    assert (entry / "kbuild" / "Makefile").read_bytes() == b"all:\n"
    assert stat.S_IMODE((entry / "kbuild" / "scripts" / "tool").stat().st_mode) == 0o755
    assert (entry / "bzImage").read_bytes() == b"kernel"


def test_editing_a_restored_output_directory_does_not_change_the_cache(tmp_path: Path) -> None:
    """`kernel-ci build` restores an entry into out/build (on a hit, and after building and storing it);
    a user (or a test) then edits files there."""
    store = LocalStore(tmp_path / "store")
    outputs = tmp_path / "outputs"
    (outputs / "kbuild" / "scripts").mkdir(parents=True)
    (outputs / "kbuild" / "scripts" / "tool").write_text("#!/bin/sh\necho honest\n")
    entry = store.put(KEY, outputs, INPUTS)
    out = tmp_path / "out" / "build"
    buildpipeline._link_or_copy_tree(entry, out)  # the restore step of buildpipeline._restore and build
    with open(out / "kbuild" / "scripts" / "tool", "w") as handle:  # rewritten in place, as `>` does
        handle.write("#!/bin/sh\necho tampered\n")
    assert (entry / "kbuild" / "scripts" / "tool").read_text() == "#!/bin/sh\necho honest\n"
    buildpipeline._link_or_copy_tree(store.get(KEY), out)  # type: ignore[arg-type]
    assert (out / "kbuild" / "scripts" / "tool").read_text() == "#!/bin/sh\necho honest\n"


# -- each layer on its own (the tests above go through all of them: these fail if one layer is removed) --


def test_extract_members_checks_each_member_against_its_digest(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    honest = {"kbuild/Makefile": FileRecord(sha256=sha(b"all:\n"), size=5, mode=0o644)}
    tar = make_tar([Member("kbuild/Makefile", data=b"ALL:\n")])  # same size, other bytes
    with pytest.raises(UnsafeEntryError, match="do not match the recorded digest"):
        extract_members(io.BytesIO(tar), staging, "kbuild", honest)
    (tmp_path / "ok").mkdir()
    extract_members(
        io.BytesIO(make_tar([Member("kbuild/Makefile", data=b"all:\n")])), tmp_path / "ok", "kbuild", honest
    )
    assert (tmp_path / "ok" / "kbuild" / "Makefile").read_bytes() == b"all:\n"


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_extract_members_refuses_every_non_regular_type(tmp_path: Path, kind: bytes) -> None:
    (tmp_path / "staging").mkdir()
    tar = make_tar([Member("kbuild/x", kind, linkname="/etc/passwd")])
    with pytest.raises(UnsafeEntryError, match="an entry holds only regular files and directories"):
        extract_members(io.BytesIO(tar), tmp_path / "staging", "kbuild", {})
    assert os.listdir(tmp_path / "staging") == []


def test_tree_writer_never_writes_through_a_symlink(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "a").symlink_to(outside)
    (root / "f").symlink_to(outside / "file")
    with TreeWriter(root) as writer:
        with pytest.raises(UnsafeEntryError, match="not a plain directory"):
            writer.create(("a", "authorized_keys"), 0o644)
        with pytest.raises(UnsafeEntryError, match="appears twice"):
            writer.create(("f",), 0o644)  # O_EXCL: an existing name (here a symlink) is never opened
    assert os.listdir(outside) == []


def test_tree_writer_keeps_a_bounded_number_of_directories_open(tmp_path: Path) -> None:
    """A restore makes ~3,700 directories through several writers: each keeps at most MAX_OPEN_DIRS
    descriptors (a user's hard limit may be 4096), and reopens what it closed, still without following
    a symlink."""
    from kernel_ci.cache import store as cachestore

    root = tmp_path / "root"
    root.mkdir()

    def open_fds() -> int:  # this process's descriptors of directories below root (other tests' servers
        found = 0  # may still be closing sockets in their threads)
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                found += os.readlink(f"/proc/self/fd/{name}").startswith(str(root))
        return found

    before = open_fds()
    count = 3 * cachestore.MAX_OPEN_DIRS
    with TreeWriter(root) as writer:
        for i in range(count):
            os.close(writer.create_fd(("kbuild", f"d{i % 40}", f"e{i}", "f"), 0o644))
            assert open_fds() - before <= cachestore.MAX_OPEN_DIRS + 2
        os.symlink(tmp_path, root / "kbuild" / "d0" / "link")
        with pytest.raises(UnsafeEntryError, match="not a plain directory"):
            writer.directory(("kbuild", "d0", "link", "x"))
        assert writer.directory(("kbuild", "d1", "e1")) >= 0  # closed long ago: opened again
    assert open_fds() == before
    assert sum(1 for _ in root.rglob("f")) == count


def test_put_with_expected_records_publishes_only_an_exact_match(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "bzImage").write_bytes(b"kernel")
    record = FileRecord(sha256=sha(b"kernel"), size=6, mode=0o644)
    for expected in (
        {"bzImage": {**record, "sha256": sha(b"KERNEL")}},
        {"bzImage": record, "config": record},
        {},
    ):
        with pytest.raises(CacheStoreError, match="does not match its per-file digests"):
            store.put(KEY, outputs, INPUTS, expected=expected)  # type: ignore[arg-type]
        assert store.get(KEY) is None and list(store.tmp_dir.iterdir()) == []
    assert store.put(KEY, outputs, INPUTS, expected={"bzImage": record}) == store.get(KEY)


def test_put_of_verified_files_still_checks_names_sizes_and_modes(tmp_path: Path) -> None:
    """verified=True (a restore that hashed every file as it wrote it) skips the second hash only: a file
    missing, unlisted, of another size or mode, or a symlink, is still refused; a file of the listed size
    whose bytes differ is hashed again when the caller did not say it verified them."""
    store = LocalStore(tmp_path / "store")
    record = FileRecord(sha256=sha(b"kernel"), size=6, mode=0o644)

    def outputs(files: dict[str, bytes], mode: int = 0o644) -> Path:
        path = tmp_path / "outputs"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        for name, data in files.items():
            (path / name).write_bytes(data)
            (path / name).chmod(mode)
        return path

    refused = [
        ({"bzImage": b"kernel!"}, 0o644),  # another size
        ({"bzImage": b"kernel", "config": b"x"}, 0o644),  # unlisted
        ({}, 0o644),  # missing
        ({"bzImage": b"kernel"}, 0o755),  # another mode
    ]
    for files, mode in refused:
        with pytest.raises(CacheStoreError, match="does not match its per-file digests"):
            store.put(KEY, outputs(files, mode), INPUTS, expected={"bzImage": record}, verified=True)
        assert store.get(KEY) is None
    with pytest.raises(CacheStoreError, match="does not match its per-file digests"):
        store.put(KEY, outputs({"bzImage": b"KERNEL"}), INPUTS, expected={"bzImage": record})
    entry = store.put(
        KEY, outputs({"bzImage": b"kernel"}), INPUTS, expected={"bzImage": record}, verified=True
    )
    assert entry == store.get(KEY) and (entry / "bzImage").read_bytes() == b"kernel"


def test_put_from_a_written_record_refuses_a_file_missing_or_unlisted(tmp_path: Path) -> None:
    """put(written=...) publishes from the restore's record of what it wrote instead of a scan: that
    record must name exactly the listed files (a listed file nothing wrote, or a written one the list
    lacks, publishes nothing)."""
    store = LocalStore(tmp_path / "store")
    record = FileRecord(sha256=sha(b"kernel"), size=6, mode=0o644)
    expected = {"bzImage": record, "kbuild/Makefile": FileRecord(sha256=sha(b"all:\n"), size=5, mode=0o644)}

    def staging(names: list[str]) -> tuple[Path, WrittenTree]:
        path = tmp_path / "staging"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        written = WrittenTree()
        with TreeWriter(path, written=written) as writer:
            for name in names:
                data = b"kernel" if name == "bzImage" else b"all:\n"
                with writer.create(tuple(name.split("/")), 0o644) as out:
                    out.write(data)
                written.file(name)
        return path, written

    for names in (["bzImage"], ["bzImage", "kbuild/Makefile", "kbuild/extra"]):
        path, written = staging(names)
        with pytest.raises(CacheStoreError, match="does not match its per-file digests"):
            store.put(KEY, path, INPUTS, move=True, expected=expected, verified=True, written=written)
        assert store.get(KEY) is None and list(store.tmp_dir.iterdir()) == []
    path, written = staging(["bzImage", "kbuild/Makefile"])
    entry = store.put(KEY, path, INPUTS, move=True, expected=expected, verified=True, written=written)
    info = json.loads((entry / "entry.json").read_text())
    assert (info["files"], info["dirs"]) == (expected, ["kbuild"])


# -- the tar reader (kernel_ci.cache.tarformat._members): headers forged by hand ---------------------------


def with_header(tar: bytes, index: int, offset: int, value: bytes, *, checksum: bool = True) -> bytes:
    """tar with bytes at offset of its index-th 512-byte block replaced (and that header's checksum fixed)."""
    data = bytearray(tar)
    start = index * 512
    data[start + offset : start + offset + len(value)] = value
    if checksum:
        data[start + 148 : start + 156] = b" " * 8
        data[start + 148 : start + 156] = b"%06o\0 " % sum(data[start : start + 512])
    return bytes(data)


def gnu_tar(members: Iterable[Member]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.size = len(member.data)
            tar.addfile(info, io.BytesIO(member.data))
    return buffer.getvalue()


def pax_tar(member: Member, records: dict[str, str], global_records: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, pax_headers=global_records) as tar:
        for honest in honest_members():
            info = tarfile.TarInfo(honest.name)
            info.type, info.mode, info.size = honest.type, honest.mode, len(honest.data)
            tar.addfile(info, io.BytesIO(honest.data))
        info = tarfile.TarInfo(member.name)
        info.size, info.mode, info.pax_headers = len(member.data), member.mode, records
        tar.addfile(info, io.BytesIO(member.data))
    return buffer.getvalue()


LONG = "kbuild/" + "/".join(["d" * 60] * 3) + "/header.h"  # over ustar's 100 characters: a PAX path record


@pytest.mark.parametrize(
    ("records", "global_records"),
    [
        ({"linkpath": "/etc/passwd"}, None),
        ({"GNU.sparse.map": "0,10"}, None),
        ({"hdrcharset": "BINARY"}, None),
        ({"SCHILY.xattr.security.capability": "x"}, None),
        ({"path": "kbuild/../../home/.ssh/authorized_keys"}, None),
        ({"path": "/home/.ssh/authorized_keys"}, None),
        ({"size": "-5"}, None),
        ({}, {"path": "kbuild/evil"}),
    ],
    ids=["linkpath", "sparse", "hdrcharset", "xattr", "path-dotdot", "path-absolute", "size", "global"],
)
def test_pax_records_an_entry_never_has_are_refused(
    tmp_path: Path,
    victim,  # type: ignore[no-untyped-def]
    records: dict[str, str],
    global_records: dict[str, str] | None,
) -> None:
    attacker, store, outside = victim
    member = Member("kbuild/x.h", data=b"int x;\n")
    attack = Attack(
        tars={"kbuild": [*honest_members(), member]},
        raw={"kbuild": pax_tar(member, records, global_records)},
    )
    publish(attacker, tmp_path, attack)
    assert_refused(store, outside)


def test_a_gnu_long_name_member_is_refused(tmp_path: Path, victim) -> None:  # type: ignore[no-untyped-def]
    attacker, store, outside = victim
    member = Member(LONG, data=b"int x;\n")
    attack = Attack(tars={"kbuild": [member]}, raw={"kbuild": gnu_tar([member])})
    publish(attacker, tmp_path, attack)
    assert_refused(store, outside)


def forged(index: int, offset: int, value: bytes, *, checksum: bool = True) -> bytes:
    return with_header(make_tar(honest_members()), index, offset, value, checksum=checksum)


@pytest.mark.parametrize(
    "tar",
    [
        forged(1, 0, b"kbuild/Makefilf", checksum=False),  # a bit flipped in a name: the checksum says so
        forged(1, 124, b"\x80" + bytes(10) + b"\x05"),  # the size in base-256
        forged(1, 124, b"-0000000005\0"),  # a negative size
        forged(1, 124, b"77777777777\0"),  # 8 GiB, more than the blob and than listed: refused before reading
        forged(1, 257, b"GNUtar"),  # not a ustar header
        forged(1, 345, b"../.."),  # a ustar name prefix that climbs out
        make_tar(honest_members())[:1027],  # truncated inside the Makefile's data
        make_tar(honest_members())[:700],  # truncated inside a header
        make_tar([*honest_members(), Member(LONG, data=b"int x;\n")])[: 512 * 5]
        + bytes(1024),  # a PAX path record whose member never comes (the archive ends first)
    ],
    ids=[
        "checksum",
        "base-256",
        "negative",
        "oversize",
        "magic",
        "prefix",
        "cut-data",
        "cut-header",
        "lone-pax",
    ],
)
def test_forged_or_truncated_tar_headers_are_refused(tmp_path: Path, victim, tar: bytes) -> None:  # type: ignore[no-untyped-def]
    attacker, store, outside = victim
    attack = Attack(
        tars={"kbuild": [*honest_members(), Member("kbuild/x.h", data=b"int x;\n")]}, raw={"kbuild": tar}
    )
    publish(attacker, tmp_path, attack)
    assert_refused(store, outside)


def test_a_file_member_over_a_listed_directory_fails_in_the_writer_thread(tmp_path: Path, victim) -> None:  # type: ignore[no-untyped-def]
    """The name exists already (a directory of the digest list, made before any member): the writer
    thread's O_EXCL refuses it, and the restore waits for every writer before discarding staging."""
    attacker, store, outside = victim
    members = [*honest_members(), *(Member(f"kbuild/f{i}", data=b"x" * i) for i in range(200))]
    members.append(Member("kbuild/sub", data=b"file over a directory\n"))
    publish(attacker, tmp_path, Attack(tars={"kbuild": members}, dirs=["kbuild/sub"]))
    assert_refused(store, outside)


def test_a_big_member_streamed_to_disk_is_still_checked(
    tmp_path: Path,
    victim,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Members above BIG_MEMBER are written as they arrive (not held in memory): a wrong digest is still a
    miss, with the partial file discarded with staging; the right bytes are restored."""
    attacker, store, outside = victim
    monkeypatch.setattr(tarformat, "BIG_MEMBER", 1024)
    evil = Member("kbuild/vmlinux", data=b"e" * 5000, listed_data=b"h" * 5000)
    publish(attacker, tmp_path, Attack(tars={"kbuild": [*honest_members(), evil]}))
    assert_refused(store, outside)


def test_long_and_prefixed_names_of_an_honest_tar_are_restored(tmp_path: Path, victim) -> None:  # type: ignore[no-untyped-def]
    """The control for the reader: a PAX path record (write_tar's long names), a ustar name prefix
    (another writer's), and a big member streamed in pieces all come back exactly."""
    attacker, store, _outside = victim
    prefixed = "kbuild/" + "p" * 120 + "/short.h"
    members = [*honest_members(), Member(LONG, data=b"long\n"), Member(prefixed, data=b"prefixed\n")]
    ustar = io.BytesIO()
    with tarfile.open(fileobj=ustar, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type, info.mode, info.size = member.type, member.mode, len(member.data)
            tar.addfile(info, io.BytesIO(member.data))
    big = Member("modules/big.ko", data=os.urandom(3 * 1024 * 1024 + 7))
    attack = Attack(
        tars={"kbuild": members, "modules": [Member("modules", tarfile.DIRTYPE, mode=0o755), big]},
        raw={"kbuild": ustar.getvalue()},
    )
    publish(attacker, tmp_path, attack)
    big_member = tarformat.BIG_MEMBER
    try:
        tarformat.BIG_MEMBER = 1024 * 1024  # the big member goes through the streamed path
        entry = store.get(KEY)
    finally:
        tarformat.BIG_MEMBER = big_member
    assert entry is not None
    assert (entry / LONG).read_bytes() == b"long\n"
    assert (entry / prefixed).read_bytes() == b"prefixed\n"
    assert (entry / "modules" / "big.ko").read_bytes() == big.data


def test_a_blob_longer_than_its_declared_size_is_cut_off(tmp_path: Path, victim) -> None:  # type: ignore[no-untyped-def]
    """A service cannot stream more than the manifest said (an endless tar of directories would never
    end): the client stops at the declared size."""
    attacker, store, _outside = victim
    tar = make_tar(
        [*honest_members(), *(Member(f"kbuild/d{i}", tarfile.DIRTYPE, mode=0o755) for i in range(50))]
    )
    path = tmp_path / "blob"
    path.write_bytes(tar)
    attacker.put_blob(sha(tar), len(tar), path)
    staging = tmp_path / "staging"
    staging.mkdir()
    records = {"kbuild/Makefile": FileRecord(sha256=sha(b"all:\n"), size=5, mode=0o644)}
    with pytest.raises(UnsafeEntryError, match="more than the 2048 bytes"):
        store.client.extract(sha(tar), 2048, staging, "kbuild", records)
