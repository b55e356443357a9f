"""A deck store in an S3-compatible object store (``s3://bucket/prefix``), through boto3.

boto3 is the AWS SDK itself: it reads credentials, region and endpoint the standard way
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` for MinIO, R2, moto...),
retries, and speaks S3's conditional writes, the one primitive a shared store needs: the manifest
is committed with ``If-Match: <ETag read>`` (or ``If-None-Match: *`` when creating), so of two
writers that read the same manifest exactly one wins; the other gets ConcurrentChange (a DeckConflict:
ABORTED over gRPC, 409 over HTTP).

Objects are immutable once named by a manifest: a writer puts its files under keys of its own
(:meth:`S3Backend.fresh`), so a losing or killed writer can never overwrite what a winner committed.
"""

from __future__ import annotations

import contextlib
import posixpath
import time
import uuid
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import Any

from carddeck.deck.debris import AgedDebris
from carddeck.errors import ConcurrentChange, InvalidInput, NotReady

CREDENTIALS_HELP = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for a store other than AWS"
)


def _client() -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:  # pragma: no cover - boto3 is in the s3 extra
        raise InvalidInput("s3:// decks need boto3: pip install 'carddeck[s3]'") from None
    config = Config(retries={"mode": "standard"}, connect_timeout=5, read_timeout=60)
    return boto3.session.Session().client("s3", config=config)  # a new session reads the environment now


class S3Backend:
    remote = True

    def __init__(self, bucket: str, prefix: str, client: Any | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.root = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.client = client if client is not None else _client()
        self._check_bucket()

    @classmethod
    def from_location(cls, location: str) -> S3Backend:
        bucket, _, prefix = location[len("s3://") :].partition("/")
        if not bucket:
            raise InvalidInput(f"deck location {location!r}: expected s3://BUCKET[/PREFIX]")
        return cls(bucket, prefix)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _check_bucket(self) -> None:
        """Fail at start, with what to fix, on a missing bucket, bad credentials or an unreachable endpoint."""
        with self._errors(f"s3://{self.bucket}", bucket=True):
            self.client.head_bucket(Bucket=self.bucket)

    @contextlib.contextmanager
    def _errors(self, what: str, *, bucket: bool = False) -> Iterator[None]:
        """botocore's errors as carddeck's: a missing object is FileNotFoundError (``bucket``: the bucket)."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            yield
        except NoCredentialsError:
            raise InvalidInput(f"{what}: no AWS credentials found; {CREDENTIALS_HELP}") from None
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (bucket and status == 404):
                raise InvalidInput(f"{what}: no such bucket {self.bucket!r} at this endpoint") from None
            if status == 404:
                raise FileNotFoundError(what) from None
            if status in (401, 403) or code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
                raise InvalidInput(f"{what}: access denied ({code}); {CREDENTIALS_HELP}") from None
            raise NotReady(f"{what}: the object store answered {code or status}: {exc}") from None
        except BotoCoreError as exc:  # endpoint unreachable, timeouts after retries
            raise NotReady(f"{what}: cannot reach the object store ({exc})") from None

    # -- the Backend interface --------------------------------------------------------------------
    def read(self, key: str) -> bytes:
        return self.read_stamped(key)[0]

    def read_stamped(self, key: str) -> tuple[bytes, str]:
        with self._errors(f"{self.root}/{key}"):
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read(), str(response["ETag"])

    def write(self, key: str, data: bytes) -> None:
        with self._errors(f"{self.root}/{key}"):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def stamp(self, key: str) -> str | None:
        try:
            with self._errors(f"{self.root}/{key}"):
                return str(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ETag"])
        except FileNotFoundError:
            return None

    def commit(self, key: str, data: bytes, expected: str | None) -> None:
        from botocore.exceptions import ClientError

        condition = {"IfMatch": expected} if expected is not None else {"IfNoneMatch": "*"}
        try:
            with self._errors(f"{self.root}/{key}"):
                try:
                    self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
                except ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code", "")
                    if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                        raise ConcurrentChange(
                            f"{self.root}/{key} changed since it was read: another writer committed first; "
                            "this change was not applied (retry it on the new deck)"
                        ) from None
                    raise
        except FileNotFoundError:  # If-Match on a manifest that was deleted meanwhile
            raise ConcurrentChange(
                f"{self.root}/{key} was deleted since it was read; the change was not applied"
            ) from None

    def _objects(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, age in seconds) of each object under the folder ``prefix`` ("" for the whole deck).

        The age is by the store's own clock (the listing's ``Date`` header against ``LastModified``), so a
        skewed local clock cannot make a writer's fresh objects look old.
        """
        folder = prefix.strip("/")
        start = len(self._key(""))
        with self._errors(f"{self.root}/{folder}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(folder))
            for page in pages:
                date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
                now = parsedate_to_datetime(date).timestamp() if date else time.time()
                for obj in page.get("Contents", ()):
                    key = obj["Key"][start:]
                    if not folder or key == folder or key.startswith(folder + "/"):
                        yield key, now - obj["LastModified"].timestamp()

    def list(self, prefix: str) -> list[str]:
        return sorted(key for key, _ in self._objects(prefix))

    def ages(self, prefix: str) -> dict[str, float]:
        return dict(self._objects(prefix))

    def delete(self, prefix: str) -> None:
        keys = self.list(prefix)
        with self._errors(f"{self.root}/{prefix}"):
            for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                objects = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})

    def fresh(self, key: str) -> str:
        stem, ext = posixpath.splitext(key)
        return f"{stem}-{uuid.uuid4().hex[:12]}{ext}"

    def debris(self, grace_s: float) -> AgedDebris:
        return AgedDebris(self, grace_s)

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # no lock across machines: the conditional commit decides


BACKEND = S3Backend

__all__ = ["BACKEND", "S3Backend"]
