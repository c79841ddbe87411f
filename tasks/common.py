"""What the stage tasks share: which failures are worth a retry, and the cache-hit log line."""

from __future__ import annotations

from npuflow.core.errors import StoreError

IO_RETRY_DELAYS = [2, 10, 30]  # seconds between tries of an I/O stage


def retry_io_only(task, task_run, state) -> bool:
    """Retry transfers and flaky services, never bad input, bad hashes or a missing device."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (StoreError, OSError))  # OSError covers connection and timeout errors


def outcome(artifact) -> str:
    return f"cache hit, {artifact.uri}" if artifact.cache_hit else f"published {artifact.uri}"
