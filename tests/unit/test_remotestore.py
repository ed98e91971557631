"""kernel_ci.cache.remote against a real service on 127.0.0.1: push an entry, restore it into another local
store."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from kernel_ci.cache.remote import (
    CacheClient,
    RemoteConfig,
    RemoteStore,
    attach_test_run,
    open_store,
)
from kernel_ci.cache.server.server import ServerConfig
from kernel_ci.cache.store import BuildStore, CacheStoreError, LocalStore
from kernel_ci.cache.tarformat import write_tar
from kernel_ci.core.settings import Settings
from tests.cacheservice import TOKEN, server_in_thread

KEY = "5e" * 32
REQUEST_KEY = "7a" * 32
INPUTS = {"source": "linux-5.10.223 sha256:" + "f" * 64, "config:CONFIG_PROC_FS": "y"}


def synthetic_outputs(base: Path) -> Path:
    out = base / "outputs"
    (out / "kbuild" / "include" / "generated").mkdir(parents=True)
    (out / "kbuild" / "Makefile").write_text("all:\n")
    (out / "kbuild" / "include" / "generated" / "autoconf.h").write_text("#define CONFIG_X 1\n")
    (out / "kbuild" / "scripts").mkdir()
    script = out / "kbuild" / "scripts" / "tool"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    (out / "modules" / "lib" / "modules" / "5.10.223-kci").mkdir(parents=True)
    (out / "modules" / "lib" / "modules" / "5.10.223-kci" / "build").symlink_to("/build/out")
    (out / "patches").mkdir()
    (out / "patches" / "ci-smoke.mbox").write_text("From 1\n")
    (out / "bzImage").write_bytes(os.urandom(300_000))
    (out / "config").write_text("CONFIG_X=y\n")
    (out / "metadata.json").write_text(
        json.dumps({"kernel": {"version": "5.10.223"}, "series": ["ci-smoke"]})
    )
    return out


def tree_digest(root: Path) -> dict[str, str]:
    """Every path below root -> a digest of its type, mode and content (entry.json differs by design)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel in ("entry.json",):
            continue
        if path.is_symlink():
            found[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            found[rel] = "dir"
        else:
            content = hashlib.sha256(path.read_bytes()).hexdigest()
            found[rel] = f"{oct(path.stat().st_mode & 0o777)}:{content}"
    return found


def test_push_then_restore_into_an_empty_local_store(tmp_path: Path) -> None:
    with server_in_thread(ServerConfig(data=tmp_path / "server")) as server:
        config = RemoteConfig(url=server.url, token=TOKEN)
        first = RemoteStore(LocalStore(tmp_path / "a"), CacheClient(config))
        assert isinstance(first, BuildStore)
        key = KEY
        entry = first.put(
            key, synthetic_outputs(tmp_path), INPUTS, move=True
        )  # publishes locally, then pushes
        first.put_alias(REQUEST_KEY, key)
        doc = first.client.get_manifest(key)
        assert doc is not None
        kinds = {o["name"]: o["kind"] for o in doc["outputs"]}
        assert kinds["kbuild"] == "tar" and kinds["modules"] == "tar" and kinds["bzImage"] == "file"
        assert any(n.startswith("patches/") and k == "file" for n, k in kinds.items())
        assert first.push(key, entry) == "exists"  # same entry again: nothing new, the tar is reproducible

        second = RemoteStore(LocalStore(tmp_path / "b"), CacheClient(RemoteConfig(url=server.url)))
        assert second.get_alias(REQUEST_KEY) == key
        restored = second.get(key)
        assert restored is not None and restored.parent.parent == second.local.entries_dir
        assert tree_digest(restored) == tree_digest(entry)
        # the restore publishes from what it wrote, not from a scan: its entry.json still says what the
        # scan of the pushed entry said (every file and directory, the links)
        built, got = (json.loads((e / "entry.json").read_text()) for e in (entry, restored))
        assert (got["files"], got["dirs"], got["links"]) == (built["files"], built["dirs"], built["links"])
        assert json.loads((restored / "manifest.json").read_text()) == INPUTS
        assert second.get("00" * 32) is None  # a remote miss is a miss


def test_a_down_service_is_a_miss_not_a_failure(tmp_path: Path) -> None:
    store = RemoteStore(
        LocalStore(tmp_path / "a"), CacheClient(RemoteConfig(url="http://127.0.0.1:9", token="t"))
    )
    assert store.get(KEY) is None
    assert store.get_alias(REQUEST_KEY) is None
    entry = store.put(KEY, synthetic_outputs(tmp_path), INPUTS, move=True)  # push fails: a warning only
    assert store.get(KEY) == entry


def test_tar_is_reproducible(tmp_path: Path) -> None:
    out = synthetic_outputs(tmp_path)
    first, second = io.BytesIO(), io.BytesIO()
    write_tar(out / "kbuild", "kbuild", first)
    os.utime(out / "kbuild")  # a directory's atime/mtime change of the root itself is not recorded
    write_tar(out / "kbuild", "kbuild", second)
    assert first.getvalue() == second.getvalue()


def tarfile_reference(directory: Path, arcname: str) -> bytes:
    """The tar tarfile's PAX format makes of the same members, in the same order (the writer before
    write_tar was hand-written): an entry pushed by an older client must not be uploaded again."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for current, dirs, files in os.walk(directory):
            dirs.sort()
            for name in [*dirs, *sorted(files)]:
                path = Path(current, name)
                st = path.lstat()
                info = tarfile.TarInfo((Path(arcname) / path.relative_to(directory)).as_posix())
                info.mode, info.mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if path.is_dir():
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                else:
                    info.size = st.st_size
                    with open(path, "rb") as handle:
                        tar.addfile(info, handle)
    return buffer.getvalue()


def test_write_tar_writes_what_tarfile_wrote(tmp_path: Path) -> None:
    out = synthetic_outputs(tmp_path)
    kbuild = out / "kbuild"
    deep = kbuild / ("d" * 60) / ("e" * 60)  # names over ustar's 100 characters: PAX path records
    deep.mkdir(parents=True)
    (deep / "long-header-name.h").write_bytes(b"x" * 1000)
    (deep / "empty").write_bytes(b"")
    (kbuild / "n\u00e4me.h").write_text("not ASCII\n")
    (kbuild / "block").write_bytes(os.urandom(512 * 3))
    os.utime(kbuild / "block", (0, 8**11 + 5))  # past the octal mtime field: a PAX mtime record
    os.utime(deep / "empty", (0, -5))  # before 1970: a PAX mtime record too
    ours = io.BytesIO()
    digest, size = write_tar(kbuild, "kbuild", ours)
    assert ours.getvalue() == tarfile_reference(kbuild, "kbuild")
    assert (digest, size) == (hashlib.sha256(ours.getvalue()).hexdigest(), len(ours.getvalue()))


def test_an_entry_with_long_names_and_odd_mtimes_round_trips(tmp_path: Path) -> None:
    """write_tar's PAX records (long names, mtimes before 1970 and past the octal field) are read back by
    the restore's own tar reader, mtimes included."""
    out = synthetic_outputs(tmp_path)
    deep = out / "kbuild" / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / "old.h").write_text("old\n")
    (deep / "late.h").write_text("late\n")
    os.utime(deep / "old.h", (0, -5))
    os.utime(deep / "late.h", (0, 8**11 + 5))
    with server_in_thread(ServerConfig(data=tmp_path / "server")) as server:
        pusher = RemoteStore(LocalStore(tmp_path / "a"), CacheClient(RemoteConfig(server.url, TOKEN)))
        pusher.put(KEY, out, INPUTS, move=True)
        reader = RemoteStore(LocalStore(tmp_path / "b"), CacheClient(RemoteConfig(server.url)))
        entry = reader.get(KEY)
        assert entry is not None
        restored = entry / "kbuild" / ("d" * 60) / ("e" * 60)
        assert (restored / "old.h").read_text() == "old\n"
        assert int((restored / "old.h").stat().st_mtime) == -5
        assert int((restored / "late.h").stat().st_mtime) == 8**11 + 5
        pusher.client.close()
        reader.client.close()


def test_configuration_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KERNEL_CI_CACHE_URL", raising=False)
    monkeypatch.delenv("KERNEL_CI_CACHE_TOKEN", raising=False)
    monkeypatch.delenv("CCACHE_REMOTE_STORAGE", raising=False)
    monkeypatch.delenv("KERNEL_CI_CACHE_READ_TOKEN", raising=False)
    config_file = tmp_path / "config.toml"
    monkeypatch.setenv("KERNEL_CI_CONFIG", str(config_file))
    assert RemoteConfig.resolve() is None
    assert isinstance(open_store(Settings.load(), local=LocalStore(tmp_path / "l")), LocalStore)
    config_file.write_text('[cache]\nurl = "http://127.0.0.1:1/"\ntoken = "from-file"\n')
    assert RemoteConfig.resolve() == RemoteConfig("http://127.0.0.1:1", "from-file", True)
    monkeypatch.setenv("KERNEL_CI_CACHE_URL", "http://127.0.0.1:2")
    monkeypatch.setenv("KERNEL_CI_CACHE_TOKEN", "from-env")
    assert RemoteConfig.resolve().url == "http://127.0.0.1:2"  # type: ignore[union-attr]
    config = RemoteConfig.resolve("http://127.0.0.1:3")
    assert config is not None and config.url == "http://127.0.0.1:3" and config.token == "from-env"
    settings = Settings.load("http://127.0.0.1:3")
    store = open_store(settings, local=LocalStore(tmp_path / "l"))
    assert isinstance(store, RemoteStore)
    # the ccache storage travels in the settings (to the BuildRequest), not through this process's environment
    assert "CCACHE_REMOTE_STORAGE" not in os.environ
    # The builder container (patch code) never gets the write token by default: no read token configured,
    # so none at all, and ccache told the storage is read-only.
    assert settings.ccache_remote == "http://127.0.0.1:3/ccache/|read-only=true"
    monkeypatch.setenv("KERNEL_CI_CACHE_READ_TOKEN", "read-from-env")
    assert Settings.load("http://127.0.0.1:3").ccache_remote == (
        "http://127.0.0.1:3/ccache/|bearer-token=read-from-env|read-only=true"
    )
    trusted = Settings.load("http://127.0.0.1:3", trusted_ccache_writes=True)
    assert trusted.ccache_remote == "http://127.0.0.1:3/ccache/|bearer-token=from-env"
    assert "read-from-env" not in repr(trusted) and "from-env" not in repr(trusted)
    monkeypatch.delenv("KERNEL_CI_CACHE_READ_TOKEN")
    config_file.write_text('[cache]\nurl = "http://127.0.0.1:1/"\nread_token = "read-from-file"\n')
    assert Settings.load().cache_read_token == "read-from-file"
    assert (
        Settings.load().ccache_remote
        == "http://127.0.0.1:2/ccache/|bearer-token=read-from-file|read-only=true"
    )
    # the user's own CCACHE_REMOTE_STORAGE is an input, and wins
    monkeypatch.setenv("CCACHE_REMOTE_STORAGE", "http://elsewhere/ccache/")
    assert Settings.load("http://127.0.0.1:3").ccache_remote == "http://elsewhere/ccache/"
    # ccache = false in the config file: the service for builds, not for ccache
    monkeypatch.delenv("CCACHE_REMOTE_STORAGE")
    monkeypatch.delenv("KERNEL_CI_CACHE_URL")
    config_file.write_text('[cache]\nurl = "http://127.0.0.1:1/"\nccache = false\n')
    assert Settings.load().ccache_remote is None and Settings.load().cache_url == "http://127.0.0.1:1"
    assert "from-env" not in repr(Settings.load())  # the token is never printed with the settings


def test_a_test_run_is_attached_to_the_pushed_build(tmp_path: Path) -> None:
    junit = (
        b'<testsuites><testsuite name="smoke"><testcase name="boot"/><testcase name="x">'
        b"<error message='panic'/></testcase></testsuite></testsuites>"
    )
    with server_in_thread(ServerConfig(data=tmp_path / "server")) as server:
        store = RemoteStore(LocalStore(tmp_path / "a"), CacheClient(RemoteConfig(server.url, TOKEN)))
        outputs = synthetic_outputs(tmp_path)
        (outputs / "metadata.json").write_text(json.dumps({"build_key": KEY}))
        entry = store.put(KEY, outputs, INPUTS, move=True)
        run_dir = tmp_path / "out" / "runs" / "20261125T143735-0bko5tjq"
        run_dir.mkdir(parents=True)
        (run_dir / "junit.xml").write_bytes(junit)
        (run_dir / "console.log").write_text("Kernel panic - not syncing\n")
        (tmp_path / "out" / "latest").symlink_to("runs/20261125T143735-0bko5tjq")
        attach_test_run(store, entry, tmp_path / "out", "PANIC")
        doc = store.client.get_manifest(KEY)
        assert doc is not None
        (run,) = doc["runs"]
        assert run["run_id"] == "20261125T143735-0bko5tjq" and run["outcome"] == "PANIC"
        assert run["counts"]["errors"] == 1 and run["counts"]["passed"] == 1
        page = store.client.http.get(f"/builds/{KEY}").text
        assert "Kernel panic" not in page and "console log" in page and "JUnit XML" in page


def test_a_corrupt_remote_blob_is_a_miss_and_leaves_nothing_locally(tmp_path: Path) -> None:
    with server_in_thread(ServerConfig(data=tmp_path / "server")) as server:
        first = RemoteStore(LocalStore(tmp_path / "a"), CacheClient(RemoteConfig(server.url, TOKEN)))
        first.put(KEY, synthetic_outputs(tmp_path), INPUTS, move=True)
        doc = first.client.get_manifest(KEY)
        assert doc is not None
        tar = next(o for o in doc["outputs"] if o["name"] == "kbuild")
        blob = server.data / "blobs" / tar["sha256"][:2] / tar["sha256"]
        blob.write_bytes(blob.read_bytes().replace(b"CONFIG_X 1", b"CONFIG_X 0"))  # bit rot, same size
        second = RemoteStore(LocalStore(tmp_path / "b"), CacheClient(RemoteConfig(server.url)))
        assert second.get(KEY) is None
        assert second.local.get(KEY) is None
        assert list(second.local.tmp_dir.iterdir()) == []  # the partial restore was discarded
        first.push(KEY, first.local.get(KEY))  # type: ignore[arg-type]  # the next push heals the service
        assert second.get(KEY) is not None


def test_the_modules_links_are_made_by_the_restoring_client_not_downloaded(tmp_path: Path) -> None:
    with server_in_thread(ServerConfig(data=tmp_path / "server")) as server:
        first = RemoteStore(LocalStore(tmp_path / "a"), CacheClient(RemoteConfig(server.url, TOKEN)))
        first.put(KEY, synthetic_outputs(tmp_path), INPUTS, move=True)
        doc = first.client.get_manifest(KEY)
        assert doc is not None
        tar = next(o for o in doc["outputs"] if o["name"] == "modules")
        blob = server.data / "blobs" / tar["sha256"][:2] / tar["sha256"]
        with tarfile.open(blob) as archive:
            assert all(member.isdir() or member.isreg() for member in archive.getmembers())
        second = RemoteStore(LocalStore(tmp_path / "b"), CacheClient(RemoteConfig(server.url)))
        restored = second.get(KEY)
        assert restored is not None
        link = restored / "modules" / "lib" / "modules" / "5.10.223-kci" / "build"
        assert os.readlink(link) == "../../../../kbuild"  # not the builder container's /build/out
        assert (link / "Makefile").read_text() == "all:\n"


def test_a_damaged_local_entry_is_never_pushed(tmp_path: Path) -> None:
    with server_in_thread(ServerConfig(data=tmp_path / "server")) as server:
        store = RemoteStore(
            LocalStore(tmp_path / "a"), CacheClient(RemoteConfig(server.url, TOKEN)), push=False
        )
        entry = store.put(KEY, synthetic_outputs(tmp_path), INPUTS, move=True)
        (entry / "kbuild" / "Makefile").write_text("ALL:\n")  # same size, other bytes
        with pytest.raises(CacheStoreError, match=r"kbuild/Makefile.*no longer matches its digest"):
            store.push(KEY, entry)
        (entry / "kbuild" / "Makefile").write_text("all:\n")
        (entry / "config").write_text("CONFIG_Y=y\n")
        with pytest.raises(CacheStoreError, match=r"config: it does not match the entry's entry\.json"):
            store.push(KEY, entry)
        assert store.client.get_manifest(KEY) is None
