"""A rollout attempt and its approval: an approval counts for the attempt it was given in, never a later one.

Each rollout attempt writes its id on the candidate (`rollout_attempt`) and voids any earlier approval
(`approved=pending`, the earlier answer kept in `previous_approval`). An approval then counts only while
the version's `rollout_attempt` is this attempt's id, and only when it was given during it: the typed
form of this flow run, or a reviewer setting `approved=true` in MLflow (recorded with `approval_attempt`).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from npuflow.core.errors import NpuflowError
from npuflow.core.names import RolloutState, Tag
from npuflow.registry import client as registry
from npuflow.registry.promotion import rollout_reason

ROLLOUT_ATTEMPT = "rollout_attempt"  # the attempt now rolling the version out
APPROVAL_ATTEMPT = "approval_attempt"  # the attempt an approval was given for
PREVIOUS_APPROVAL = "previous_approval"  # what an earlier attempt's approval said, for the record
PENDING = "pending"


def new_attempt_id(flow_run_id: str | None = None) -> str:
    """UTC time and a unique suffix (the Prefect flow run id when there is one)."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{(flow_run_id or uuid.uuid4().hex)[:12]}"


def refuse_rolled_back(version: registry.ModelVersion) -> None:
    """A version that was rolled back is never rolled out again: its artifact failed in production."""
    if version.tags.get(Tag.ROLLOUT) == RolloutState.ROLLED_BACK:
        raise NpuflowError(
            f"{version.name} version {version.version} was rolled back ({rollout_reason(version.tags)}) and is "
            "not rolled out again. Fix the cause and re-release: `npuflow run CONFIG` with the changed model, "
            "quantization or config registers a new version, which then becomes the candidate"
        )


def begin_attempt(c, version: registry.ModelVersion, attempt: str) -> registry.ModelVersion:
    """Record `attempt` on the version and void any earlier approval; returns the version as now tagged."""
    tags = version.tags
    earlier = tags.get(Tag.APPROVED)
    new = {ROLLOUT_ATTEMPT: attempt, Tag.APPROVED: PENDING}
    if earlier and earlier != PENDING:
        new[PREVIOUS_APPROVAL] = (f"{earlier} by {tags.get(Tag.APPROVED_BY, '?')} for attempt "
                                  f"{tags.get(APPROVAL_ATTEMPT, 'unrecorded')}")[:4900]
    registry.tag_version(c, version, new)
    for stale in (APPROVAL_ATTEMPT, Tag.APPROVED_BY, Tag.APPROVAL_COMMENT):
        if stale in tags:
            c.delete_model_version_tag(version.name, version.version, stale)
    return _fresh(c, version)


def record_approval(c, version: registry.ModelVersion, attempt: str, approved: bool, reviewer: str,
                    comment: str) -> None:
    registry.tag_version(c, version, {Tag.APPROVED: "true" if approved else "false", Tag.APPROVED_BY: reviewer,
                                      Tag.APPROVAL_COMMENT: comment[:4900], APPROVAL_ATTEMPT: attempt})


def approval_for(c, version: registry.ModelVersion, attempt: str) -> str | None:
    """The reviewer when the version carries `approved=true` given during `attempt`, else None.

    Read fresh from the registry. None too when another attempt has begun on the version since: its
    approval is that attempt's, and this one waits for its own answer (the typed form) or times out.
    """
    tags = _fresh(c, version).tags
    if tags.get(ROLLOUT_ATTEMPT) != attempt:
        return None
    if tags.get(Tag.APPROVED) != "true" or tags.get(APPROVAL_ATTEMPT, attempt) != attempt:
        return None
    return tags.get(Tag.APPROVED_BY) or "registry tag approved=true"


def _fresh(c, version: registry.ModelVersion) -> registry.ModelVersion:
    v = registry._read(c, f"reading {version.name} version {version.version}",
                       lambda: c.get_model_version(version.name, version.version), None)
    if v is None:
        raise NpuflowError(f"{version.name} version {version.version} no longer exists in the registry")
    return registry._to_model(v)
