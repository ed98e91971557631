"""Blobs in an S3-compatible object store (boto3): what several stateless service replicas share.

``s3://BUCKET[/PREFIX]?endpoint=http://127.0.0.1:4568&region=us-east-1``; credentials come from boto3's
usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, config files). An upload is first spooled
to a local temporary file while it is hashed, and only a verified file is sent (boto3 switches to a
multipart upload above 8 MiB; an interrupted multipart upload is aborted and never becomes visible). A
small read is re-hashed before any byte is handed out; a large one is streamed as it comes (verified when
written, and at rest by ``verify``: the scrub). An unreachable or failing S3 is a 503 (BlobError), never a
500, so that clients retry instead of giving up.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlparse

from kernel_ci.cache.server.blobs import (
    CHUNK,
    SMALL_BLOB,
    Blob,
    BlobError,
    _Verifier,
    check_digest,
    disk_full_is_507,
    stage_from,
)

log = logging.getLogger("kernel_ci.cacheserver")


@contextlib.contextmanager
def _unavailable_is_503(what: str) -> Iterator[None]:
    """S3 down (refused, reset, timed out) or failing (5xx, throttled) -> BlobError 503."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "RequestTimeout"):
            raise BlobError(
                f"the S3 blob store failed to {what} ({code or status}); retry later", 503
            ) from exc
        raise
    except BotoCoreError as exc:
        raise BlobError(f"the S3 blob store is unreachable ({type(exc).__name__}); retry later", 503) from exc


class _S3Staged:
    def __init__(self, store: S3BlobStore, digest: str, size: int, spool: BinaryIO | None) -> None:
        self.store = store
        self.digest = digest
        self.size = size
        self.spool = spool

    def publish(self) -> bool:
        if self.spool is None or self.store.size(self.digest) == self.size:
            return False
        self.spool.seek(0)
        with _unavailable_is_503("store a blob"):
            self.store.client.upload_fileobj(self.spool, self.store.bucket, self.store._key(self.digest))
        return True

    def discard(self) -> None:
        if self.spool is not None:
            self.spool.close()


class _S3Writer:
    def __init__(self, store: S3BlobStore, digest: str, size: int, spool: BinaryIO | None) -> None:
        self.store = store
        self.digest = digest
        self.size = size
        self.spool = spool
        self.verifier = _Verifier(digest, size)

    def write(self, chunk: bytes) -> None:
        try:
            self.verifier.update(chunk)
            if self.spool is not None:
                with disk_full_is_507("the S3 upload spool"):
                    self.spool.write(chunk)
        except BaseException:
            self.abort()
            raise

    def finish(self) -> _S3Staged:
        try:
            self.verifier.check()
        except BaseException:
            self.abort()
            raise
        return _S3Staged(self.store, self.digest, self.size, self.spool)

    def abort(self) -> None:
        if self.spool is not None:
            self.spool.close()


class S3BlobStore:
    def __init__(self, url: str, spool: Path | None = None) -> None:
        import boto3
        from botocore.config import Config

        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise BlobError(f"invalid S3 URL {url!r}: expected s3://BUCKET[/PREFIX]?endpoint=...")
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.endpoint = query.get("endpoint")
        self.spool = Path(spool) if spool else None
        if self.spool:
            self.spool.mkdir(parents=True, exist_ok=True)
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=query.get("region", "us-east-1"),
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3},
                connect_timeout=5,
                read_timeout=60,
            ),
        )
        if query.get("create", "1") == "1":
            with contextlib.suppress(self.client.exceptions.BucketAlreadyOwnedByYou):
                try:
                    self.client.head_bucket(Bucket=self.bucket)
                except self.client.exceptions.ClientError:
                    self.client.create_bucket(Bucket=self.bucket)

    def close(self) -> None:
        """Nothing held open: boto3's client keeps no descriptor between requests that outlives it."""

    def describe(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"S3 bucket {self.bucket}/{self.prefix}{where}"

    def _key(self, digest: str) -> str:
        check_digest(digest)
        name = f"{digest[:2]}/{digest}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _tempfile(self) -> BinaryIO:
        return tempfile.TemporaryFile(dir=self.spool)

    def writer(self, digest: str, size: int) -> _S3Writer:
        self._key(digest)
        # already there: only verify what the client sends (the connection stays usable), store nothing
        spool = None
        if self.size(digest) != size:
            with disk_full_is_507("the S3 upload spool"):
                spool = self._tempfile()
        return _S3Writer(self, digest, size, spool)

    def stage(self, digest: str, size: int, stream: BinaryIO) -> _S3Staged:
        staged = stage_from(self.writer(digest, size), stream)
        assert isinstance(staged, _S3Staged)  # an _S3Writer finishes into an _S3Staged
        return staged

    def put(self, digest: str, size: int, stream: BinaryIO) -> bool:
        staged = self.stage(digest, size, stream)
        try:
            return staged.publish()
        finally:
            staged.discard()

    def _open(self, digest: str) -> tuple[str, Any] | None:
        key = self._key(digest)
        with _unavailable_is_503("read a blob"):
            try:
                return key, self.client.get_object(Bucket=self.bucket, Key=key)
            except self.client.exceptions.NoSuchKey:
                return None

    def get(self, digest: str) -> Blob | None:
        opened = self._open(digest)
        if opened is None:
            return None
        key, response = opened
        body = response["Body"]
        size = int(response["ContentLength"])
        if size > SMALL_BLOB:
            return Blob(size, file=body)  # streamed as S3 sends it: no spool, no re-hash (module docstring)
        with _unavailable_is_503("read a blob"):
            data = body.read()
        if hashlib.sha256(data).hexdigest() != digest:
            self._set_aside(digest, key)
            return None
        return Blob(len(data), data=data)

    def verify(self, digest: str) -> bool | None:
        opened = self._open(digest)
        if opened is None:
            return None
        key, response = opened
        hasher = hashlib.sha256()
        with _unavailable_is_503("read a blob"):
            for chunk in response["Body"].iter_chunks(CHUNK):
                hasher.update(chunk)
        if hasher.hexdigest() != digest:
            self._set_aside(digest, key)
            return False
        return True

    def _set_aside(self, digest: str, key: str) -> None:
        log.error(
            "blob %s is corrupt in %s (its bytes no longer hash to it): deleted", digest, self.describe()
        )
        with contextlib.suppress(Exception):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def exists(self, digest: str) -> bool:
        return self.size(digest) is not None

    def size(self, digest: str) -> int | None:
        with _unavailable_is_503("look a blob up"):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self._key(digest))
            except self.client.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
        return int(head["ContentLength"])

    def delete(self, digest: str) -> None:
        with _unavailable_is_503("delete a blob"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(digest))
