"""A BuildStore backed by the shared cache service (``kernel-ci cache serve``), in front of the local store.

Look-ups go to the local store first, then to the service; a remote hit is downloaded, verified blob by
blob and published into the local store atomically (``LocalStore.put``), so everything downstream still
reads a local directory. After a successful build the entry is pushed: missing blobs first, the manifest
last (the service refuses a manifest whose blobs are not all there). The service being down never fails a
build: a failed look-up is a miss and a failed push a warning.

How an entry is uploaded: its top-level files (bzImage, config, System.map, metadata.json) and the files of
``patches/`` one blob each (people download those from the web page), every other directory (``kbuild/``:
~11,000 files, ``modules/``, ``extmod/``) as ONE tar blob. One request per file would cost thousands of
round trips and index rows per build for no benefit (nobody fetches one kbuild header alone), and a tar
keeps modes and mtimes (kbuild compares them when building out-of-tree modules). The tar is reproducible
for a given entry (sorted names, uid/gid 0, no user names, no hard-link records) so pushing the same entry
twice uploads nothing. No compression: the service is on a LAN or loopback, where zstd/gzip would cost
more CPU time than it saves.

Trust: anyone holding a write token can publish any bytes under any key, so a restore trusts nothing it
downloads. Each entry carries ``entry-digests.json`` (the sha256, size and mode of every file, from the
pusher's entry.json); its blob is checked against the manifest like every other. A tar member must be a
regular file or directory below its output's name, listed there, with exactly the listed bytes: no
symlinks, hard links, devices, FIFOs, setuid bits, absolute names or ``..``. Members are written by
``cachestore.TreeWriter`` (never through a symlink, never over an existing file) into a staging directory
that is published only once all of it matches (``LocalStore.put(expected=...)``); the modules' build and
source links are made by the client. tarfile's own extraction (even with ``filter="data"``) is not used:
it accepts symlinks and hard links inside the destination and cannot check a member against a digest
before it is on disk. An entry without the digests (an older client pushed it) is a miss.

The tar blobs are written and read by cache/tarformat.py (by hand, for the subset an entry's tar holds:
tarfile's per-member Python was most of a restore and of a push); verified members are written by two
threads, because creating ~11,600 inodes is most of what is left of a restore and the kernel does it with
the GIL released.

Configuration (first found wins, read once by kernel_ci.core.settings): ``--cache-url``,
``$KERNEL_CI_CACHE_URL`` (+ ``$KERNEL_CI_CACHE_TOKEN``, ``$KERNEL_CI_CACHE_READ_TOKEN``), the ``[cache]``
table of ``$KERNEL_CI_CONFIG`` or ``~/.config/kernel-ci/config.toml``::

    [cache]
    url = "http://cache.example:8080"
    token = "..."            # needed to push; reads may be anonymous
    read_token = "..."       # what the builder container gets for ccache (a --read-token of the service)
    ccache = true            # also use the service as ccache remote storage (default true)

The builder container runs patch code, so its ccache credential is the read token (or none), never the
write token, unless the user says the series is trusted (``--trusted-ccache-writes``): see SECURITY.md.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from kernel_ci.cache.store import (
    DIGESTS_FILE,
    ENTRY_FILE,
    ENTRY_SCHEMA,
    MANIFEST_FILE,
    RESERVED_NAMES,
    CacheStoreError,
    FileRecord,
    LocalStore,
    TreeWriter,
    UnsafeEntryError,
    WrittenTree,
    check_record,
    check_rel_path,
    read_entry_info,
)
from kernel_ci.cache.tarformat import CHUNK, Blob, extract_blob, write_tar
from kernel_ci.core.console import console, warn
from kernel_ci.core.digest import file_digest
from kernel_ci.core.errors import InfrastructureError
from kernel_ci.core.settings import TOKEN_ENV, Settings, ccache_storage

FILE_BY_FILE_DIRS = frozenset({"patches"})
DIGESTS_OUTPUT = DIGESTS_FILE
MAX_DIGESTS_BYTES = 64 * 1024 * 1024


class RemoteCacheError(InfrastructureError):
    pass


@dataclass
class RemoteConfig:
    url: str
    token: str | None = None
    ccache: bool = True
    read_token: str | None = None  # for the builder container's ccache: it runs untrusted patch code

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteConfig | None:
        """The service the settings name, if any (Settings.load read flags, environment and file)."""
        if settings.cache_url is None:
            return None
        ccache = settings.ccache_remote is not None
        return cls(
            url=settings.cache_url,
            token=settings.cache_token,
            ccache=ccache,
            read_token=settings.cache_read_token,
        )

    @classmethod
    def resolve(cls, cli_url: str | None = None) -> RemoteConfig | None:
        return cls.from_settings(Settings.load(cli_url))

    def ccache_storage(self, *, trusted_writes: bool = False) -> str:
        """CCACHE_REMOTE_STORAGE for this service (ccache sends the token as ``Authorization: Bearer``).

        The builder container gets it, and patch code runs there: by default the read token (or none) and
        ccache's ``read-only`` attribute, so that the shared ccache cannot be poisoned by a series; the write
        token only when the user vouches for the series (trusted_writes, ``--trusted-ccache-writes``)."""
        token = self.token if trusted_writes else self.read_token
        return ccache_storage(self.url, token, writable=trusted_writes)


class CacheClient:
    """The service's build API over HTTP (httpx)."""

    def __init__(self, config: RemoteConfig, timeout: float = 60.0) -> None:
        import httpx

        self._httpx = httpx
        self.config = config
        headers = {"User-Agent": "kernel-ci"}
        if config.token:
            headers["Authorization"] = f"Bearer {config.token}"
        self.http = httpx.Client(base_url=config.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _check(self, response: Any, what: str) -> None:
        if response.status_code >= 400:
            try:
                reason = response.json().get("error", response.text)
            except ValueError:
                reason = response.text[:300]
            raise RemoteCacheError(f"{what}: HTTP {response.status_code}: {reason}")

    def get_manifest(self, key: str) -> dict[str, Any] | None:
        response = self.http.get(f"/api/v1/builds/{key}")
        if response.status_code == 404:
            return None
        self._check(response, f"manifest {key[:12]}")
        return response.json()

    def get_alias(self, request_key: str) -> str | None:
        response = self.http.get(f"/api/v1/aliases/{request_key}")
        if response.status_code == 404:
            return None
        self._check(response, "alias")
        return response.json()["key"]

    def put_alias(self, request_key: str, key: str) -> None:
        self._check(self.http.put(f"/api/v1/aliases/{request_key}", json={"key": key}), "alias")

    def missing(self, digests: list[str]) -> list[str]:
        response = self.http.post("/api/v1/missing-blobs", json={"digests": digests})
        self._check(response, "missing blobs")
        return response.json()["missing"]

    def put_blob(self, digest: str, size: int, path: Path) -> None:
        def body() -> Iterator[bytes]:
            with open(path, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    yield chunk

        response = self.http.put(
            f"/api/v1/blobs/{digest}",
            content=body(),
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        )
        self._check(response, f"upload of blob {digest[:12]}")

    def put_manifest(self, key: str, doc: dict[str, Any]) -> str:
        response = self.http.put(f"/api/v1/builds/{key}", json=doc)
        self._check(response, f"publishing build {key[:12]}")
        return response.json()["status"]

    def download(self, digest: str, size: int, out: BinaryIO) -> None:
        """The blob into out, verified against its digest and size (raises on a mismatch)."""
        hasher = hashlib.sha256()
        count = 0
        with self.http.stream("GET", f"/api/v1/blobs/{digest}") as response:
            self._check(response, f"blob {digest[:12]}")
            for chunk in response.iter_bytes():  # as received: re-chunking would copy every byte again
                hasher.update(chunk)
                count += len(chunk)
                if count > size:
                    break
                out.write(chunk)
        if count != size or hasher.hexdigest() != digest:
            raise RemoteCacheError(
                f"blob {digest[:12]}: got {count} bytes hashing to {hasher.hexdigest()[:12]}, "
                f"expected {size} bytes hashing to {digest[:12]}"
            )

    def fetch_bytes(self, digest: str, size: int, limit: int) -> bytes:
        """A small blob in memory, verified against its digest and size."""
        if size > limit:
            raise RemoteCacheError(f"blob {digest[:12]}: {size} bytes, more than the {limit} allowed")
        response = self.http.get(f"/api/v1/blobs/{digest}")
        self._check(response, f"blob {digest[:12]}")
        data = response.content
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise RemoteCacheError(f"blob {digest[:12]}: its bytes do not match its digest")
        return data

    def extract(
        self,
        digest: str,
        size: int,
        destination: Path,
        output: str,
        records: Mapping[str, FileRecord],
        writer: TreeWriter | None = None,
    ) -> None:
        """Unpack the tar blob of output into destination as it downloads, checking every member against
        records (see extract_members); raises if the service sends more or fewer than size bytes.

        The blob's own sha256 is not computed: what a restore keeps of a tar is its members' bytes, each
        checked against its listed sha256, and their names and modes, checked against the same list; the
        rest (headers, padding) is parsed strictly, each header against its checksum. The service chose
        that digest itself, so matching it would prove nothing more (SECURITY.md: nothing it sends is
        trusted), and it cost a second sha256 pass over every byte."""
        with self.http.stream("GET", f"/api/v1/blobs/{digest}") as response:
            self._check(response, f"blob {digest[:12]}")
            # the chunks as they are received (64 KiB reads), not re-chunked to CHUNK: httpx's re-chunking
            # copied every byte twice more (~0.05-0.1 s of this thread for kbuild/'s 64 MB tar)
            blob = Blob(response.iter_bytes(), size, f"blob {digest[:12]}")
            extract_blob(blob, destination, output, records, writer)
            blob.drain()
        if blob.count != size:
            raise RemoteCacheError(f"blob {digest[:12]}: got {blob.count} bytes, expected {size}")

    def put_run(self, key: str, run_id: str, doc: dict[str, Any]) -> dict[str, Any]:
        response = self.http.put(f"/api/v1/builds/{key}/runs/{run_id}", json=doc)
        self._check(response, f"attaching run {run_id}")
        return response.json()


def parse_digests(data: bytes, key: str) -> tuple[dict[str, FileRecord], list[str]]:
    """The per-file records and directories of a downloaded entry-digests.json (validated)."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise UnsafeEntryError(f"{DIGESTS_FILE} is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("schema") != ENTRY_SCHEMA or doc.get("key") != key:
        raise UnsafeEntryError(f"{DIGESTS_FILE} is not of entry format {ENTRY_SCHEMA} for build {key[:12]}")
    files, dirs = doc.get("files"), doc.get("dirs", [])
    if not isinstance(files, dict) or not isinstance(dirs, list):
        raise UnsafeEntryError(f"{DIGESTS_FILE}: files must be an object and dirs a list")
    records = {rel: check_record(rel, record) for rel, record in files.items()}  # checks each path
    for rel in dirs:
        check_rel_path(rel)
    for rel in [*records, *dirs]:
        if rel.split("/", 1)[0] in RESERVED_NAMES:
            raise UnsafeEntryError(f"{DIGESTS_FILE} lists {rel!r}, a name reserved for the store")
    return records, [str(d) for d in dirs]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a restore: its ~100,000 short-lived objects (headers, names,
    tuples; no cycles) triggered a collection every 700 allocations, each also walking the ~12,000 records
    of the digest list (~0.1 s of a restore). Whatever cycles it does leave are collected afterwards."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class RemoteStore:
    """BuildStore: local first, then the service; pushes what is built."""

    def __init__(self, local: LocalStore, client: CacheClient, push: bool = True) -> None:
        self.local = local
        self.client = client
        self.push_enabled = push and bool(client.config.token)
        self.root = local.root

    def __repr__(self) -> str:
        return f"RemoteStore({self.local!r}, {self.client.config.url!r})"

    # -- BuildStore ---------------------------------------------------------------------------

    def get(self, key: str) -> Path | None:
        found = self.local.get(key)
        if found is not None:
            return found
        try:
            return self.restore(key)
        except Exception as exc:
            warn(f"shared build cache {self.client.config.url}: look-up of {key[:12]} failed ({exc}); a miss")
            return None

    def put(self, key: str, outputs: Path, manifest: Mapping[str, str], *, move: bool = False) -> Path:
        entry = self.local.put(key, outputs, manifest, move=move)
        if self.push_enabled:
            try:
                self.push(key, entry)
            except Exception as exc:
                warn(f"could not push build {key[:12]} to {self.client.config.url}: {exc}")
        return entry

    def manifests(self) -> Iterator[tuple[str, dict[str, str]]]:
        return self.local.manifests()

    def get_alias(self, request_key: str) -> str | None:
        found = self.local.get_alias(request_key)
        if found is not None:
            return found
        try:
            return self.client.get_alias(request_key)
        except Exception as exc:
            warn(f"shared build cache {self.client.config.url}: alias look-up failed ({exc})")
            return None

    def put_alias(self, request_key: str, key: str) -> None:
        self.local.put_alias(request_key, key)
        if self.push_enabled:
            try:
                self.client.put_alias(request_key, key)
            except Exception as exc:
                warn(f"could not push a build alias to {self.client.config.url}: {exc}")

    def lock(self, key: str) -> AbstractContextManager[None]:
        return self.local.lock(key)

    # -- transfer -----------------------------------------------------------------------------

    def restore(self, key: str) -> Path | None:
        """Download a remote entry into the local store (verified, published atomically); None on a miss."""
        with _gc_paused():
            return self._restore(key)

    def _restore(self, key: str) -> Path | None:
        doc = self.client.get_manifest(key)
        if doc is None:
            return None
        started = time.monotonic()
        outputs = {output["name"]: output for output in doc["outputs"]}
        listing = outputs.pop(DIGESTS_FILE, None)
        if listing is None:
            console.print(
                f"[dim]shared build cache: build {key[:12]} has no per-file digests (an older client pushed "
                "it); not trusted, a miss[/]"
            )
            return None
        records, dirs = parse_digests(
            self.client.fetch_bytes(listing["sha256"], listing["size"], MAX_DIGESTS_BYTES), key
        )
        staging = Path(tempfile.mkdtemp(prefix=f"restore-{key[:12]}.", dir=self.local.tmp_dir))
        try:
            # the largest output (kbuild/'s tar: ~11,600 files) in this thread with one writer for it (each
            # directory made and opened once), the others meanwhile in another thread (the downloads and
            # their hashing and writing mostly release the GIL), each with its own TreeWriter
            largest = max(outputs, key=lambda name: int(outputs[name]["size"]), default=None)
            written = WrittenTree()  # what was written and verified, for the publish (no second scan)
            with TreeWriter(staging, written=written) as writer:
                with ThreadPoolExecutor(1, "kci-restore-rest") as rest:
                    others = rest.submit(self._restore_outputs, outputs, largest, staging, records, written)
                    total = 0
                    if largest is not None:
                        total += self._restore_output(outputs[largest], largest, staging, records, writer)
                    total += others.result()
                # the listed directories a tar did not bring (a tar holds every directory of its output,
                # made as its member arrives, while the writer threads write the files before it)
                for rel in dirs:
                    writer.directory(tuple(rel.split("/")))  # each was checked by parse_digests
            # every file was checked against records before it was written, and written recorded each one:
            # put publishes from that record; not durable: it can be downloaded again and every use
            # re-verifies it (cachestore)
            entry = self.local.put(
                key,
                staging,
                doc.get("inputs", {}),
                move=True,
                expected=records,
                verified=True,
                durable=False,
                written=written,
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        seconds = time.monotonic() - started
        console.print(
            f"[green]shared build cache hit[/]: {key[:16]} downloaded from {self.client.config.url} "
            f"({total / 1e6:.1f} MB in {seconds:.1f} s)"
        )
        return entry

    def _restore_outputs(
        self,
        outputs: Mapping[str, Mapping[str, Any]],
        skip: str | None,
        staging: Path,
        records: Mapping[str, FileRecord],
        written: WrittenTree,
    ) -> int:
        """Every output but skip into staging, one after the other (one TreeWriter of this thread); their
        total size."""
        with TreeWriter(staging, written=written) as writer:
            return sum(
                self._restore_output(output, name, staging, records, writer)
                for name, output in outputs.items()
                if name != skip
            )

    def _restore_output(
        self,
        output: Mapping[str, Any],
        name: str,
        staging: Path,
        records: Mapping[str, FileRecord],
        writer: TreeWriter,
    ) -> int:
        """One output of the manifest into staging, checked (see restore); its size."""
        parts = check_rel_path(name, "output name")
        if parts[0] in RESERVED_NAMES:
            raise UnsafeEntryError(f"the service sent an unsafe output name {name!r}")
        if output.get("kind") == "tar":
            if len(parts) != 1:
                raise UnsafeEntryError(f"tar output {name!r} must be a top-level name")
            # unpacked while it streams in (no temporary copy), every member checked; the blob's digest is
            # checked at the end: any failure discards the whole staging directory
            self.client.extract(output["sha256"], output["size"], staging, name, records, writer)
        else:
            self._download_file(output, name, parts, records, writer)
        return int(output["size"])

    def _download_file(
        self,
        output: Mapping[str, Any],
        name: str,
        parts: tuple[str, ...],
        records: Mapping[str, FileRecord],
        writer: TreeWriter,
    ) -> None:
        """A plain-file output into staging: it must be listed, with the blob's digest and size."""
        record = records.get(name)
        if record is None or (record["sha256"], record["size"]) != (output["sha256"], output["size"]):
            raise UnsafeEntryError(f"output {name!r} does not match the entry's per-file digests")
        # TreeWriter refuses a symlink on the way (there is none: staging never gets one) or a second copy;
        # a failure leaves a partial file in staging, which is discarded as a whole
        with writer.create(parts, record["mode"]) as out:
            self.client.download(output["sha256"], output["size"], out)
        if writer.written is not None:
            writer.written.file(name)

    def pack(self, entry: Path, workdir: Path) -> list[tuple[dict[str, Any], Path]]:
        """The outputs of an entry as (output record, file to upload) pairs; tars and the per-file digests
        are written to workdir. Every file must still match the entry's entry.json."""
        info = read_entry_info(entry)
        if info is None:
            raise CacheStoreError(
                f"cannot push {entry}: no valid {ENTRY_FILE} of entry format {ENTRY_SCHEMA}"
            )
        records = {rel: check_record(rel, record) for rel, record in info["files"].items()}
        packed: list[tuple[dict[str, Any], Path]] = []
        for child in sorted(entry.iterdir()):
            name = child.name
            if name in RESERVED_NAMES:
                continue
            if child.is_symlink():
                raise CacheStoreError(f"cannot push {entry}: top-level symlink {name}")
            if child.is_dir() and name in FILE_BY_FILE_DIRS:
                for path in sorted(p for p in child.rglob("*") if p.is_file() and not p.is_symlink()):
                    packed.append(self._record(path.relative_to(entry).as_posix(), path, "file", records))
            elif child.is_dir():
                tar_path = workdir / f"{name}.tar"
                with open(tar_path, "wb") as out:
                    digest, size = write_tar(child, name, out, records)
                packed.append(({"name": name, "sha256": digest, "size": size, "kind": "tar"}, tar_path))
            elif child.is_file():
                packed.append(self._record(name, child, "file", records))
        digests = workdir / DIGESTS_FILE
        document = {
            "schema": ENTRY_SCHEMA,
            "key": info["key"],
            "files": records,
            "dirs": info.get("dirs", []),
        }
        digests.write_text(json.dumps(document, sort_keys=True, separators=(",", ":")))
        packed.append(self._record(DIGESTS_FILE, digests, "file"))
        return packed

    @staticmethod
    def _record(
        name: str, path: Path, kind: str, records: Mapping[str, FileRecord] | None = None
    ) -> tuple[dict[str, Any], Path]:
        digest, size = file_digest(path)
        if records is not None:
            record = records.get(name)
            if record is None or (record["sha256"], record["size"]) != (digest, size):
                raise CacheStoreError(f"cannot push {path}: it does not match the entry's {ENTRY_FILE}")
        return {"name": name, "sha256": digest, "size": size, "kind": kind}, path

    def push(self, key: str, entry: Path) -> str:
        """Upload the entry's missing blobs, then its manifest; returns the service's status."""
        started = time.monotonic()
        inputs = json.loads((entry / MANIFEST_FILE).read_text())
        metadata_path = entry / "metadata.json"
        metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
        workdir = Path(tempfile.mkdtemp(prefix=f"push-{key[:12]}.", dir=self.local.tmp_dir))
        try:
            packed = self.pack(entry, workdir)
            missing = set(self.client.missing([record["sha256"] for record, _ in packed]))
            sent = 0
            for record, path in packed:
                if record["sha256"] in missing:
                    self.client.put_blob(record["sha256"], record["size"], path)
                    missing.discard(record["sha256"])
                    sent += record["size"]
            doc = {"outputs": [record for record, _ in packed], "inputs": inputs, "metadata": metadata}
            status = self.client.put_manifest(key, doc)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        console.print(
            f"pushed build {key[:16]} to {self.client.config.url}: {status} "
            f"({sent / 1e6:.1f} MB uploaded in {time.monotonic() - started:.1f} s)"
        )
        return status

    def push_run(
        self, key: str, run_id: str, junit: Path | None, console_log: Path | None, outcome: str | None = None
    ) -> dict[str, Any]:
        """Attach a test run's JUnit XML and console log to a published build."""
        doc: dict[str, Any] = {}
        if outcome:
            doc["outcome"] = outcome
        for part, path in (("junit", junit), ("console", console_log)):
            if path is None or not path.is_file():
                continue
            digest, size = file_digest(path)
            if self.client.missing([digest]):
                self.client.put_blob(digest, size, path)
            doc[part] = {"sha256": digest, "size": size}
        return self.client.put_run(key, run_id, doc)


def attach_test_run(store: object, kernel_dir: Path, output: Path, outcome: str) -> None:
    """After `kernel-ci test`: attach the run's JUnit XML and console log to the build on the service."""
    if not isinstance(store, RemoteStore) or not store.push_enabled:
        return
    try:
        key = json.loads((kernel_dir / "metadata.json").read_text())["build_key"]
        run_dir = (output / "latest").resolve()
        run_id = re.sub(r"[^A-Za-z0-9._-]", "-", run_dir.name).lstrip(".-_")[:64] or "run"
        done = store.push_run(key, run_id, run_dir / "junit.xml", run_dir / "console.log", outcome)
        counts = done.get("counts") or {}
        console.print(
            f"attached test run {run_id} to build {key[:16]} on {store.client.config.url} "
            f"({counts.get('passed', 0)} passed, {counts.get('failed', 0) + counts.get('errors', 0)} failed)"
        )
    except Exception as exc:
        warn(f"could not attach the test run to the shared build cache: {exc}")


def open_store(settings: Settings, local: LocalStore | None = None) -> LocalStore | RemoteStore:
    """The build store the CLI hands to kernel_ci.flow.build.build: remote-backed when one is configured.

    The ccache remote storage travels apart, in the BuildRequest (settings.ccache_remote: read-only unless
    --trusted-ccache-writes), never through this process's environment.
    """
    local = local or LocalStore(settings.cache_root / "builds")
    config = RemoteConfig.from_settings(settings)
    if config is None:
        return local
    if not config.token:
        console.print(f"[dim]shared build cache {config.url}: read-only (no {TOKEN_ENV})[/]")
    return RemoteStore(local, CacheClient(config))
