"""The rollout flow: shadow -> canary -> (approval) -> full against the serving process, judged from /metrics."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Literal

from npuflow.tasks.rollout import (
    StageRecord,
    promote_rollout_task,
    record_approval_task,
    registry_approval_task,
    resolve_versions_task,
    rollback_task,
    stage_task,
)
from prefect import flow, get_run_logger
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import BaseModel

from npuflow.core.config import RunConfig
from npuflow.core.errors import NpuflowError
from npuflow.core.settings import Settings
from npuflow.core.text import load_eval_text
from npuflow.serving.canary import embedded_server, prompts_from_text


class RolloutFailedError(NpuflowError):
    """The candidate failed a stage (or was not approved); traffic is back on the champion."""


class ApprovalInput(RunInput):
    """The form a reviewer fills in (Prefect UI) to let the candidate take all traffic."""

    approve: bool
    comment: str = ""
    reviewer: str


class RolloutRecord(BaseModel):
    name: str
    candidate_version: str
    champion_version: str
    stages: list[StageRecord]
    decision: Literal["promoted"]
    approved_by: str
    aliases: dict[str, str]


@flow(name="rollout", log_prints=True)
def rollout(config: RunConfig, server_url: str | None = None, version: str | None = None) -> RolloutRecord:
    """Roll the `candidate` out against the `champion` stage by stage; without server_url an embedded
    serving process is started on 127.0.0.1. A failed stage sends all traffic back to the champion.
    `version`: the version the release registered (the release passes it): the rollout refuses to start
    when `candidate` points elsewhere (another release moved it)."""
    from npuflow.serving.options import ServeOptions

    settings, log, plan = Settings(), get_run_logger(), config.rollout
    candidate, champion = resolve_versions_task(config.name, version)
    log.info("rollout %s: candidate v%s against champion v%s", config.name, candidate.version, champion.version)
    prompts = prompts_from_text(load_eval_text(config.validation.eval_text))
    with ExitStack() as stack:
        url = server_url or stack.enter_context(embedded_server(ServeOptions(
            name=config.name, tracking_uri=settings.resolved_tracking_uri, store_uri=settings.resolved_store_uri,
            cache_dir=settings.cache_dir, champion_weight=100, challenger_weight=0, serving=config.serving)))

        def stop(state: str, reason: str):
            rollback_task(url, candidate, state, reason)
            raise RolloutFailedError(f"rollout of {config.name} v{candidate.version} {state}: {reason}")

        # ---- stages: judged on their own interval of /metrics ----
        records: list[StageRecord] = []
        approved_by = "npuflow rollout analysis (no human approval configured)"
        baseline = None  # the champion's last interval with traffic (the full stage sends it none)
        for stage in plan.stages:
            if stage.name == "full" and plan.approval:
                approved_by = approval(candidate, plan.approval_timeout_s, plan.approval_poll_s, stop)
            try:
                rec = stage_task(url, config.name, stage, prompts, candidate.version, champion.version,
                                 plan.max_tokens, plan.concurrency, baseline)
            except Exception as err:  # the server or the load generator broke: traffic back all the same
                stop("rolled_back", f"stage {stage.name} {stage.weight:g}% errored: {type(err).__name__}: {err}")
            records.append(rec)
            baseline = rec.champion if rec.champion.requests > 0 else baseline
            if rec.verdict.result != "pass":
                stop("rolled_back", f"stage {stage.name} {stage.weight:g}% {rec.verdict.result}: "
                     + "; ".join(rec.verdict.reasons))

        # ---- every stage passed: the registry follows ----
        reasons = [r.verdict.reasons[0] for r in records]
        aliases = promote_rollout_task(url, candidate, champion, reasons, approved_by)
    return RolloutRecord(name=config.name, candidate_version=candidate.version,
                         champion_version=champion.version, stages=records, decision="promoted",
                         approved_by=approved_by, aliases=aliases)


def approval(candidate, timeout_s: int, poll_s: int, stop) -> str:
    """A reviewer's decision: the version tag approved=true, else the paused flow's typed form (timeout:
    rejected). Returns the reviewer; a rejection rolls back through `stop`."""
    log = get_run_logger()
    reviewer = registry_approval_task(candidate)
    if reviewer is not None:
        log.info("approved in the registry by %s", reviewer)
        return reviewer
    log.info("waiting up to %d s for approval of v%s (Prefect UI: resume with the form)", timeout_s,
             candidate.version)
    try:
        answer = pause_flow_run(wait_for_input=ApprovalInput, timeout=timeout_s, poll_interval=poll_s)
    except FlowPauseTimeout:
        record_approval_task(candidate, False, "nobody (timed out)", f"no decision within {timeout_s} s")
        stop("rejected", f"no approval within {timeout_s} s")
    record_approval_task(candidate, answer.approve, answer.reviewer, answer.comment)
    if not answer.approve:
        stop("rejected", f"rejected by {answer.reviewer}: {answer.comment or 'no comment'}")
    return answer.reviewer
