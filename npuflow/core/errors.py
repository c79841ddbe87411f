"""The one error type the CLI turns into a clear message and a non-zero exit."""


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
    """The artifact store (S3 endpoint, disk) failed a request; worth a retry."""


class DriftError(NpuflowError):
    """The nightly check found the champion worse than recorded beyond tolerance: the run fails (the alert)."""


class UnsafeNameError(NpuflowError):
    """A name read from a file (index shard, manifest entry, listed key) leads outside its directory."""

    exit_code = 2


class RegistryError(NpuflowError):
    """The MLflow tracking/registry service failed a request (anything but "not found"); worth a retry.

    Reads fail closed: a registry that cannot answer never reads as "no champion yet".
    """
