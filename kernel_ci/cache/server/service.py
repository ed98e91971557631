"""What the cache service does, without HTTP: validation, publishing, eviction, access times, metrics."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, BinaryIO

from kernel_ci.cache.server.blobs import Blob, BlobError, BlobStore, BlobWriter, check_digest
from kernel_ci.cache.server.index import BuildRow, Index
from kernel_ci.cache.server.metrics import Metrics
from kernel_ci.report import junit

log = logging.getLogger("kernel_ci.cacheserver")

KEY_RE = re.compile(r"[0-9a-f]{64}")  # build keys and request keys: sha256 hex (kernel_ci.build.keys)
CCACHE_KEY_RE = re.compile(r"[0-9a-v]{33}|[0-9a-f]{40}")  # ccache <= 4.12 (base16+base32hex), >= 4.13 (hex)
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NAME_PART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")
RESERVED_OUTPUTS = frozenset({"entry.json", "manifest.json"})
OUTPUT_KINDS = frozenset({"file", "tar"})
MAX_OUTPUTS = 10_000
MAX_CASES = 5_000
MAX_JUNIT_BYTES = 32 << 20  # parsed in memory: a report that size is ~100k test cases


class ServiceError(Exception):
    """A request the service refuses; ``status`` is the HTTP status, the message says why."""

    def __init__(self, message: str, status: int = 400, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


def check_key(key: str, what: str = "build key") -> str:
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise ServiceError(f"invalid {what} {key!r}: expected 64 lowercase hex characters (sha256)")
    return key


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON (JSON has no NaN or Infinity)")


def parse_json(body: bytes, what: str) -> Any:
    """A request's JSON document, or a 400 saying why not. Refused besides syntax errors: NaN/Infinity
    (Python accepts them, JSON responses then fail to render), lone surrogates (cannot be encoded back to
    UTF-8), and nesting deep enough to exhaust the parser's recursion limit (RecursionError)."""
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeError, RecursionError) as exc:
        raise ServiceError(f"{what} is not valid JSON: {str(exc)[:200]}") from exc
    return doc


def check_output_name(name: object) -> str:
    """A relative POSIX path of plain components: no '..', no absolute path, no odd characters."""
    if not isinstance(name, str) or not 0 < len(name) <= 255:
        raise ServiceError(f"invalid output name {name!r}: expected a relative path of 1-255 characters")
    parts = name.split("/")
    if len(parts) > 4 or any(not _NAME_PART_RE.fullmatch(p) or p in (".", "..") for p in parts):
        raise ServiceError(
            f"invalid output name {name!r}: at most 4 components of letters, digits, '.', '_', '+', '-' "
            "(not starting with '.', no '..', no leading '/')"
        )
    if name in RESERVED_OUTPUTS:
        raise ServiceError(f"invalid output name {name!r}: reserved for the local store's own files")
    return name


def ccache_key_from_path(path: str) -> str:
    """The ccache key of a request path below /ccache/: ``ab/rest`` (subdirs), ``key`` (flat) or bazel."""
    parts = path.split("/")
    if len(parts) == 1 and CCACHE_KEY_RE.fullmatch(parts[0]):
        return parts[0]
    if len(parts) == 2:
        head, rest = parts
        if head == "ac" and re.fullmatch(r"[0-9a-f]{64}", rest):
            return "ac-" + rest  # bazel layout: ccache's key padded to a sha256-sized hex string
        if len(head) == 2 and CCACHE_KEY_RE.fullmatch(head + rest):
            return head + rest
    raise ServiceError(
        f"invalid ccache path {path[:100]!r}: expected /ccache/<2 chars>/<rest of key> (subdirs), "
        "/ccache/<key> (flat) or /ccache/ac/<64 hex> (bazel); keys are 33 chars of [0-9a-v] or 40 hex",
    )


class _AccessTimes:
    """LRU access times, recorded in memory and written to the index in batches (not one write per GET)."""

    def __init__(self, index: Index, interval: float = 2.0) -> None:
        self.index = index
        self.interval = interval
        self.lock = threading.Lock()
        self.builds: dict[str, float] = {}
        self.ccache: dict[str, float] = {}
        self.last_flush = time.monotonic()
        self._thread: threading.Thread | None = None

    def touch(self, kind: str, key: str) -> None:
        # only memory here: a read must never wait for the index's write lock (another worker may hold it)
        with self.lock:
            (self.builds if kind == "build" else self.ccache)[key] = time.time()
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self.lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="access-times", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            self.flush()

    def flush(self) -> None:
        with self.lock:
            builds, ccache = self.builds, self.ccache
            self.builds, self.ccache = {}, {}
            self.last_flush = time.monotonic()
        if builds or ccache:
            try:
                self.index.touch(builds, ccache)
            except Exception as exc:  # access times are advisory: never fail a read for them
                log.warning("could not record access times: %s", exc)


@dataclass
class Limits:
    max_bytes: int = 0  # the store's cap (blobs); 0 = no cap
    max_blob_bytes: int = 4 << 30
    max_ccache_object_bytes: int = 256 << 20
    max_manifest_bytes: int = 16 << 20
    gc_grace_seconds: float = 600.0  # unreferenced blobs younger than this are kept (pending manifests)
    max_concurrent_explains: int = 2  # per process: "why did this miss" diffs read every build's inputs
    # per worker: verified ccache answers kept in memory (memory.py; local SQLite index only); 0 = none
    memory_answer_bytes: int = 64 << 20


class CacheService:
    def __init__(self, index: Index, blobs: BlobStore, limits: Limits | None = None) -> None:
        self.index = index
        self.blobs = blobs
        self.limits = limits or Limits()
        self.metrics = Metrics()
        self._ccache_hits = self.metrics.child("kernel_ci_cache_requests_total", kind="ccache", result="hit")
        self.access = _AccessTimes(index)
        self._evict_lock = threading.Lock()
        self._last_gc = -math.inf  # time.monotonic() of the last collection (a throttle, not a cut-off)
        self._used = (0, 0.0)  # (bytes stored, when the index last summed them)

    def close(self) -> None:
        """Close the index and the blob store (their connections and descriptors); for a service that has
        stopped serving. The access times still waiting are written first."""
        self.access.flush()
        self.index.close()
        self.blobs.close()

    # -- space --------------------------------------------------------------------------------

    def ensure_room(self, incoming: int) -> None:
        """Evict least recently used unpinned entries until incoming bytes fit under the cap, or raise 507."""
        cap = self.limits.max_bytes
        now = time.monotonic()
        if now - self._last_gc > 60:
            self._last_gc = now
            self.collect_garbage()
        if not cap:
            return
        with self._evict_lock:
            # the total is summed by the index at most every 2 s; uploads in between are added here
            if now - self._used[1] > 2.0:
                self._used = (self.index.totals()["bytes"], now)
            if self._used[0] + incoming <= cap:
                self._used = (self._used[0] + incoming, self._used[1])
                return
        if incoming > cap:
            raise ServiceError(
                f"the upload ({incoming} bytes) is larger than the whole store's cap ({cap} bytes)",
                507,
            )
        with self._evict_lock:
            while True:
                used = self.index.totals()["bytes"]
                self._used = (used, time.monotonic())
                if used + incoming <= cap:
                    self._used = (used + incoming, self._used[1])
                    return
                dropped = self.index.evict_lru(16)
                for kind, key in dropped:
                    self.metrics.inc("kernel_ci_cache_evictions_total", kind=kind)
                    log.info("evicted %s %s (store over its cap of %d bytes)", kind, key, cap)
                freed = len(self.collect_garbage())
                if not dropped and not freed:
                    raise ServiceError(
                        f"the build cache is full: {used} of {cap} bytes used and nothing can be evicted "
                        "(the rest is pinned builds or uploads younger than "
                        f"{self.limits.gc_grace_seconds:.0f} s); unpin builds or raise --max-bytes",
                        507,
                    )

    def collect_garbage(self) -> list[str]:
        """Delete unreferenced blobs older than the grace period, by the index's clock (index.py)."""
        return self.index.collect_garbage(self.limits.gc_grace_seconds, self.blobs.delete)

    def scrub(self) -> list[tuple[str, str]]:
        """Re-hash every indexed blob at rest; forget the corrupt (set aside) and missing ones.
        Returns (digest, "corrupt" | "missing") for each problem found."""
        problems = []
        for digest in self.index.all_blobs():
            verdict = self.blobs.verify(digest)
            if verdict is True:
                continue
            problem = "missing" if verdict is None else "corrupt"
            log.error(
                "scrub: blob %s is %s: forgotten (manifests using it are no longer complete)", digest, problem
            )
            self.metrics.inc("kernel_ci_cache_corrupt_blobs_total")
            self.index.blob_forget(digest)
            problems.append((digest, problem))
        return problems

    # -- blobs --------------------------------------------------------------------------------

    def put_blob(self, digest: str, size: int, stream: BinaryIO) -> bool:
        writer = self.begin_blob(digest, size)
        try:
            while chunk := stream.read(1 << 20):
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return self.finish_blob(digest, size, writer)

    def begin_blob(self, digest: str, size: int) -> BlobWriter:
        """Check and make room for an upload; the caller feeds the writer, then calls finish_blob."""
        check_digest(digest)
        if size > self.limits.max_blob_bytes:
            raise ServiceError(f"blob of {size} bytes exceeds the limit of {self.limits.max_blob_bytes}", 413)
        self.ensure_room(size)
        return self.blobs.writer(digest, size)

    def finish_blob(self, digest: str, size: int, writer: BlobWriter) -> bool:
        staged = writer.finish()
        try:
            created = self.index.blob_add(digest, size, staged.publish)
        finally:
            staged.discard()
        self.metrics.inc("kernel_ci_cache_uploaded_bytes_total", size, kind="blob")
        return created

    def _store(self, digest: str, size: int, stream: BinaryIO) -> bool:
        """Verify into a staging copy, then publish it and record it in one index transaction."""
        staged = self.blobs.stage(digest, size, stream)
        try:
            return self.index.blob_add(digest, size, staged.publish)
        finally:
            staged.discard()

    def get_blob(self, digest: str, kind: str = "blob") -> Blob | None:
        check_digest(digest)
        blob = self.blobs.get(digest)
        if blob is None and self.blobs.exists(digest) is False and self.index.blob_sizes([digest]):
            # indexed but gone or corrupt: forget it so that manifests using it are no longer complete
            self.metrics.inc("kernel_ci_cache_corrupt_blobs_total")
            self.index.blob_forget(digest)
        self.metrics.inc("kernel_ci_cache_requests_total", kind=kind, result="hit" if blob else "miss")
        return blob

    def missing_blobs(self, digests: list[str]) -> list[str]:
        for digest in digests:
            check_digest(digest)
        present = self.index.blob_sizes(digests)
        return [d for d in digests if d not in present]

    # -- builds -------------------------------------------------------------------------------

    def put_build(self, key: str, body: bytes) -> tuple[str, dict[str, Any]]:
        check_key(key)
        if len(body) > self.limits.max_manifest_bytes:
            raise ServiceError(f"manifest larger than {self.limits.max_manifest_bytes} bytes", 413)
        doc = validate_manifest(parse_json(body, "the manifest"))
        total = sum(o["size"] for o in doc["outputs"])
        sizes = self.index.blob_sizes(o["sha256"] for o in doc["outputs"])
        wrong = [
            o["name"] for o in doc["outputs"] if o["sha256"] in sizes and sizes[o["sha256"]] != o["size"]
        ]
        if wrong:
            raise ServiceError(f"outputs whose size differs from their uploaded blob: {wrong[:10]}", 422)
        record = {**doc, "key": key, "published": time.time()}
        status = self.index.build_put(key, record, doc["inputs"], build_summary(doc), total)
        if status.startswith("missing:"):
            missing = status.removeprefix("missing:").split(",")
            raise ServiceError(
                f"{len(missing)} blob(s) of this manifest are not uploaded; upload them first (PUT "
                "/api/v1/blobs/<sha256>), then the manifest",
                409,
                missing=missing,
            )
        self.metrics.inc("kernel_ci_cache_published_total", result=status)
        return status, record

    def get_build(self, key: str, count: bool = True) -> BuildRow | None:
        """The build, if complete (every blob it references still present), else None (a miss)."""
        check_key(key)
        row = self.index.build_get(key)
        if row is not None:
            digests = {o["sha256"] for o in row.doc["outputs"]}
            if len(self.index.blob_sizes(digests)) != len(digests):
                row = None
        if count:
            self.metrics.inc("kernel_ci_cache_requests_total", kind="build", result="hit" if row else "miss")
        if row is not None:
            self.access.touch("build", key)
        return row

    def put_run(self, key: str, run_id: str, body: bytes) -> tuple[str, dict[str, Any]]:
        """Attach a test run (JUnit XML and console log blobs) to a build; counts are read from the JUnit."""
        check_key(key)
        if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id):
            raise ServiceError(f"invalid run id {run_id!r}: 1-64 letters, digits, '.', '_', '-'")
        doc = parse_json(body, "the run document")
        if not isinstance(doc, dict):
            raise ServiceError("the run document must be a JSON object")
        run: dict[str, Any] = {"run_id": run_id}
        digests = []
        for part in ("junit", "console"):
            ref = doc.get(part)
            if ref is None:
                continue
            if not isinstance(ref, dict) or not isinstance(ref.get("sha256"), str):
                raise ServiceError(f"{part}: expected {{'sha256': <hex>, 'size': <int>}}")
            try:
                check_digest(ref["sha256"])
            except BlobError as exc:
                raise ServiceError(f"{part}: {exc}") from exc
            run[part] = {"sha256": ref["sha256"], "size": _int(ref.get("size"), f"{part}.size")}
            digests.append(ref["sha256"])
        outcome = doc.get("outcome")
        if outcome is not None:
            if not isinstance(outcome, str) or len(outcome) > 64:
                raise ServiceError("outcome: expected a short string")
            run["outcome"] = outcome
        if "junit" in run:
            stored = self.index.blob_sizes([run["junit"]["sha256"]]).get(run["junit"]["sha256"], 0)
            if stored > MAX_JUNIT_BYTES:  # the stored size, not the one the document claims
                raise ServiceError(
                    f"the JUnit report is {stored} bytes; at most {MAX_JUNIT_BYTES} are parsed", 413
                )
            blob = self.blobs.get(run["junit"]["sha256"])
            if blob is None:
                raise ServiceError("the JUnit blob is not uploaded; upload it first", 409)
            data = blob.data if blob.data is not None else b"".join(blob.chunks())
            run.update(parse_junit(data))
        status = self.index.run_put(key, run_id, run, digests)
        if status == "no-build":
            raise ServiceError(f"no build {key[:16]} to attach a run to", 404)
        if status.startswith("missing:"):
            raise ServiceError("blobs of this run are not uploaded", 409, missing=status[8:].split(","))
        return status, run

    # -- ccache -------------------------------------------------------------------------------

    def ccache_get(self, key: str) -> Blob | None:
        found = self.ccache_lookup(key)
        if found is None:
            self.ccache_count(None)
            return None
        return self.ccache_read(key, found[0])

    def ccache_lookup(self, key: str) -> tuple[str, int] | None:
        """(digest, size) of a ccache key: one indexed row, cheap enough for the event loop."""
        return self.index.ccache_get(key)

    def ccache_read(self, key: str, digest: str) -> Blob | None:
        """The object of a looked-up key (verified if small, see blobs.py); a corrupt one is forgotten."""
        blob = self.blobs.get(digest)
        if blob is None:
            self.metrics.inc("kernel_ci_cache_corrupt_blobs_total")
            self.index.ccache_delete(key)
            self.index.blob_forget(digest)
        else:
            self.access.touch("ccache", key)
        self.ccache_count(blob)
        return blob

    def ccache_hit(self, key: str) -> None:
        """What a hit answered from memory records, as ccache_read does for one read from disk: the
        access time (in memory, written to the index in batches: _AccessTimes) and the hit count."""
        self.access.touch("ccache", key)
        self._ccache_hits.inc()

    def ccache_count(self, blob: Blob | None) -> None:
        self.metrics.inc("kernel_ci_cache_requests_total", kind="ccache", result="hit" if blob else "miss")

    def ccache_head(self, key: str) -> int | None:
        found = self.index.ccache_get(key)
        return found[1] if found else None

    def ccache_put(self, key: str, data: bytes) -> None:
        """Store a ccache object (hashed here: callers run this off the event loop)."""
        if len(data) > self.limits.max_ccache_object_bytes:
            raise ServiceError(
                f"ccache object of {len(data)} bytes exceeds {self.limits.max_ccache_object_bytes}", 413
            )
        digest = hashlib.sha256(data).hexdigest()
        self.ensure_room(len(data))
        self._store(digest, len(data), io.BytesIO(data))
        self.index.ccache_put(key, digest, len(data))
        self.metrics.inc("kernel_ci_cache_uploaded_bytes_total", len(data), kind="ccache")

    def ccache_delete(self, key: str) -> bool:
        return self.index.ccache_delete(key)

    # -- reporting ----------------------------------------------------------------------------

    def gauges(self) -> dict[str, tuple[str, float]]:
        totals = self.index.totals()
        return {
            "kernel_ci_cache_builds": ("published builds", totals["builds"]),
            "kernel_ci_cache_pinned_builds": ("pinned builds", totals["pinned"]),
            "kernel_ci_cache_ccache_objects": ("ccache keys", totals["ccache"]),
            "kernel_ci_cache_blobs": ("stored blobs", totals["blobs"]),
            "kernel_ci_cache_bytes": ("bytes of stored blobs", totals["bytes"]),
            "kernel_ci_cache_max_bytes": ("the size cap (0: none)", self.limits.max_bytes),
        }


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 1 << 50:
        raise ServiceError(f"{what}: expected a non-negative integer, got {value!r}")
    return value


def validate_manifest(doc: object) -> dict[str, Any]:
    """The manifest a client publishes: outputs (name, sha256, size, kind), inputs, metadata."""
    if not isinstance(doc, dict):
        raise ServiceError("the manifest must be a JSON object with outputs, inputs and metadata")
    outputs = doc.get("outputs")
    if not isinstance(outputs, list) or not 0 < len(outputs) <= MAX_OUTPUTS:
        raise ServiceError(f"outputs: expected a list of 1-{MAX_OUTPUTS} objects")
    seen: set[str] = set()
    clean_outputs = []
    for position, output in enumerate(outputs):
        if not isinstance(output, dict):
            raise ServiceError(f"outputs[{position}]: expected an object with name, sha256, size")
        name = check_output_name(output.get("name"))
        if name in seen:
            raise ServiceError(f"outputs[{position}]: duplicate name {name!r}")
        seen.add(name)
        digest = output.get("sha256")
        try:
            check_digest(digest)  # type: ignore[arg-type]  # unvalidated JSON: check_digest refuses a non-str
        except BlobError as exc:
            raise ServiceError(f"outputs[{position}] ({name}): {exc}") from exc
        kind = output.get("kind", "file")
        if kind not in OUTPUT_KINDS:
            raise ServiceError(f"outputs[{position}] ({name}): kind must be one of {sorted(OUTPUT_KINDS)}")
        size = _int(output.get("size"), f"outputs[{position}].size")
        clean_outputs.append({"name": name, "sha256": digest, "size": size, "kind": kind})
    inputs = doc.get("inputs", {})
    if not isinstance(inputs, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in inputs.items()
    ):
        raise ServiceError("inputs: expected an object mapping strings to strings (the input manifest)")
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ServiceError("metadata: expected an object (metadata.json of the build)")
    check_metadata(metadata)
    return {"schema": 1, "outputs": clean_outputs, "inputs": inputs, "metadata": metadata}


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_metadata(meta: dict[str, Any]) -> None:
    """The fields of metadata.json that the pages and the build list show must have the types ci.build
    writes (other fields are kept as they are): a wrong type is refused here, not rendered as a 500."""
    for name in ("kernel", "toolchain", "ccache", "kbuild"):
        if name in meta and not isinstance(meta[name], dict):
            raise ServiceError(f"metadata.{name}: expected an object, got {type(meta[name]).__name__}")
    for name in ("series", "fragments"):
        value = meta.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ServiceError(f"metadata.{name}: expected a list of strings")
    for name in ("reproduce", "created"):
        if name in meta and not isinstance(meta[name], str):
            raise ServiceError(f"metadata.{name}: expected a string")
    ccache = meta.get("ccache", {})
    for name in ("hit_rate", "hits", "misses"):
        if name in ccache and ccache[name] is not None and not _finite(ccache[name]):
            raise ServiceError(f"metadata.ccache.{name}: expected a number")


def _table(meta: dict[str, Any], name: str) -> dict[str, Any]:
    """meta[name] when it is an object, else empty (stored metadata may predate validation)."""
    value = meta.get(name)
    return value if isinstance(value, dict) else {}


def build_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """What the build list shows, taken from metadata.json (tolerant of missing fields)."""
    meta = doc.get("metadata") or {}
    kernel = _table(meta, "kernel")
    ccache = _table(meta, "ccache")
    hit_rate = ccache.get("hit_rate")
    return {
        "kernel_version": str(kernel.get("version", "")),
        "kernel_release": str(kernel.get("release", "")),
        "series": [str(s) for s in meta.get("series", []) if isinstance(s, str)],
        "fragments": [str(s) for s in meta.get("fragments", []) if isinstance(s, str)],
        "ccache_hit_rate": float(hit_rate)
        if isinstance(hit_rate, int | float) and math.isfinite(hit_rate)
        else None,
        "built": str(meta.get("created", "")),
        "outputs": [o["name"] for o in doc["outputs"]],
    }


def parse_junit(data: bytes) -> dict[str, Any]:
    """Counts and test cases of a JUnit XML document (a run's report), read by kernel_ci.report.junit."""
    try:
        suites = junit.parse(data)
    except junit.JunitError as exc:
        return {"junit_error": str(exc)}
    cases: list[dict[str, Any]] = []
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for case in suite.cases:
            counts["tests"] += 1
            counts["errors" if case.state == "error" else case.state] += 1
            if len(cases) < MAX_CASES:
                cases.append(
                    {
                        "suite": suite.name,
                        "name": case.name,
                        "status": case.state,
                        "time": "" if case.seconds is None else f"{case.seconds:g}",
                        "message": (case.message or case.detail)[:300],
                    }
                )
    return {"counts": counts, "cases": cases}
