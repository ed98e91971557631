from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest

from kernel_ci.cache import store as cachestore
from kernel_ci.cache.store import BuildStore, CacheStoreError, LocalStore

KEY_A = "a1" + "0" * 62
KEY_B = "b2" + "0" * 62
KEY_C = "c3" + "0" * 62
MANIFEST = {"source": "linux-5.10.223 sha256:" + "f" * 64, "config:CONFIG_PROC_FS": "y"}

CTX = multiprocessing.get_context("fork")


def make_outputs(base: Path, tag: str = "one", files: int = 4) -> Path:
    outputs = base / f"outputs-{tag}"
    (outputs / "modules").mkdir(parents=True)
    for index in range(files):
        (outputs / f"file{index}.bin").write_bytes(f"{tag}:{index}\n".encode() * 1000)
    (outputs / "modules" / "kci.ko").write_text(f"module of {tag}\n")
    (outputs / "bzImage").write_bytes((outputs / "file0.bin").read_bytes())
    release = outputs / "modules" / "lib" / "modules" / "5.10.223-kci"
    release.mkdir(parents=True)
    (release / "build").symlink_to("/build/out")  # as modules_install leaves it in the build container
    return outputs


def visible_entries(store: LocalStore) -> list[Path]:
    return sorted(p for shard in store.entries_dir.iterdir() for p in shard.iterdir())


def test_local_store_is_a_build_store(tmp_path: Path) -> None:
    assert isinstance(LocalStore(tmp_path / "store"), BuildStore)


def test_default_root_is_the_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNEL_CI_CACHE", str(tmp_path / "cache"))
    assert LocalStore().root == tmp_path / "cache" / "builds"


def test_put_then_get_returns_the_files_and_metadata(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    outputs = make_outputs(tmp_path)
    assert store.get(KEY_A) is None

    entry = store.put(KEY_A, outputs, MANIFEST)

    assert entry == tmp_path / "store" / "entries" / "a1" / KEY_A
    assert store.get(KEY_A) == entry
    assert (entry / "file3.bin").read_bytes() == (outputs / "file3.bin").read_bytes()
    assert (entry / "modules" / "kci.ko").read_text() == "module of one\n"
    assert (entry / "bzImage").read_bytes() == (outputs / "file0.bin").read_bytes()
    release = entry / "modules" / "lib" / "modules" / "5.10.223-kci"
    assert os.readlink(release / "build") == os.readlink(release / "source") == "../../../../kbuild"
    assert json.loads((entry / "manifest.json").read_text()) == MANIFEST
    info = json.loads((entry / "entry.json").read_text())
    assert info["key"] == KEY_A
    assert info["file_count"] == 6
    assert info["files"]["modules/kci.ko"]["size"] == len("module of one\n")
    assert info["files"]["modules/kci.ko"]["sha256"] == hashlib.sha256(b"module of one\n").hexdigest()
    assert info["total_bytes"] == sum(record["size"] for record in info["files"].values())
    assert outputs.is_dir(), "a copying put leaves the outputs in place"
    assert list(store.tmp_dir.iterdir()) == []


def test_put_with_move_consumes_the_outputs(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    outputs = make_outputs(tmp_path)
    inode = (outputs / "file1.bin").stat().st_ino

    entry = store.put(KEY_A, outputs, MANIFEST, move=True)

    assert not outputs.exists()
    assert (entry / "file1.bin").stat().st_ino == inode, "moved, not copied"
    assert store.get(KEY_A) == entry


def test_put_of_an_existing_key_keeps_the_first_entry(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    first = store.put(KEY_A, make_outputs(tmp_path, "first"), MANIFEST)
    second = store.put(KEY_A, make_outputs(tmp_path, "second"), {"other": "manifest"})
    assert first == second
    assert (first / "modules" / "kci.ko").read_text() == "module of first\n"
    assert json.loads((first / "manifest.json").read_text()) == MANIFEST


def test_put_rejects_reserved_names_bad_keys_and_missing_outputs(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    outputs = make_outputs(tmp_path)
    (outputs / "manifest.json").write_text("{}")
    with pytest.raises(CacheStoreError, match=r"manifest\.json.*rename that output file"):
        store.put(KEY_A, outputs, MANIFEST)
    with pytest.raises(CacheStoreError, match="invalid build key"):
        store.put("../escape", outputs, MANIFEST)
    with pytest.raises(CacheStoreError, match="not a directory"):
        store.put(KEY_A, tmp_path / "nowhere", MANIFEST)
    with pytest.raises(CacheStoreError, match="str to str"):
        store.put(KEY_B, make_outputs(tmp_path, "two"), {"flag:jobs": 2})  # type: ignore[dict-item]
    assert visible_entries(store) == []


def test_a_put_failing_mid_copy_publishes_nothing_and_readers_never_see_half_an_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "store")
    reader = LocalStore(tmp_path / "store", clean=False)
    outputs = make_outputs(tmp_path, files=6)
    copied: list[str] = []
    seen_mid_copy: list[object] = []

    def copy_then_crash(source: str, destination: str) -> object:
        if len(copied) >= 3:  # the disk fills up after three files (copytree tries the rest too)
            if not seen_mid_copy:
                seen_mid_copy.extend([reader.get(KEY_A), list(reader.manifests()), visible_entries(reader)])
            raise OSError(errno.ENOSPC, "No space left on device")
        copied.append(source)
        return shutil.copy2(source, destination)

    monkeypatch.setattr(cachestore, "_copy_file", copy_then_crash)
    with pytest.raises(CacheStoreError, match="nothing was published"):
        store.put(KEY_A, outputs, MANIFEST)

    assert len(copied) == 3, "the copy really was interrupted mid-way"
    assert seen_mid_copy == [None, [], []]
    assert store.get(KEY_A) is None
    assert visible_entries(store) == []
    assert list(store.tmp_dir.iterdir()) == []


def test_an_interrupt_mid_copy_is_reraised_and_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "store")

    def interrupted(source: str, destination: str) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(cachestore, "_copy_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.put(KEY_A, make_outputs(tmp_path), MANIFEST)
    assert store.get(KEY_A) is None
    assert list(store.tmp_dir.iterdir()) == []


def test_a_real_copy_failure_publishes_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    outputs = make_outputs(tmp_path)
    os.mkfifo(outputs / "zz-fifo")  # shutil refuses to copy a named pipe, after copying the other files
    with pytest.raises(CacheStoreError, match="zz-fifo"):
        store.put(KEY_A, outputs, MANIFEST)
    assert store.get(KEY_A) is None
    assert visible_entries(store) == []
    assert list(store.tmp_dir.iterdir()) == []


def test_a_failed_move_puts_the_files_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "store")
    outputs = make_outputs(tmp_path)
    before = sorted(p.relative_to(outputs) for p in outputs.rglob("*"))

    def disk_full(root: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cachestore, "_fsync_tree", disk_full)
    with pytest.raises(CacheStoreError, match="No space left"):
        store.put(KEY_A, outputs, MANIFEST, move=True)
    assert sorted(p.relative_to(outputs) for p in outputs.rglob("*")) == before
    assert store.get(KEY_A) is None
    assert list(store.tmp_dir.iterdir()) == []


def test_a_damaged_entry_without_entry_json_is_invisible_and_replaced(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    damaged = store.entry_dir(KEY_A)
    damaged.mkdir(parents=True)
    (damaged / "file0.bin").write_text("half")
    assert store.get(KEY_A) is None
    assert list(store.manifests()) == []

    entry = store.put(KEY_A, make_outputs(tmp_path), MANIFEST)
    assert entry == damaged
    assert store.get(KEY_A) == entry
    assert (entry / "file0.bin").read_bytes().startswith(b"one:0")


def _put_after_barrier(root: str, key: str, outputs: str, barrier: object, results: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    entry = LocalStore(Path(root), clean=False).put(key, Path(outputs), MANIFEST)
    results.put((os.getpid(), str(entry)))  # type: ignore[attr-defined]


@pytest.mark.parametrize("round_", range(5))
def test_two_processes_putting_the_same_key_make_exactly_one_entry(tmp_path: Path, round_: int) -> None:
    store = LocalStore(tmp_path / "store")
    key = f"{round_:02d}" + "e" * 62
    barrier = CTX.Barrier(2)
    results = CTX.Queue()
    workers = [
        CTX.Process(
            target=_put_after_barrier,
            args=(str(store.root), key, str(make_outputs(tmp_path, tag, files=20)), barrier, results),
        )
        for tag in ("writer1", "writer2")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    paths = {results.get(timeout=5)[1] for _ in workers}

    assert paths == {str(store.entry_dir(key))}
    assert visible_entries(store) == [store.entry_dir(key)]
    entry = store.get(key)
    assert entry is not None
    # the entry is entirely one writer's: never a mix of both
    tags = {p.read_bytes().split(b":")[0] for p in entry.glob("file*.bin")}
    assert len(tags) == 1
    assert (entry / "modules" / "kci.ko").read_text() == f"module of {tags.pop().decode()}\n"
    assert list(store.tmp_dir.iterdir()) == []


def _lock_and_report(root: str, key: str, started: str, acquired: str) -> None:
    store = LocalStore(Path(root), clean=False)
    Path(started).write_text("started")
    with store.lock(key):
        Path(acquired).write_text(repr(time.monotonic()))


def test_lock_excludes_other_processes_until_released(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    started, acquired = tmp_path / "started", tmp_path / "acquired"
    with store.lock(KEY_A):
        args = (str(store.root), KEY_A, str(started), str(acquired))
        child = CTX.Process(target=_lock_and_report, args=args)
        child.start()
        deadline = time.monotonic() + 10
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
        assert not acquired.exists(), "the other process got the lock while we held it"
        released = time.monotonic()
    child.join(10)
    assert child.exitcode == 0
    assert float(acquired.read_text()) >= released


def test_lock_on_another_key_does_not_wait(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    acquired = tmp_path / "acquired"
    with store.lock(KEY_A):
        child = CTX.Process(
            target=_lock_and_report, args=(str(store.root), KEY_B, str(tmp_path / "started"), str(acquired))
        )
        child.start()
        child.join(10)
        assert child.exitcode == 0
        assert acquired.exists()


def test_manifests_lists_every_entry_newest_first(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    for index, key in enumerate((KEY_B, KEY_C, KEY_A)):
        store.put(key, make_outputs(tmp_path, f"t{index}"), {**MANIFEST, "flag:n": str(index)})
        time.sleep(0.01)
    listed = list(store.manifests())
    assert [key for key, _ in listed] == [KEY_A, KEY_C, KEY_B]
    assert listed[0][1] == {**MANIFEST, "flag:n": "2"}


def test_manifests_skips_an_entry_with_a_corrupt_entry_json(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put(KEY_A, make_outputs(tmp_path, "a"), MANIFEST)
    broken = store.put(KEY_B, make_outputs(tmp_path, "b"), MANIFEST)
    (broken / "entry.json").write_text("{not json")
    assert [key for key, _ in store.manifests()] == [KEY_A]


def test_alias_roundtrip_and_overwrite(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    request = "req-" + "9" * 60
    assert store.get_alias(request) is None
    store.put_alias(request, KEY_A)
    assert store.get_alias(request) == KEY_A
    assert LocalStore(tmp_path / "store").get_alias(request) == KEY_A
    store.put_alias(request, KEY_B)
    assert store.get_alias(request) == KEY_B
    assert (store.aliases_dir / request).read_text() == KEY_B + "\n"
    assert list(store.tmp_dir.iterdir()) == []
    with pytest.raises(CacheStoreError, match="invalid request key"):
        store.put_alias("a/b", KEY_A)
    with pytest.raises(CacheStoreError, match="invalid build key"):
        store.put_alias(request, "")


def _exit_now() -> None:
    os._exit(0)


def test_opening_the_store_cleans_leftovers_of_dead_or_old_writers(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    child = CTX.Process(target=_exit_now)
    child.start()
    child.join()
    dead_pid = child.pid
    assert dead_pid is not None

    def leftover(name: str, age: float = 0.0) -> Path:
        path = store.tmp_dir / name
        path.mkdir()
        (path / "file0.bin").write_text("partial")
        stamp = time.time() - age
        os.utime(path, (stamp, stamp))
        return path

    dead = leftover(f"{KEY_A}.{dead_pid}.0badf00d")
    old = leftover(f"{KEY_B}.{os.getpid()}.0badf00d", age=2 * 3600)
    fresh = leftover(f"{KEY_C}.{os.getpid()}.0badf00d")
    held = leftover(f"{KEY_A}.{dead_pid}.0000beef", age=2 * 3600)
    guard = os.open(held, os.O_RDONLY)
    fcntl.flock(guard, fcntl.LOCK_EX)  # a live writer (here: us) holds it, whatever its name says
    try:
        LocalStore(store.root)
    finally:
        os.close(guard)

    assert not dead.exists()
    assert not old.exists()
    assert fresh.exists()
    assert held.exists()
    assert store.clean_stale_tmp() == [held]


def test_an_entry_of_the_older_format_without_digests_is_a_miss_and_replaced(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    old = store.entry_dir(KEY_A)
    old.mkdir(parents=True)
    (old / "bzImage").write_text("whatever an old client stored\n")
    (old / "entry.json").write_text(json.dumps({"schema": 1, "key": KEY_A, "created": 1.0, "files": {}}))
    assert store.get(KEY_A) is None, "an entry without per-file digests is never trusted"
    entry = store.put(KEY_A, make_outputs(tmp_path), MANIFEST)
    assert store.get(KEY_A) == entry
    assert json.loads((entry / "entry.json").read_text())["schema"] == cachestore.ENTRY_SCHEMA
    assert (entry / "bzImage").read_bytes().startswith(b"one:0")


@pytest.mark.parametrize("target", ["/etc", "../../outside", "file0.bin"])
def test_put_refuses_any_symlink_but_the_modules_links(tmp_path: Path, target: str) -> None:
    store = LocalStore(tmp_path / "store")
    outputs = make_outputs(tmp_path)
    (outputs / "modules" / "link").symlink_to(target)
    with pytest.raises(CacheStoreError, match=r"modules/link is a symlink"):
        store.put(KEY_A, outputs, MANIFEST)
    assert store.get(KEY_A) is None and visible_entries(store) == []
    assert list(store.tmp_dir.iterdir()) == []


def test_put_strips_setuid_setgid_and_write_bits_from_modes(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    outputs = make_outputs(tmp_path)
    (outputs / "file1.bin").chmod(0o4777)
    (outputs / "file2.bin").chmod(0o2664)
    (outputs / "modules").chmod(0o1777)
    entry = store.put(KEY_A, outputs, MANIFEST)
    info = json.loads((entry / "entry.json").read_text())
    assert (entry / "file1.bin").stat().st_mode & 0o7777 == 0o755 == info["files"]["file1.bin"]["mode"]
    assert (entry / "file2.bin").stat().st_mode & 0o7777 == 0o644 == info["files"]["file2.bin"]["mode"]
    assert (entry / "modules").stat().st_mode & 0o7777 == 0o755


def test_copy_entry_copies_and_verifies_every_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    entry = store.put(KEY_A, make_outputs(tmp_path), MANIFEST)
    dest = tmp_path / "out" / "build"
    cachestore.copy_entry(entry, dest)
    assert (dest / "modules" / "kci.ko").read_text() == "module of one\n"
    assert (dest / "file1.bin").stat().st_ino != (entry / "file1.bin").stat().st_ino, "a copy, not a link"
    assert (dest / "file1.bin").stat().st_mtime == (entry / "file1.bin").stat().st_mtime
    assert os.readlink(dest / "modules/lib/modules/5.10.223-kci/build") == "../../../../kbuild"
    cachestore.copy_entry(entry, dest)  # again over the previous copy
    assert sorted(p.name for p in dest.parent.iterdir()) == ["build"]


@pytest.mark.parametrize("damage", ["same-size-bytes", "symlink-to-outside", "missing"])
def test_copy_entry_of_a_damaged_entry_fails_removes_it_and_keeps_the_previous_output(
    tmp_path: Path, damage: str
) -> None:
    store = LocalStore(tmp_path / "store")
    entry = store.put(KEY_A, make_outputs(tmp_path), MANIFEST)
    dest = tmp_path / "out" / "build"
    cachestore.copy_entry(entry, dest)
    secret = tmp_path / "secret"
    secret.write_text("private key\n")
    victim = entry / "modules" / "kci.ko"
    if damage == "same-size-bytes":
        victim.write_text("module of two\n")
    elif damage == "symlink-to-outside":
        victim.unlink()
        victim.symlink_to(secret)
    else:
        victim.unlink()
    with pytest.raises(CacheStoreError, match=r"damaged .*modules/kci\.ko.*rerun to rebuild it"):
        cachestore.copy_entry(entry, dest)
    assert (dest / "modules" / "kci.ko").read_text() == "module of one\n", "the previous output is intact"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["build"], "no half copy left"
    assert store.get(KEY_A) is None and not entry.exists(), "the damaged entry is gone: the next run rebuilds"
    assert secret.read_text() == "private key\n"


def test_copy_entry_into_an_output_that_already_holds_it_rewrites_nothing(tmp_path: Path) -> None:
    """A local build-cache hit restoring the entry that out/ already holds, untouched, is a stat per file."""
    store = LocalStore(tmp_path / "store")
    entry = store.put(KEY_A, make_outputs(tmp_path), MANIFEST)
    dest = tmp_path / "out" / "build"
    cachestore.copy_entry(entry, dest)
    inodes = {p: p.stat().st_ino for p in dest.rglob("*") if p.is_file()}
    cachestore.copy_entry(entry, dest)
    assert {p: p.stat().st_ino for p in dest.rglob("*") if p.is_file()} == inodes, "copied again"
    assert sorted(p.name for p in dest.parent.iterdir() if not p.name.startswith(".")) == ["build"]


def test_copy_entry_into_its_untouched_restore_still_finds_the_entry_damaged_since(tmp_path: Path) -> None:
    """The skip compares the entry's files too: an entry file changed in the store since the last restore
    (same size, mtime put back) fails the hit and the entry is removed, though out/ itself is untouched."""
    store = LocalStore(tmp_path / "store")
    entry = store.put(KEY_A, make_outputs(tmp_path), MANIFEST)
    dest = tmp_path / "out" / "build"
    cachestore.copy_entry(entry, dest)
    _edit_keeping_times(entry / "modules" / "kci.ko", b"module of two\n")
    with pytest.raises(CacheStoreError):
        cachestore.copy_entry(entry, dest)
    assert store.get(KEY_A) is None, "the damaged entry is gone: the next run rebuilds"
    assert (dest / "modules" / "kci.ko").read_text() == "module of one\n", "out/ keeps its verified copy"


def test_copy_entry_sees_a_name_with_a_newline_added_to_the_restore(tmp_path: Path) -> None:
    """The stat listing separates names by NUL: a planted name holding a newline is still a change."""
    store = LocalStore(tmp_path / "store")
    entry = store.put(KEY_A, make_outputs(tmp_path), MANIFEST)
    dest = tmp_path / "out" / "build"
    cachestore.copy_entry(entry, dest)
    planted = dest / "modules" / "kci.ko\n0 0 f644 0 0"
    planted.write_text("planted\n")
    cachestore.copy_entry(entry, dest)
    assert not planted.exists()


def _edit_keeping_times(path: Path, data: bytes) -> None:
    st = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize(
    "change", ["same-size-bytes-and-mtime", "deleted", "added", "replaced-by-symlink", "chmod", "other-entry"]
)
def test_copy_entry_restores_an_output_changed_since_the_last_restore(tmp_path: Path, change: str) -> None:
    """Whatever happened to out/ since the last restore (edits that keep size and mtime included), the
    next hit gives the entry's exact files back: only an untouched restore is skipped."""
    store = LocalStore(tmp_path / "store")
    entry = store.put(KEY_A, make_outputs(tmp_path), MANIFEST)
    dest = tmp_path / "out" / "build"
    cachestore.copy_entry(entry, dest)
    victim = dest / "modules" / "kci.ko"
    if change == "same-size-bytes-and-mtime":
        _edit_keeping_times(victim, b"module of two\n")
    elif change == "deleted":
        victim.unlink()
    elif change == "added":
        (dest / "modules" / "extra.ko").write_text("planted\n")
    elif change == "replaced-by-symlink":
        victim.unlink()
        victim.symlink_to(entry / "modules" / "kci.ko")
    elif change == "chmod":
        victim.chmod(0o777)
    else:
        other = store.put(KEY_B, make_outputs(tmp_path, "two"), MANIFEST)
        cachestore.copy_entry(other, dest)
    cachestore.copy_entry(entry, dest)
    assert victim.read_text() == "module of one\n" and not victim.is_symlink()
    assert victim.stat().st_mode & 0o777 == 0o644
    assert not (dest / "modules" / "extra.ko").exists()
    assert (dest / "file1.bin").read_bytes() == (entry / "file1.bin").read_bytes()


def _tree(root: Path) -> dict[str, tuple[str, bytes, int]]:
    """Every name under root: kind, content (or link target) and mode."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel, st = path.relative_to(root).as_posix(), path.lstat()
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path).encode(), 0)
        elif path.is_dir():
            found[rel] = ("dir", b"", st.st_mode & 0o7777)
        else:
            found[rel] = ("file", path.read_bytes(), st.st_mode & 0o7777)
    return found


def _two_entries(tmp_path: Path) -> tuple[LocalStore, Path, Path]:
    """Entries A and B of one store, as two builds of an edit apart: B has a file changed, one gone and a
    new folder."""
    store = LocalStore(tmp_path / "store")
    a = make_outputs(tmp_path, "one")
    b = tmp_path / "outputs-b"
    shutil.copytree(a, b, symlinks=True)
    (b / "file1.bin").write_bytes(b"rebuilt\n" * 500)
    (b / "file3.bin").unlink()
    (b / "extmod" / "kci").mkdir(parents=True)
    (b / "extmod" / "kci" / "kci.ko").write_text("new module\n")
    return store, store.put(KEY_A, a, MANIFEST), store.put(KEY_B, b, MANIFEST)


def _inodes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_ino for p in root.rglob("*") if p.is_file()}


def test_copy_entry_over_the_restore_of_another_entry_writes_only_what_differs(tmp_path: Path) -> None:
    """An incremental build's entry after the last one's: the files both have are not written again, and
    the output is exactly what a full copy of the new entry makes."""
    _store, a, b = _two_entries(tmp_path)
    dest, reference = tmp_path / "out" / "build", tmp_path / "reference"
    cachestore.copy_entry(a, dest)
    before = _inodes(dest)
    cachestore.copy_entry(b, dest)
    cachestore.copy_entry(b, reference)
    assert _tree(dest) == _tree(reference)
    after = _inodes(dest)
    assert after["file2.bin"] == before["file2.bin"] and after["modules/kci.ko"] == before["modules/kci.ko"]
    assert after["file1.bin"] != before["file1.bin"] and "file3.bin" not in after
    assert sorted(p.name for p in dest.parent.iterdir() if not p.name.startswith(".")) == ["build"]
    assert not [p for p in dest.rglob("*") if "kci-restore" in p.name], "no temporary file left"
    cachestore.copy_entry(b, dest)  # the stamp now says B: nothing to do
    assert _inodes(dest) == after
    cachestore.copy_entry(a, dest)  # and back
    assert _tree(dest) == _tree(tmp_path / "outputs-one") | {
        rel: kind for rel, kind in _tree(dest).items() if rel in ("entry.json", "manifest.json")
    } | {rel: kind for rel, kind in _tree(dest).items() if rel.startswith("modules/lib/modules/")}
    assert (dest / "file3.bin").is_file() and not (dest / "extmod").exists()


@pytest.mark.parametrize("change", ["same-size-bytes-and-mtime", "added", "older-entry-gone"])
def test_copy_entry_over_a_restore_changed_since_copies_whole(tmp_path: Path, change: str) -> None:
    """Only an untouched restore of an entry still in the store is updated in place; otherwise the output is
    copied whole, and ends exactly as the new entry."""
    _store, a, b = _two_entries(tmp_path)
    dest, reference = tmp_path / "out" / "build", tmp_path / "reference"
    cachestore.copy_entry(a, dest)
    if change == "same-size-bytes-and-mtime":
        _edit_keeping_times(dest / "file2.bin", (dest / "file2.bin").read_bytes().replace(b"one", b"six"))
    elif change == "added":
        (dest / "modules" / "planted.ko").write_text("planted\n")
    else:
        shutil.rmtree(a)
    before = _inodes(dest)
    cachestore.copy_entry(b, dest)
    cachestore.copy_entry(b, reference)
    assert _tree(dest) == _tree(reference)
    assert _inodes(dest).get("modules/kci.ko") != before["modules/kci.ko"], "copied whole"


def test_copy_entry_over_another_restore_from_a_damaged_entry_keeps_the_output(tmp_path: Path) -> None:
    store, a, b = _two_entries(tmp_path)
    dest = tmp_path / "out" / "build"
    cachestore.copy_entry(a, dest)
    restored = _tree(dest)
    victim = b / "file1.bin"
    victim.write_bytes(victim.read_bytes().replace(b"rebuilt", b"planted"))  # same size, other bytes
    with pytest.raises(CacheStoreError, match=r"damaged .*file1\.bin.*rerun to rebuild it"):
        cachestore.copy_entry(b, dest)
    assert _tree(dest) == restored, "the previous output is intact, without temporary files"
    assert store.get(KEY_B) is None and not b.exists(), "the damaged entry is gone: the next run rebuilds"
    cachestore.copy_entry(a, dest)  # still known to be A's restore
