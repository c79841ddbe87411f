"""The one error type the CLI turns into a clear message and a non-zero exit."""

import errno


class NpuflowError(Exception):
    """A user-facing failure: the message names the problem and the fix.

    `exit_code` follows the CLI contract: 2 for bad input (config, arguments), 1 for a failed stage.
    """

    exit_code = 1


class ConfigError(NpuflowError):
    """The run config or a CLI argument is invalid."""

    exit_code = 2


class IntegrityError(NpuflowError):
    """Content does not match its recorded sha256 (or a manifest is missing/corrupt)."""


class DeviceUnavailableError(NpuflowError):
    """The configured device's runtime is missing on this machine."""

    exit_code = 2


class GateFailedError(NpuflowError):
    """A validation gate failed: the release stops here and the version is never promoted."""


class StoreError(NpuflowError):
    """The artifact store (S3 endpoint, disk) failed a request.

    `retryable`: a retry can fix it (connection, timeout, throttling, 5xx); False for a missing bucket,
    a denied request, a missing object, a full disk.
    """

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


class DriftError(NpuflowError):
    """The nightly check found the champion worse than recorded beyond tolerance: the run fails (the alert)."""


class UnsafeNameError(NpuflowError):
    """A name read from a file (index shard, manifest entry, listed key) leads outside its directory."""

    exit_code = 2


class RegistryError(NpuflowError):
    """The MLflow tracking/registry service failed a request (anything but "not found").

    Reads fail closed: a registry that cannot answer never reads as "no champion yet". `retryable`: the
    service was unreachable, timed out, throttled or answered 5xx (not: denied, a bad request).
    """

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


# errno values a retry can fix: the network, not the disk (ENOSPC, EDQUOT), permissions (EACCES, EPERM)
# or a read-only file system (EROFS)
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, n) for n in ("ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "ETIMEDOUT", "EHOSTUNREACH",
                                "ENETUNREACH", "ENETDOWN", "EPIPE", "EAGAIN", "EINTR") if hasattr(errno, n)
)


def is_transient(exc: BaseException | None) -> bool:
    """Whether retrying the failed operation can succeed: connection, timeout, throttling, 5xx.

    Never bad input, bad hashes, a missing device, a missing bucket or object, denied access, a full disk.
    """
    if isinstance(exc, NpuflowError):
        return bool(getattr(exc, "retryable", False))
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS
    return False
