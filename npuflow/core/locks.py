"""One writer per model line: a lock in the artifact store, which every writer of a release sees.

Every `npuflow run` in the embedded default starts its own temporary Prefect API, so a Prefect
concurrency limit coordinates nothing between two of them; the MLflow registry has no compare-and-set.
The store is the one service every release writes to, so the lock lives there:

- a local store (`file://`): `flock` on `<store>/locks/<name>.lock`, which the kernel releases when the
  holder dies (SIGKILL included); the file keeps the last holder's note for the waiting message;
- S3 (and MinIO, OBS): an object created with `If-None-Match: *` (conditional write: exactly one creator
  wins), holding the owner and a lease that a heartbeat thread renews with `If-Match` on its ETag. A holder
  that dies stops renewing; a waiter takes an expired lease over with `If-Match` on the ETag it read, so
  of two waiters only one wins. Released with a conditional delete.

`model_line_lock(store, name)` is held around register -> promote and around the rollout's final
promotion (not across the approval wait: those writes compare the aliases just before writing instead).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from npuflow.core.errors import NpuflowError

LEASE_S = 120.0  # an S3 lock whose holder stopped renewing is free this long after its last renewal
WAIT_S = 600.0  # how long a writer waits for another to finish before it gives up
POLL_S = 0.25


class LockTimeoutError(NpuflowError):
    """Another writer held the model line's lock for longer than we wait."""


def _note(what: str) -> dict[str, str | int | float]:
    return {"owner": f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", "what": what,
            "since": datetime.now(UTC).isoformat(timespec="seconds")}


def lock_key(name: str) -> str:
    return f"locks/registry-{name}.lock"


@contextmanager
def model_line_lock(store, name: str, what: str, wait_s: float = WAIT_S, lease_s: float = LEASE_S) -> Iterator[None]:
    """Hold the one-writer lock of model line `name` in `store` (a LocalStore or an S3Store); LockTimeoutError
    naming the holder after wait_s. `what` is written into the lock for whoever waits."""
    from npuflow.core.store import LocalStore, S3Store

    key = lock_key(name)
    if isinstance(store, LocalStore):
        with _file_lock(store, key, _note(what), wait_s):
            yield
    elif isinstance(store, S3Store):
        with _s3_lock(store, key, _note(what), wait_s, lease_s):
            yield
    else:
        raise NpuflowError(f"the artifact store {getattr(store, 'uri', store)!r} has no lock for the registry's "
                           "one writer; use a file:// or s3:// store")


def _waited(url: str, holder: str, wait_s: float) -> LockTimeoutError:
    return LockTimeoutError(f"another writer has held the registry lock {url} for over {wait_s:.0f} s ({holder}); "
                            "wait for it to finish, or if that process is gone, for its lease to expire "
                            f"(S3: {LEASE_S:.0f} s after its last renewal; a local lock is freed when it exits)")


@contextmanager
def _file_lock(store, key: str, note: dict, wait_s: float) -> Iterator[None]:
    import fcntl

    path = store.local_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _waited(store.url(key), path.read_text(errors="replace")[:300] or "unknown", wait_s) \
                        from None
                time.sleep(POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(note).encode(), 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


_LOST_RACE = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")  # another writer's write won


def _code(err) -> str:
    return str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))


@contextmanager
def _s3_lock(store, key: str, note: dict, wait_s: float, lease_s: float) -> Iterator[None]:
    from botocore.exceptions import BotoCoreError, ClientError

    s3, bucket, k = store.client, store.bucket, store._key(key)

    def body() -> bytes:
        return json.dumps({**note, "expires_at": time.time() + lease_s}).encode()

    deadline, holder = time.monotonic() + wait_s, "unknown"
    while True:
        try:
            etag = s3.put_object(Bucket=bucket, Key=k, Body=body(), IfNoneMatch="*")["ETag"]
            break
        except ClientError as err:
            if _code(err) not in _LOST_RACE:
                raise store._err(err, key) from None
        except BotoCoreError as err:
            raise store._err(err, key) from None
        try:  # held: by a live writer, or by one whose lease ran out (it died)
            got = s3.get_object(Bucket=bucket, Key=k)
            held, seen = json.loads(got["Body"].read() or b"{}"), got["ETag"]
            holder = f"{held.get('owner')}, {held.get('what')}, since {held.get('since')}"
            if float(held.get("expires_at", 0)) < time.time():
                etag = s3.put_object(Bucket=bucket, Key=k, Body=body(), IfMatch=seen)["ETag"]
                break
        except ClientError as err:
            if _code(err) not in (*_LOST_RACE, "NoSuchKey", "404"):  # changed or released meanwhile: try again
                raise store._err(err, key) from None
        except (BotoCoreError, ValueError) as err:
            raise store._err(err, key) from None
        if time.monotonic() > deadline:
            raise _waited(store.url(key), holder, wait_s)
        time.sleep(POLL_S)

    lost: list[str] = []
    stop = threading.Event()
    tag = {"etag": etag}

    def renew() -> None:
        while not stop.wait(lease_s / 4):
            try:
                tag["etag"] = s3.put_object(Bucket=bucket, Key=k, Body=body(), IfMatch=tag["etag"])["ETag"]
            except Exception as err:  # the lease is lost (taken over) or S3 is away: the holder is told
                lost.append(f"{type(err).__name__}: {err}")
                return

    beat = threading.Thread(target=renew, name="npuflow-lock-lease", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        if not lost:
            try:
                s3.delete_object(Bucket=bucket, Key=k, IfMatch=tag["etag"])
            except (ClientError, BotoCoreError):
                pass  # the lease then expires on its own
    if lost:
        raise NpuflowError(f"the registry lock {store.url(key)} was lost while held ({lost[0]}): another writer "
                           "may have written at the same time; check the aliases (`npuflow models NAME`) before "
                           "re-running")
