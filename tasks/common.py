"""What the stage tasks share: which failures are worth a retry, and the cache-hit log line."""

from __future__ import annotations

from npuflow.core.errors import is_transient

IO_RETRY_DELAYS = [2, 10, 30]  # seconds between tries of an I/O stage


def retry_io_only(task, task_run, state) -> bool:
    """Retry what a retry can fix (connection, timeout, throttling, 5xx of the store or MLflow); never bad
    input, bad hashes, a missing device, a missing bucket or object, denied access or a full disk."""
    return is_transient(state.result(raise_on_failure=False))


def outcome(artifact) -> str:
    return f"cache hit, {artifact.uri}" if artifact.cache_hit else f"published {artifact.uri}"
