"""Commands that run the Prefect flows: run (release), rollout, deploy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from npuflow.cli.common import ConfigArg, JsonOpt, app, emit


@app.command()
def run(config: ConfigArg,
        as_json: JsonOpt = False) -> None:
    """Run the release flow (fetch -> quantize -> convert -> validate -> benchmark -> register -> promote)."""
    from npuflow.core.config import load_config

    cfg = load_config(config)  # bad config: exit 2 before anything is started or written
    from npuflow.runtime.backends import get_backend

    get_backend(cfg.convert.device)  # a missing device runtime: exit 2 before any work
    from npuflow.flows.release import release

    result = release(cfg)
    if as_json:
        emit(result.model_dump(), True, "")
        return
    from rich.console import Console
    from rich.table import Table

    stages = Table(title=f"release {result.name}: version {result.version} -> {result.decision}")
    stages.add_column("stage")
    stages.add_column("result")
    for stage, hit in result.cache_hits.items():
        stages.add_row(stage, "cache hit" if hit else ("registered" if stage == "register" else "ran"))
    metrics = Table(title="metrics (MLflow names)")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for k, v in result.metrics.items():
        metrics.add_row(k, f"{v:.6g}")
    console = Console()
    console.print(stages, metrics)
    console.print("why: " + "; ".join(result.reasons))
    console.print(f"registry: {result.tracking_uri}   artifacts: {result.store_uri}")


@app.command("rollout")
def rollout_cmd(
        config: ConfigArg,
        server_url: Annotated[str | None, typer.Option(
            "--server-url", help="A running `npuflow serve` (default: start one in this process on 127.0.0.1).")
        ] = None,
        as_json: JsonOpt = False) -> None:
    """Roll the `candidate` out against the `champion` stage by stage; a failed stage rolls traffic back."""
    from npuflow.core.config import load_config

    cfg = load_config(config)
    from npuflow.flows.rollout import rollout

    record = rollout(cfg, server_url=server_url)
    emit(record.model_dump(exclude={"stages"}) | {"stages": [
        f"{s.name} {s.weight:g}%: {s.verdict.result}" for s in record.stages]}, as_json,
        f"rollout {record.name}: v{record.candidate_version} {record.decision}")


@app.command("deploy")
def deploy_cmd(
        config: ConfigArg,
        cron: Annotated[str, typer.Option(help="nightly-check's schedule (minute hour day month weekday).")]
        = "0 2 * * *",
        timezone: Annotated[str, typer.Option(help="IANA time zone of the cron schedule.")] = "UTC",
        api_url: Annotated[str | None, typer.Option(
            "--api-url", envvar="PREFECT_API_URL", show_envvar=True,
            help="Prefect server API, e.g. http://127.0.0.1:4200/api.")] = None,
        working_dir: Annotated[Path | None, typer.Option(
            help="Where workers run the flows (relative file:// URIs and .npuflow resolve there; default: here).")]
        = None,
        as_json: JsonOpt = False) -> None:
    """Register the `release` (on demand) and `nightly-check` (cron) deployments on a Prefect server."""
    from npuflow.core.config import load_config

    cfg = load_config(config)
    from npuflow.flows.deploy import api_url_or_error, check_schedule, deploy

    check_schedule(cron, timezone)
    url = api_url_or_error(api_url)  # before the flows are imported: a missing server fails fast, exit 2
    deployed, created = deploy(cfg, url, cron=cron, timezone=timezone, working_dir=working_dir)
    if as_json:
        emit({"api_url": url, "work_pools_created": created, "deployments": [d.model_dump() for d in deployed]},
              True, "")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"deployments on {url}")
    for col in ("deployment", "id", "work pool", "schedule"):
        table.add_column(col)
    for d in deployed:
        table.add_row(d.name, d.id, d.work_pool, d.schedule or "on demand")
    console = Console()
    console.print(table)
    console.print(f"work pools created: {', '.join(created) or 'none (all existed)'}; flows run in {deployed[0].working_dir}")
    console.print(f"start a worker: prefect worker start --pool {deployed[0].work_pool}   "
                  f"run now: prefect deployment run '{deployed[0].name}'")
