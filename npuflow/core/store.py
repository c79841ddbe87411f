"""Artifact store: a local directory or an S3 bucket (boto3) behind one small interface."""

from __future__ import annotations

import errno
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse
from urllib.request import url2pathname

from npuflow.core.errors import ConfigError, NpuflowError, StoreError, UnsafeNameError, is_transient
from npuflow.core.paths import check_name

MULTIPART_THRESHOLD = 64 << 20  # bytes: larger files go up in parts
MULTIPART_CHUNK = 64 << 20  # bytes per part (S3 allows 10,000 parts: 640 GB per file)


class Store(Protocol):
    uri: str  # root: file:///abs/dir or s3://bucket/prefix

    def url(self, key: str) -> str: ...
    def exists(self, key: str) -> bool: ...
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def upload_file(self, key: str, path: Path) -> None: ...
    def download_file(self, key: str, path: Path) -> None: ...
    def list_keys(self, prefix: str) -> list[str]: ...
    def local_path(self, key: str) -> Path | None: ...


class InvalidKeyError(UnsafeNameError, ValueError):
    """A store key that would lead outside the store root (or is empty); also a ValueError, as before."""


def _check_key(key: str) -> str:
    try:
        return check_name(key, source="the store key")
    except UnsafeNameError as err:
        raise InvalidKeyError(f"invalid store key {key!r}: {err}") from None


class LocalStore:
    """A directory; every object is written to a temporary file and renamed into place."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NpuflowError(f"{self.url(key)} does not exist in the artifact store") from None

    def _atomic(self, key: str) -> tuple[Path, Path]:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest, dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"

    def _disk_error(self, err: OSError, key: str) -> StoreError:
        """A local write that failed: a full disk or a permission is not retried, and says what to fix."""
        what = ("the disk is full (free space there)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else
                "permission denied (fix the directory's owner or mode)" if err.errno in (errno.EACCES, errno.EPERM,
                                                                                          errno.EROFS) else str(err))
        return StoreError(f"writing {self.url(key)} to the artifact store failed: {what}; the object was not "
                          "published", retryable=is_transient(err))

    def write_bytes(self, key: str, data: bytes) -> None:
        try:
            dest, tmp = self._atomic(key)
        except OSError as err:
            raise self._disk_error(err, key) from None
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except OSError as err:
            raise self._disk_error(err, key) from None
        finally:
            tmp.unlink(missing_ok=True)

    def upload_file(self, key: str, path: Path) -> None:
        try:
            dest, tmp = self._atomic(key)
        except OSError as err:
            raise self._disk_error(err, key) from None
        if dest.exists() and dest.samefile(path):
            return
        try:
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as f:  # on disk before it is visible under its name (as write_bytes)
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except OSError as err:
            if err.filename == str(path):
                raise  # the local source is missing or unreadable: not the store's failure
            raise self._disk_error(err, key) from None
        finally:
            tmp.unlink(missing_ok=True)

    def download_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NpuflowError(f"{self.url(key)} does not exist in the artifact store")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def list_keys(self, prefix: str) -> list[str]:
        base = self._path(prefix.strip("/")) if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and ".tmp-" not in p.name
        )

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


class S3Store:
    """s3://bucket/prefix through boto3; endpoint and credentials from the standard AWS variables
    (AWS_ENDPOINT_URL for MinIO / Huawei OBS, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION)."""

    def __init__(self, uri: str):
        import boto3
        from boto3.s3.transfer import TransferConfig

        parsed = urlparse(uri)
        if not parsed.netloc:
            raise ConfigError(f"{uri!r} names no bucket; use s3://BUCKET[/PREFIX]")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.uri = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.client = boto3.client("s3")
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK, max_concurrency=4
        )

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _err(self, err: Exception, key: str) -> StoreError:
        retry = s3_retryable(err)
        return StoreError(
            f"S3 request for {self.url(key)} failed: {err}. Check AWS_ENDPOINT_URL, the credentials "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and that the bucket exists"
            + _RETRY_NOTE[retry],
            retryable=retry,
        )

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._err(err, key) from None
        except BotoCoreError as err:
            raise self._err(err, key) from None

    def read_bytes(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except (ClientError, BotoCoreError) as err:
            raise self._err(err, key) from None

    def write_bytes(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (ClientError, BotoCoreError) as err:
            raise self._err(err, key) from None

    def upload_file(self, key: str, path: Path) -> None:
        """Multipart above MULTIPART_THRESHOLD; S3 makes the object visible only once complete."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        bar = _progress_bar(f"upload {path.name}", path.stat().st_size)
        try:
            self.client.upload_file(
                str(path), self.bucket, self._key(key), Config=self.transfer, Callback=bar and bar.update
            )
        except (ClientError, BotoCoreError, S3UploadFailedError) as err:
            raise self._err(err, key) from None
        finally:
            if bar is not None:
                bar.close()

    def download_file(self, key: str, path: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self.client.download_file(self.bucket, self._key(key), str(tmp), Config=self.transfer)
            os.replace(tmp, path)
        except (ClientError, BotoCoreError) as err:
            raise self._err(err, key) from None
        finally:
            tmp.unlink(missing_ok=True)

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        """Keys under prefix (relative to it) -> size in bytes."""
        from botocore.exceptions import BotoCoreError, ClientError

        full = "/".join(p for p in (self.prefix, prefix.strip("/")) if p)
        full = full + "/" if full else ""
        out: dict[str, int] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                out.update({obj["Key"][len(full):]: obj["Size"] for obj in page.get("Contents", [])})
        except (ClientError, BotoCoreError) as err:
            retry = s3_retryable(err)
            raise StoreError(f"listing s3://{self.bucket}/{full} failed: {err}. Check AWS_ENDPOINT_URL, the "
                             "credentials and that the bucket exists" + _RETRY_NOTE[retry], retryable=retry) from None
        for name in out:  # a listed key becomes a local path: none may lead outside the prefix
            check_name(name, source=f"the listing of s3://{self.bucket}/{full}")
        return dict(sorted(out.items()))

    def list_keys(self, prefix: str) -> list[str]:
        """Store keys under prefix."""
        p = prefix.strip("/")
        return [f"{p}/{k}" if p else k for k in self.list_sizes(p)]

    def local_path(self, key: str) -> Path | None:
        return None


_RETRY_NOTE = {True: " (a transient failure: retried)", False: " (not retried: a retry cannot fix this)"}
# S3 error codes a retry can fix; anything else a ClientError says (NoSuchBucket, AccessDenied, 403, 404,
# NoSuchKey, InvalidAccessKeyId, SignatureDoesNotMatch, ...) is permanent
_S3_TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                                 "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
                                 "RequestLimitExceeded", "BandwidthLimitExceeded", "TooManyRequestsException"})


def s3_retryable(err: BaseException) -> bool:
    """Whether a boto3/botocore failure is worth a retry: connection, timeout, throttling, 5xx."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
        IncompleteReadError,
        ResponseStreamingError,
    )
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )

    if isinstance(err, ClientError):
        e = err.response.get("Error", {})
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return e.get("Code") in _S3_TRANSIENT_CODES or int(status) >= 500 or int(status) == 429
    if isinstance(err, S3UploadFailedError):  # boto3's wrapper of a multipart failure: judged by its text
        text = str(err)
        return not any(c in text for c in ("NoSuchBucket", "AccessDenied", "403", "404", "InvalidAccessKeyId"))
    if isinstance(err, (BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError)):
        return True  # endpoint unreachable, connection closed or reset, read/connect timeouts
    return isinstance(err, (ConnectionError, TimeoutError))


def _progress_bar(desc: str, total: int):
    """A tqdm bar on stderr for transfers over MULTIPART_THRESHOLD bytes (None below that)."""
    if total < MULTIPART_THRESHOLD:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False)


LEFTOVER_AGE_S = 24 * 3600  # a temporary file or an unfinished upload this old belongs to a run that died


def sweep_leftovers(store: Store, older_than_s: float = LEFTOVER_AGE_S) -> list[str]:
    """Remove what writes that crashed left behind, older than `older_than_s` (a live run's are younger):
    `.NAME.tmp-*` files in a local store, incomplete multipart uploads under an S3 store's prefix (which
    S3 bills and never shows; `infra/s3-lifecycle.json` makes the bucket abort them as well). Returns
    what was removed. Never touches a published object."""
    import time

    cutoff, removed = time.time() - older_than_s, []
    if isinstance(store, LocalStore):
        if not store.root.is_dir():
            return []
        for p in store.root.rglob(".*.tmp-*"):
            try:
                if p.is_file() and p.stat().st_mtime < cutoff:
                    p.unlink()
                    removed.append(p.relative_to(store.root).as_posix())
            except FileNotFoundError:
                continue
    elif isinstance(store, S3Store):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            pages = store.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=store.bucket, Prefix=f"{store.prefix}/" if store.prefix else "")
            for page in pages:
                for up in page.get("Uploads", []):
                    if up["Initiated"].timestamp() < cutoff:
                        store.client.abort_multipart_upload(Bucket=store.bucket, Key=up["Key"],
                                                            UploadId=up["UploadId"])
                        removed.append(up["Key"])
        except (ClientError, BotoCoreError) as err:
            raise store._err(err, store.prefix or "") from None
    return removed


def open_store(uri: str) -> Store:
    """A store for `uri`: file:///abs/dir, a plain directory path, or s3://bucket/prefix."""
    if uri.startswith("s3://"):
        return S3Store(uri)
    if uri.startswith("file://"):
        return LocalStore(Path(url2pathname(urlparse(uri).path)))
    if "://" in uri:
        raise ConfigError(f"unsupported artifact store {uri!r}; use a directory, file:///DIR or s3://BUCKET/PREFIX")
    return LocalStore(Path(uri))


def file_uri_path(uri: str) -> Path:
    """file:///abs/dir or file://relative/dir (relative to the working directory) -> absolute Path."""
    raw = uri.removeprefix("file://")
    return Path(urlparse(uri).path if raw.startswith("/") else raw).expanduser().resolve()
