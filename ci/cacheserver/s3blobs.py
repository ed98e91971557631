"""Blobs in an S3-compatible object store (boto3): what several stateless service replicas share.

``s3://BUCKET[/PREFIX]?endpoint=http://127.0.0.1:4568&region=us-east-1``; credentials come from boto3's
usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, config files). An upload is first spooled
to a local temporary file while it is hashed, and only a verified file is sent (boto3 switches to a
multipart upload above 8 MiB; an interrupted multipart upload is aborted and never becomes visible). A
read is spooled and re-hashed before any byte is handed out.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlparse

from ci.cacheserver.blobs import CHUNK, SMALL_BLOB, Blob, BlobError, _Verifier, check_digest

log = logging.getLogger("kernel_ci.cacheserver")


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
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )
        if query.get("create", "1") == "1":
            with contextlib.suppress(self.client.exceptions.BucketAlreadyOwnedByYou):
                try:
                    self.client.head_bucket(Bucket=self.bucket)
                except self.client.exceptions.ClientError:
                    self.client.create_bucket(Bucket=self.bucket)

    def describe(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"S3 bucket {self.bucket}/{self.prefix}{where}"

    def _key(self, digest: str) -> str:
        check_digest(digest)
        name = f"{digest[:2]}/{digest}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _tempfile(self) -> BinaryIO:
        return tempfile.TemporaryFile(dir=self.spool)

    def put(self, digest: str, size: int, stream: BinaryIO) -> bool:
        key = self._key(digest)
        if self.size(digest) == size:
            # drain what the client sends so that the connection stays usable; nothing to store
            verifier = _Verifier(digest, size)
            while chunk := stream.read(CHUNK):
                verifier.update(chunk)
            verifier.check()
            return False
        verifier = _Verifier(digest, size)
        with self._tempfile() as spool:
            while chunk := stream.read(CHUNK):
                verifier.update(chunk)
                spool.write(chunk)
            verifier.check()
            spool.seek(0)
            self.client.upload_fileobj(spool, self.bucket, key)
        return True

    def get(self, digest: str) -> Blob | None:
        key = self._key(digest)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except self.client.exceptions.NoSuchKey:
            return None
        body = response["Body"]
        size = int(response["ContentLength"])
        hasher = hashlib.sha256()
        if size <= SMALL_BLOB:
            data = body.read()
            hasher.update(data)
            if hasher.hexdigest() != digest:
                self._set_aside(digest, key)
                return None
            return Blob(len(data), data=data)
        spool = self._tempfile()
        try:
            for chunk in body.iter_chunks(CHUNK):
                hasher.update(chunk)
                spool.write(chunk)
            if hasher.hexdigest() != digest:
                spool.close()
                self._set_aside(digest, key)
                return None
            spool.seek(0)
            return Blob(size, file=spool)
        except BaseException:
            spool.close()
            raise

    def _set_aside(self, digest: str, key: str) -> None:
        log.error(
            "blob %s is corrupt in %s (its bytes no longer hash to it): deleted", digest, self.describe()
        )
        with contextlib.suppress(Exception):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def exists(self, digest: str) -> bool:
        return self.size(digest) is not None

    def size(self, digest: str) -> int | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(digest))
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(head["ContentLength"])

    def delete(self, digest: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(digest))
