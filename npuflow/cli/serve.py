"""`npuflow serve`: the registry's champion (and a challenger) behind the OpenAI API."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from npuflow.cli.common import app
from npuflow.core.errors import ConfigError


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: only this machine can connect."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to any interface
        return False


def refuse_open_without_token(host: str, token: str | None) -> None:
    """A server on an address other machines can reach needs a bearer token: ConfigError without one."""
    if not token and not is_loopback(host):
        raise ConfigError(f"refusing to bind {host} without a token: anyone who can reach it could send "
                          "completions, change the routing weights and reload versions. Set NPUFLOW_SERVE_TOKEN "
                          "(or --token) to a secret that clients send as `Authorization: Bearer <token>`, or "
                          "bind 127.0.0.1")


def _serving_config(from_config, engine: str | None, vllm_python: str | None, tp: int, pp: int):
    """The engine that serves: the config's `serving:` section, or the one --engine/--tp/--pp describe with
    --model; a ConfigError for options that do not go together."""
    from npuflow.core.config import ServingConfig

    if from_config is not None and (engine is not None or vllm_python is not None or tp != 1 or pp != 1):
        raise ConfigError("--engine, --vllm-python, --tp and --pp go with --model DIR; with a CONFIG its "
                          "`serving:` section chooses the engine and its tensor_parallel_size / pipeline_parallel_size")
    if tp < 1 or pp < 1:
        raise ConfigError(f"--tp and --pp must be >= 1, got --tp {tp} --pp {pp}")
    if engine not in (None, "npuflow", "vllm"):
        raise ConfigError(f"--engine must be npuflow or vllm, got {engine!r}")
    if from_config is not None:
        return from_config
    if vllm_python is not None and engine != "vllm":
        raise ConfigError("--vllm-python goes with --engine vllm")
    return ServingConfig(engine=engine or "npuflow", tensor_parallel_size=tp, pipeline_parallel_size=pp,
                         **({"python": vllm_python} if vllm_python else {}))


@app.command()
def serve(config: Annotated[Path | None, typer.Argument(
              help="YAML run config: its `name` is served from the registry (champion and challenger).")] = None,
          model: Annotated[Path | None, typer.Option(
              "--model", help="Serve this quantized directory as the champion instead (no registry).")] = None,
          name: Annotated[str, typer.Option(help="With --model: the model id clients send.")] = "local",
          device: Annotated[str, typer.Option(help="With --model: cpu, cuda or npu.")] = "cpu",
          graph: Annotated[bool, typer.Option("--graph/--eager", help="With --model: compile the decode step.")]
          = True,
          max_batch: Annotated[int, typer.Option(help="Sequences decoded together per version.")] = 16,
          kv_cache_gib: Annotated[float | None, typer.Option(
              help="KV cache per version, GiB (default: half the free host memory on the CPU, 90% of the "
                   "free device memory otherwise); fewer than --max-batch slots when it is smaller.")] = None,
          port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
          host: Annotated[str, typer.Option(help="Interface to bind (loopback by default).")] = "127.0.0.1",
          challenger_weight: Annotated[float, typer.Option(
              help="Share of traffic for the challenger (the `candidate` alias when it is not the champion), "
                   "0-100; the champion gets the rest. Change it at run time: POST /admin/weights.")] = 0.0,
          token: Annotated[str | None, typer.Option(
              envvar="NPUFLOW_SERVE_TOKEN", show_envvar=True,
              help="Bearer token required on /v1 and /admin (default: none; needed off loopback).")] = None,
          max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 256,
          engine: Annotated[str | None, typer.Option(
              help="With --model: npuflow (in process, default) or vllm (a vLLM child process; "
                   "W4A16 compressed-tensors on the CPU). With CONFIG the config's `serving:` says.")] = None,
          vllm_python: Annotated[str | None, typer.Option(
              help="With --engine vllm: the vLLM interpreter (default .venv-vllm/bin/python: `make vllm`).")]
          = None,
          tp: Annotated[int, typer.Option(
              help="With --model: tensor-parallel ranks (npuflow: torchrun ranks behind the router, each reading "
                   "its part of the weights; vllm: --tensor-parallel-size). With CONFIG: its serving section.")] = 1,
          pp: Annotated[int, typer.Option(
              help="With --model: pipeline-parallel stages (contiguous layer ranges), as --tp.")] = 1,
          ) -> None:
    """Serve the champion (and a challenger) from the registry: OpenAI /v1/completions and
    /v1/chat/completions with continuous batching, /health, /metrics."""
    from npuflow.core.config import load_config

    if (config is None) == (model is None):
        raise ConfigError("give a run CONFIG (serve its registered champion) or --model DIR (a quantized "
                          "directory), not both and not neither")
    refuse_open_without_token(host, token)  # before anything is loaded
    run_cfg = load_config(config) if config is not None else None
    cfg_name = run_cfg.name if run_cfg is not None else name
    serving_cfg = _serving_config(run_cfg.serving if run_cfg is not None else None, engine, vllm_python, tp, pp)
    if not 0 <= challenger_weight <= 100:
        raise ConfigError(f"--challenger-weight must be 0..100 (% of traffic), got {challenger_weight:g}")
    from npuflow.core.settings import Settings
    from npuflow.serving.app import run_server
    from npuflow.serving.loading import directory_pool, registry_pool
    from npuflow.serving.options import ServeOptions

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a server's log, not a terminal
    settings = Settings()
    opts = ServeOptions(
        name=cfg_name, tracking_uri=settings.resolved_tracking_uri, store_uri=settings.resolved_store_uri,
        cache_dir=settings.cache_dir, champion_weight=100 - challenger_weight,
        challenger_weight=challenger_weight, token=token or None, max_tokens_limit=max_tokens, max_batch=max_batch,
        kv_cache_gib=kv_cache_gib,
        serving=serving_cfg,
    )
    pool = (directory_pool(opts, model, device, graph=graph, engine=serving_cfg.engine) if model is not None
            else registry_pool(opts))
    try:
        state = pool.reload()  # no champion, or one that fails to load: exit 1 before the socket opens
    except BaseException:
        pool.close()  # an engine started for one version must not outlive a failed start
        raise
    chal = state["challenger"]
    logging.getLogger("npuflow.serve").info(
        "serving %s: champion v%s%s on http://%s:%d", cfg_name, state["champion"]["version"],
        f", challenger v{chal['version']} ({chal['status']}, weight {chal['weight']:g})" if chal else "",
        host, port)
    run_server(pool, host=host, port=port)
