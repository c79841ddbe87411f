"""Commands on the registry: models (versions, aliases, tags) and rollback."""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack
from typing import Annotated

import typer

from npuflow.cli.common import JsonOpt, app, emit
from npuflow.core.errors import NpuflowError
from npuflow.core.names import Tag


@app.command()
def models(name: Annotated[str, typer.Argument(help="Registered model name (the config's `name`).")],
           as_json: JsonOpt = False) -> None:
    """The registry's versions of NAME with their aliases and tags."""
    from npuflow.core.settings import Settings
    from npuflow.registry import client as registry

    c = registry.client(Settings().resolved_tracking_uri)
    versions = c.search_model_versions(f"name='{name}'")
    if not versions:
        raise NpuflowError(f"no registered model {name!r} at {Settings().resolved_tracking_uri}")
    by_version: dict[str, list[str]] = {}
    for alias, v in registry.aliases(c, name).items():
        by_version.setdefault(v, []).append(alias)
    rows = {f"v{v.version}": {"aliases": sorted(by_version.get(str(v.version), [])), Tag.GATES: v.tags.get(Tag.GATES),
                               "rollout": v.tags.get(Tag.ROLLOUT), "artifact": v.tags.get(Tag.ARTIFACT_SHA256, "")[:12]}
            for v in sorted(versions, key=lambda v: int(v.version))}
    emit(rows, as_json, f"registry: {name}")


@app.command()
def rollback(name: Annotated[str, typer.Argument(help="Registered model name (the config's `name`).")],
             reason: Annotated[str, typer.Option(help="Why: recorded on both versions.")] = "manual rollback",
             actor: Annotated[str | None, typer.Option(help="Who (default: the login name).")] = None,
             server_url: Annotated[str | None, typer.Option(
                 help="A running `npuflow serve` to reload afterwards, e.g. http://127.0.0.1:8080.")] = None,
             token: Annotated[str | None, typer.Option(envvar="NPUFLOW_SERVE_TOKEN", show_envvar=True,
                                                       help="The server's bearer token.")] = None,
             as_json: JsonOpt = False) -> None:
    """Move `champion` back to `previous` and record who and why; reload a running server."""
    import getpass

    from npuflow.core.errors import StoreError
    from npuflow.core.locks import model_line_lock
    from npuflow.core.settings import Settings
    from npuflow.core.store import open_store
    from npuflow.registry import client as registry
    from npuflow.registry.rollback import notify_server
    from npuflow.registry.rollback import rollback as do_rollback

    try:
        who = actor or getpass.getuser()
    except (OSError, KeyError):  # no login name in some containers
        who = "unknown"
    settings = Settings()
    c = registry.client(settings.resolved_tracking_uri)
    lock = ExitStack()  # the model line's one-writer lock, waited for up to 2 minutes; a store that cannot be
    try:  # reached does not block an emergency rollback (a release promoting meanwhile compares before writing)
        lock.enter_context(model_line_lock(open_store(settings.resolved_store_uri), name, f"rollback by {who}",
                                           wait_s=120))
    except StoreError as err:
        logging.getLogger("npuflow.rollback").warning("rolling back without the registry lock: %s", err)
    with lock:
        result = do_rollback(c, name, reason, who)
    data = result.model_dump()
    if server_url:
        state = notify_server(server_url, token, result.champion)
        data["server"] = {"url": server_url, "champion": state["champion"]["version"],
                          "challenger": (state.get("challenger") or {}).get("version")}
    if not as_json:
        print(result.message, file=sys.stderr)
    emit(data, as_json, f"rollback {name}")

