"""Rollback: `champion` back to `previous`, who and why recorded on both versions, a running server reloaded.

After `rollback(c, name, ...)` on champion vB, previous vA:
  aliases   champion -> vA; `previous` is removed (one step back: there is no history of older champions
            to return to; the next promotion sets it again); `candidate` is removed when it pointed at vB,
            so no server keeps vB as its challenger.
  vB tags   rollout=rolled_back, rolled_back_to=A, rollout_reason, rolled_back_by, rolled_back_at
  vA tags   rollout=restored, restored_from=B, rollout_reason, rolled_back_by, rolled_back_at
The tags are written before the aliases move (a crash in between leaves the aliases as they were and a
re-run finishes the job). The aliases are read again just before they are written: when another writer
moved `champion` or `previous` since the rollback read them, AliasMovedError and no alias is written; they
are read back after the write as well. A second call finds no `previous` but a champion restored from a rolled-back
version: it changes nothing and says so. No `previous` and no such record: NpuflowError (exit 1).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel

from npuflow.core.errors import NpuflowError
from npuflow.core.names import Alias, RolloutState, Tag
from npuflow.registry import client as registry

log = logging.getLogger("npuflow.rollback")


class RollbackResult(BaseModel):
    name: str
    action: Literal["rolled_back", "already_rolled_back"]
    champion: str  # the version serving after the call
    rolled_back: str | None  # the version taken out
    message: str
    aliases: dict[str, str]  # alias -> version after the call


def rollback(c, name: str, reason: str, actor: str) -> RollbackResult:
    """Make `previous` the champion again (see the module docstring); the same call twice, the same state."""
    current = registry.aliases(c, name)
    if not current and not c.search_model_versions(f"name='{name}'"):
        raise NpuflowError(f"no registered model {name!r}: nothing to roll back")
    champ, prev = current.get(Alias.CHAMPION), current.get(Alias.PREVIOUS)
    if champ is None:
        raise NpuflowError(f"{name} has no `champion` alias: nothing serves, so nothing can be rolled back")
    if prev is None or prev == champ:
        restored = registry.by_alias(c, name, Alias.CHAMPION)
        src = restored.tags.get(Tag.RESTORED_FROM) if restored else None
        gone = _version(c, name, src) if src else None
        if gone is None or gone.tags.get(Tag.ROLLOUT) != RolloutState.ROLLED_BACK:
            raise NpuflowError(
                f"{name} has no `previous` version to roll back to (champion is version {champ}); to serve "
                "another version, point the `champion` alias at it (MLflow UI or client) or re-run its "
                "release"
            )
        _finish_aliases(c, name, champ, src, expect={Alias.CHAMPION: champ})
        return RollbackResult(
            name=name, action="already_rolled_back", champion=champ, rolled_back=src,
            message=f"already rolled back: version {champ} is champion since version {src} was rolled back "
                    f"({gone.tags.get('rolled_back_at', '?')} by {gone.tags.get('rolled_back_by', '?')}); "
                    "nothing changed",
            aliases=registry.aliases(c, name),
        )
    when = datetime.now(UTC).isoformat(timespec="seconds")
    note = {Tag.ROLLOUT_REASON: reason[:4900], Tag.ROLLED_BACK_BY: actor, Tag.ROLLED_BACK_AT: when}
    old = registry.by_alias(c, name, Alias.CHAMPION)
    new = registry.by_alias(c, name, Alias.PREVIOUS)
    assert old is not None and new is not None  # both aliases were just read
    registry.tag_version(c, old, {Tag.ROLLOUT: RolloutState.ROLLED_BACK, Tag.ROLLED_BACK_TO: prev, **note})
    registry.tag_version(c, new, {Tag.ROLLOUT: RolloutState.RESTORED, Tag.RESTORED_FROM: champ, **note})
    _finish_aliases(c, name, prev, champ, expect={Alias.CHAMPION: champ, Alias.PREVIOUS: prev})
    log.info("%s: champion version %s -> %s (rolled back by %s: %s)", name, champ, prev, actor, reason)
    return RollbackResult(
        name=name, action="rolled_back", champion=prev, rolled_back=champ,
        message=f"rolled back {name}: champion is version {prev} again "
                f"(version {champ} tagged rollout=rolled_back)",
        aliases=registry.aliases(c, name),
    )


def _version(c, name: str, version: str):
    """The MLflow model version, None only when MLflow says it does not exist."""
    return registry._read(c, f"reading {name} version {version}", lambda: c.get_model_version(name, version), None)


def _finish_aliases(c, name: str, champion: str, rolled_back: str, expect: dict[str, str]) -> None:
    """champion -> the restored version; no previous; no candidate pointing at the rolled-back version.
    Compare-before-write: `expect` is what the rollback read; anything else now is AliasMovedError."""
    from npuflow.registry.promotion import AliasMovedError

    now = registry.aliases(c, name)
    moved = {a: now.get(a) for a, v in expect.items() if now.get(a) != v}
    if moved:
        raise AliasMovedError(
            f"{name}: the aliases moved while the rollback ran (it read {_say(expect)}, MLflow now reads "
            f"{_say(moved)}); "
            "another release, rollout or rollback wrote them. No alias was changed by this rollback (its tags "
            f"on versions {rolled_back} and {champion} are written): check `npuflow models {name}` "
            "and re-run the rollback if it is still wanted")
    wanted = {Alias.CHAMPION: champion, Alias.PREVIOUS: None,
              **({Alias.CANDIDATE: None} if now.get(Alias.CANDIDATE) == rolled_back else {})}
    registry.set_aliases(c, name, wanted)
    registry._verify_aliases(c, name, wanted)


def _say(aliases: dict[str, str | None]) -> str:
    return ", ".join(f"{a} {f'version {v}' if v else 'unset'}" for a, v in aliases.items())


def notify_server(url: str, token: str | None, expect_champion: str,
                  timeout_s: float = 120.0) -> dict[str, Any]:
    """POST URL/admin/reload and check that the server now serves `expect_champion`; returns its state."""
    import httpx

    headers = {"authorization": f"Bearer {token}"} if token else {}
    endpoint = url.rstrip("/") + "/admin/reload"
    try:
        r = httpx.post(endpoint, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as err:
        raise NpuflowError(f"the registry is rolled back, but {endpoint} could not be reached ({err}); "
                           "reload the server (POST /admin/reload) or restart it") from None
    if r.status_code != 200:
        try:
            detail = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            detail = r.text[:500]
        raise NpuflowError(f"the registry is rolled back, but {endpoint} answered {r.status_code}: {detail}")
    state = r.json()
    served = (state.get("champion") or {}).get("version")
    if served != expect_champion:
        raise NpuflowError(f"the registry is rolled back, but {url} still serves version {served} "
                           f"(expected {expect_champion}): {'; '.join(state.get('errors', []))}")
    return state
