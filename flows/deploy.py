"""Deployments on a Prefect server: `release` on demand and `nightly-check` on a cron, in process work pools
per hardware (`npuflow deploy`; infra/prefect.yaml describes the same for `prefect deploy`)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

from npuflow.core.config import RunConfig
from npuflow.core.errors import ConfigError

NIGHTLY_CRON = "0 2 * * *"  # minute hour day month weekday: 02:00 every day
HARDWARE_POOLS = ("cpu", "npu")  # process work pools created on every deploy: one per kind of host
POOL_BY_DEVICE = {"cpu": "cpu", "cuda": "cuda", "npu": "npu"}  # convert.device -> the pool whose workers have it
# (deployment name, flow entrypoint as a module path: workers import the installed npuflow, no code pull)
DEPLOYMENTS = (
    ("release", "npuflow.flows.release.release"),
    ("nightly-check", "npuflow.flows.nightly.nightly_check"),
)
# non-secret variables that say where the registry and the artifacts are: a flow run started by a worker
# uses the same ones as the person who deployed (credentials stay in the worker's own environment)
FORWARDED_ENV = ("NPUFLOW_HOME", "NPUFLOW_STORE_URI", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL",
                 "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION")


class Deployed(BaseModel):
    id: str
    name: str  # flow/deployment, what `prefect deployment run` takes
    entrypoint: str
    work_pool: str
    schedule: str | None  # "cron 0 2 * * * (UTC)" or None: on demand only
    working_dir: str


def api_url_or_error(api_url: str | None) -> str:
    """The Prefect server's API URL, checked to answer /health; ConfigError (exit 2) when it does not."""
    import httpx

    if not api_url:
        raise ConfigError("no Prefect server: pass --api-url http://HOST:4200/api or set PREFECT_API_URL "
                          "(deployments need a server that stays up: `prefect server start`)")
    url = api_url.rstrip("/")
    try:
        httpx.get(f"{url}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as err:
        raise ConfigError(f"no Prefect server answers at {url} ({type(err).__name__}: {err}); start one with "
                          "`prefect server start` or fix --api-url / PREFECT_API_URL") from None
    return url


def check_schedule(cron: str, timezone: str) -> None:
    """ConfigError (exit 2) for a cron string or time zone the server would refuse or misread."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from prefect.schedules import Cron

    try:
        Cron(cron, timezone=timezone)
    except ValueError as err:
        raise ConfigError(f"bad --cron {cron!r}: {err} (five fields: minute hour day month weekday)") from None
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"unknown --timezone {timezone!r}: use an IANA name such as UTC or Europe/Berlin") from None


def ensure_pools(client, names: list[str]) -> list[str]:
    """Create the process work pools that do not exist yet; returns those created."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    created = []
    for name in dict.fromkeys(names):
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template(),
                description=f"npuflow: hosts with a {name} device (`prefect worker start --pool {name}`)"))
            created.append(name)
    return created


def build(config: RunConfig, cron: str, timezone: str, working_dir: Path) -> list:
    """The RunnerDeployments: the config as default parameters, the pool of its device, the flow's own
    parameter schema (the UI renders RunConfig as a form)."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    pool = POOL_BY_DEVICE[config.convert.device]
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    out = []
    for name, entrypoint in DEPLOYMENTS:
        flow = load_flow_from_entrypoint(entrypoint)
        schedule = Cron(cron, timezone=timezone) if name == "nightly-check" else None
        out.append(flow.to_deployment(
            name=name, schedule=schedule, parameters={"config": config.model_dump(mode="json")},
            work_pool_name=pool, job_variables={"working_dir": str(working_dir), "env": env},
            entrypoint_type=EntrypointType.MODULE_PATH, tags=["npuflow", config.name],
            description=flow.description.splitlines()[0] if flow.description else None,
        ))
    return out


def deploy(config: RunConfig, api_url: str, cron: str = NIGHTLY_CRON, timezone: str = "UTC",
           working_dir: Path | None = None) -> tuple[list[Deployed], list[str]]:
    """Register (create or update) both deployments against the server at api_url; returns them and the
    work pools created on the way."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    check_schedule(cron, timezone)
    workdir = (working_dir or Path.cwd()).resolve()
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        created = ensure_pools(client, [*HARDWARE_POOLS, POOL_BY_DEVICE[config.convert.device]])
        out = []
        for d in build(config, cron, timezone, workdir):
            # on an update, apply() without schedules keeps the old ones: pass the wanted list
            wanted = [s.model_dump(exclude_unset=True) for s in d.schedules or []]
            dep_id = d.apply(schedules=wanted or None)
            read = client.read_deployment(dep_id)
            sched = read.schedules[0].schedule if read.schedules else None
            out.append(Deployed(
                id=str(dep_id), name=d.full_name, entrypoint=read.entrypoint or "", work_pool=read.work_pool_name or "",
                schedule=f"cron {sched.cron} ({sched.timezone})" if sched is not None else None,
                working_dir=str(workdir),
            ))
    return out, created
