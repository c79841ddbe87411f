"""The string contracts other code, dashboards and reviewers rely on: registry aliases and tags, rollout
states, runtime labels and serving roles. Spell them here once; everything else imports them.

Each is a StrEnum: its members are `str`, so they go into MLflow tags, JSON and comparisons with strings
read back from the registry unchanged.
"""

from __future__ import annotations

from enum import StrEnum


class Alias(StrEnum):
    """Registry aliases (one registered model per model line; aliases, not stages)."""

    CANDIDATE = "candidate"  # registered, gates passed
    CHAMPION = "champion"  # serves production
    PREVIOUS = "previous"  # the rollback target


class Tag(StrEnum):
    """Tags on a registered model version."""

    SOURCE_URI = "source_uri"
    SOURCE_REVISION = "source_revision"
    QUANT_SCHEME = "quant_scheme"
    FORMAT = "format"
    DEVICE = "device"
    ARTIFACT_SHA256 = "artifact_sha256"  # the deployable's manifest sha: one version per artifact
    GATES = "gates"  # "passed" | "failed"
    ROLLOUT = "rollout"  # a RolloutState
    ROLLOUT_REASON = "rollout_reason"  # why the version is in its rollout state (rollout, rollback)
    PROMOTION_REASON = "promotion_reason"
    APPROVED = "approved"  # "true" | "false": the reviewer's answer
    APPROVED_BY = "approved_by"
    APPROVAL_COMMENT = "approval_comment"
    ROLLED_BACK_BY = "rolled_back_by"
    ROLLED_BACK_AT = "rolled_back_at"
    ROLLED_BACK_TO = "rolled_back_to"
    RESTORED_FROM = "restored_from"
    NIGHTLY_CHECK = "nightly_check"  # a NightlyState
    NIGHTLY_CHECK_DATE = "nightly_check_date"
    ARTIFACTS_LOST = "artifacts_lost"  # why (and when) the version's run artifacts were found unreadable


# Registries written before the rollout and the rollback shared Tag.ROLLOUT_REASON carry this key instead.
LEGACY_ROLLBACK_REASON = "rollback_reason"


class RolloutState(StrEnum):
    """Values of Tag.ROLLOUT."""

    REGISTERED = "registered"
    PENDING = "pending"  # a staged rollout is to decide
    PROMOTED = "promoted"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"  # never promoted again
    RESTORED = "restored"  # champion again after a rollback


class GateState(StrEnum):
    PASSED = "passed"
    FAILED = "failed"


class Runtime(StrEnum):
    """What generates tokens: the deployable's runtime label and `npuflow benchmark --runtime`."""

    NPUFLOW = "npuflow"  # --runtime choice: the quantized artifact on the backend's kernels
    NPUFLOW_GRAPH = "npuflow-graph"  # deployable label: the engine with its decode step compiled
    NPUFLOW_EAGER = "npuflow-eager"  # deployable label: the engine, eager
    HF_EAGER = "hf-eager"  # plain transformers on the unquantized checkpoint (the baseline users know)


def runtime_label(graph: bool) -> Runtime:
    """The deployable's runtime label for graph mode on or off."""
    return Runtime.NPUFLOW_GRAPH if graph else Runtime.NPUFLOW_EAGER


class Role(StrEnum):
    """Who answers a request in `npuflow serve`."""

    CHAMPION = "champion"
    CHALLENGER = "challenger"
