"""ModelPool: which versions serve (the champion and at most one challenger) and with what weight.

The pool is handed two functions and knows nothing of MLflow or the store:
  resolve(alias) -> ModelVersion | None   where an alias points now (None: it points nowhere)
  load(version)  -> LoadedModel           the version loaded and checked (raises when it cannot be)
`npuflow.serving.loading.registry_pool` builds them from the registry; tests hand in their own.

Weights set with a lease (set_weights(..., lease_s=...), POST /admin/weights {"lease_s": ...}) hold the
challenger's share only while whoever set them renews them: a lease that passes unrenewed sends all
traffic back to the champion (challenger weight 0, the event LEASE_EXPIRED in /health). It is checked on
every routing decision and in health(), and a timer checks it when it falls due, so it expires with no
traffic at all.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from npuflow.core.errors import NpuflowError, RegistryError
from npuflow.core.names import Alias, Role, Tag
from npuflow.registry.client import ModelVersion
from npuflow.serving.loaded import LoadedModel
from npuflow.serving.options import ServeOptions
from npuflow.serving.protocol import ApiError

log = logging.getLogger("npuflow.serve")
LEASE_EXPIRED = "canary weight lease expired"  # the pool event (and /health reason) when a lease lapses


@dataclass
class _Slot:
    alias: str
    model: LoadedModel | None = None
    version: str | None = None  # the version the alias pointed at when last resolved
    reason: str | None = None  # why it is not serving (out of rotation), or None
    since: str | None = None  # when it was taken out, UTC ISO


@dataclass
class _Lease:
    seconds: float  # as requested
    until: float  # time.monotonic() when it lapses unless renewed


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ModelPool:
    """The champion and at most one challenger, with routing weights; thread-safe."""

    def __init__(self, opts: ServeOptions, resolve: Callable[[str], ModelVersion | None],
                 load: Callable[[ModelVersion], LoadedModel], where: str = "the registry"):
        self.opts, self.resolve, self.load = opts, resolve, load
        self.where = where  # named in errors: where the aliases live
        self._lock = threading.Lock()  # guards slots, weights and in-flight counts
        self._reload_lock = threading.Lock()  # one reload at a time
        self._rng = random.Random(opts.seed)
        self.champion = _Slot(Alias.CHAMPION)
        self.challenger = _Slot(opts.challenger_alias)
        self.weights: dict[str, float] = {Role.CHAMPION: opts.champion_weight,
                                          Role.CHALLENGER: opts.challenger_weight}
        self.events: list[dict[str, str]] = []  # last reloads and rotation changes, newest last
        self._lease: _Lease | None = None  # the challenger's weight lease, while one is held
        self._lease_expired: dict[str, Any] | None = None  # the last lapse, until weights are set again
        self._lease_timer: threading.Timer | None = None
        self.on_change: Callable[[], None] = lambda: None  # called after the served set or weights change

    def _event(self, what: str, **kw: str) -> None:
        self.events = [*self.events[-19:], {"at": _now(), "event": what, **kw}]
        log.info("%s %s", what, kw)

    def reload(self) -> dict[str, Any]:
        """Resolve the aliases and load what changed; the champion serves until its successor is ready.

        Raises NpuflowError only when there is no champion to serve at all.
        """
        with self._reload_lock:
            name = self.opts.name
            loaded = {s.model.label: s.model for s in (self.champion, self.challenger) if s.model is not None}
            errors: list[str] = []
            try:  # both aliases first: a registry that cannot answer changes nothing that serves
                champ_v, chal_v = self.resolve(Alias.CHAMPION), self.resolve(self.opts.challenger_alias)
            except RegistryError as err:
                if self.champion.model is None:
                    raise
                self._event("registry unavailable: serving what is loaded", reason=str(err)[:300])
                return {**self.health(), "errors": [f"registry unavailable, nothing reloaded: {err}"]}
            if champ_v is None:
                if self.champion.model is None:
                    raise NpuflowError(f"{name} has no `champion` alias in {self.where}: "
                                       "nothing to serve; run the release flow (`npuflow run CONFIG`) first")
                errors.append(f"the champion alias is gone; version {self.champion.model.label} serves on")
            elif self.champion.model is None or self.champion.model.label != champ_v.version:
                try:
                    new = loaded.get(champ_v.version) or self.load(champ_v)
                except Exception as err:
                    msg = f"champion version {champ_v.version} failed to load: {err}"
                    if self.champion.model is None:
                        raise NpuflowError(msg) from None
                    errors.append(f"{msg}; version {self.champion.model.label} keeps serving")
                    self.champion.reason = msg
                else:
                    with self._lock:
                        self.champion = _Slot(Alias.CHAMPION, new, champ_v.version)
                    self._event("champion", version=champ_v.version)
            champion_label = self.champion.model.label  # type: ignore[union-attr]
            if chal_v is None or chal_v.version == champion_label:
                if self.challenger.version is not None:
                    self._event("challenger removed", version=self.challenger.version)
                with self._lock:
                    self.challenger = _Slot(self.opts.challenger_alias)
            elif self.challenger.model is None or self.challenger.model.label != chal_v.version:
                try:
                    new = loaded.get(chal_v.version) or self.load(chal_v)
                except Exception as err:
                    self.take_out(None, f"failed to load: {err}", version=chal_v.version)
                    errors.append(f"challenger version {chal_v.version} failed to load: {err}")
                else:
                    with self._lock:
                        self.challenger = _Slot(self.opts.challenger_alias, new, chal_v.version)
                    self._event("challenger", version=chal_v.version)
            self._after_reload(loaded)
            return {**self.health(), "errors": errors}

    def _after_reload(self, before: dict[str, LoadedModel]) -> None:
        """Challenger-only settings on the versions now served; engine threads of versions gone closed."""
        slow = self.opts.challenger_slowdown_ms / 1000
        serving = {id(m) for _, m in self.served()}
        for role, lm in self.served():
            target = lm.batcher if lm.batcher is not None else lm.remote
            target.slowdown_s = slow if role == Role.CHALLENGER else 0.0  # type: ignore[union-attr]
            self._watch(lm)
        for lm in before.values():
            if id(lm) not in serving:
                lm.close()
        self.on_change()

    def _watch(self, lm: LoadedModel) -> None:
        """Be told when a version's vLLM process exits on its own (once per process)."""
        proc = lm.remote.process if lm.remote is not None else None
        if proc is not None and proc.proc is not None and getattr(proc, "_watched", None) is not proc.proc:
            proc._watched = proc.proc  # type: ignore[attr-defined]
            proc.watch(lambda reason: self.engine_died(lm, reason))

    def engine_died(self, lm: LoadedModel, reason: str) -> None:
        """A version's engine is gone: a challenger is taken out of rotation; the champion's engine is
        restarted (at most opts.engine_restarts times in a row), the attempts logged as pool events."""
        if self.challenger.model is lm:
            self.take_out(lm, reason)
            return
        if self.champion.model is not lm or lm.remote is None:
            return
        self._event("champion engine died", version=lm.label, reason=reason)
        for attempt in range(1, self.opts.engine_restarts + 1):
            try:
                lm.remote.restart()
            except Exception as err:
                self._event("champion engine restart failed", version=lm.label, attempt=str(attempt),
                            reason=str(err)[:300])
                continue
            self._event("champion engine restarted", version=lm.label, attempt=str(attempt))
            self._watch(lm)
            self.champion.reason = None
            return
        lm.remote.state = "dead"
        self.champion.reason = f"the champion's engine died and did not restart: {reason}"

    def close(self) -> None:
        """Stop every engine (server shutdown): engine threads, and vLLM process groups waited for."""
        with self._lock:
            models = [s.model for s in (self.champion, self.challenger) if s.model is not None]
            if self._lease_timer is not None:
                self._lease_timer.cancel()
        for lm in models:
            lm.close(wait=True)

    def take_out(self, lm: LoadedModel | None, reason: str, version: str | None = None) -> None:
        """Take the challenger out of rotation (weight 0) with the reason; the champion keeps serving."""
        with self._lock:
            if lm is not None and self.challenger.model is not lm:
                return  # already replaced or taken out
            version = version or (lm.label if lm else None)
            self.challenger = _Slot(self.opts.challenger_alias, None, version, reason, _now())
        if lm is not None:
            lm.close()  # after the requests it still holds (a vLLM engine is stopped)
        self._event("challenger out of rotation", version=version or "?", reason=reason)
        self.on_change()

    def set_weights(self, weights: dict[str, float], lease_s: float | None = None) -> dict[str, float]:
        """Merge `weights` over the current ones and return the result; ValueError when both would be 0.

        With lease_s and a challenger weight > 0 the challenger's share holds for lease_s seconds: setting the
        weights again (with lease_s) renews it; unrenewed, the challenger's weight returns to 0 (the
        champion's to 100 if it was 0). Without lease_s the weights stand until changed (a person's choice)."""
        with self._lock:
            expired = self._expire_lease()
            before, held = dict(self.weights), self._lease is not None
            new = {**self.weights, **weights}
            valid = new[Role.CHAMPION] + new[Role.CHALLENGER] > 0
            if valid:
                self.weights = new
                self._lease = None
                if lease_s is not None and new[Role.CHALLENGER] > 0:
                    self._lease = _Lease(lease_s, time.monotonic() + lease_s)
                leased = self._lease is not None
                self._lease_expired = None
                self._arm_lease_timer()
        if not valid:
            if expired:
                self.on_change()
            raise ValueError("at least one weight must be > 0")
        if new == before and held and leased:  # a renewal: no event (renewals would crowd out the rest)
            log.debug("weights lease renewed for %g s", lease_s)
        else:
            lease = {"lease_s": f"{lease_s:g}"} if leased else {}
            self._event("weights", **{k: f"{v:g}" for k, v in new.items()}, **lease)
        self.on_change()
        return new

    def _expire_lease(self) -> bool:
        """Under self._lock: end a lease that has passed (True when this call ended it)."""
        lease = self._lease
        if lease is None or time.monotonic() < lease.until:
            return False
        self._lease = None
        old = self.weights[Role.CHALLENGER]
        self.weights = {Role.CHAMPION: self.weights[Role.CHAMPION] or 100.0, Role.CHALLENGER: 0.0}
        self._lease_expired = {"reason": LEASE_EXPIRED, "at": _now(), "lease_s": lease.seconds,
                               "challenger_weight_was": old}
        self._event(LEASE_EXPIRED, lease_s=f"{lease.seconds:g}", challenger_weight_was=f"{old:g}",
                    reason="not renewed in time: all traffic back to the champion")
        return True

    def _arm_lease_timer(self) -> None:
        """Under self._lock: one timer, due when the lease is (none without a lease)."""
        if self._lease_timer is not None:
            self._lease_timer.cancel()
            self._lease_timer = None
        if self._lease is not None:
            t = threading.Timer(max(self._lease.until - time.monotonic(), 0.0) + 0.01, self._lease_due)
            t.daemon, t.name = True, "npuflow-weights-lease"
            t.start()
            self._lease_timer = t

    def _lease_due(self) -> None:
        with self._lock:
            expired = self._expire_lease()
            if not expired and self._lease is not None and self._lease_timer is threading.current_thread():
                self._arm_lease_timer()  # woke early
        if expired:
            self.on_change()

    def _lease_state(self) -> dict[str, Any] | None:
        """Under self._lock: the lease held (active), the last one that lapsed (expired), or None."""
        if self._lease is not None:
            return {"state": "active", "lease_s": self._lease.seconds,
                    "expires_in_s": round(max(self._lease.until - time.monotonic(), 0.0), 3)}
        if self._lease_expired is not None:
            return {"state": "expired", **self._lease_expired}
        return None

    def effective_weights(self) -> dict[str, float]:
        """Weights as routed: 0 for a challenger that is absent or out of rotation."""
        return {Role.CHAMPION: self.weights[Role.CHAMPION],
                Role.CHALLENGER: self.weights[Role.CHALLENGER] if self.challenger.model is not None else 0.0}

    def acquire(self, pin: Role | None = None) -> tuple[Role, LoadedModel]:
        """Pick a version for one request (weighted unless pinned) and count it in flight; release() after."""
        with self._lock:
            expired = self._expire_lease()
        if expired:
            self.on_change()
        with self._lock:
            w = self.effective_weights()
            if pin is not None:
                role = pin
            elif w[Role.CHALLENGER] <= 0 or (w[Role.CHAMPION] > 0 and
                                             self._rng.random() * (w[Role.CHAMPION] + w[Role.CHALLENGER])
                                             < w[Role.CHAMPION]):
                role = Role.CHAMPION
            else:
                role = Role.CHALLENGER
            slot = self.champion if role == Role.CHAMPION else self.challenger
            if slot.model is None:
                raise ApiError(503, f"no {role} is in rotation" + (f": {slot.reason}" if slot.reason else ""),
                               "service_unavailable")
            if slot.model.in_flight >= self.opts.max_in_flight:
                raise ApiError(503, f"version {slot.model.label} has {slot.model.in_flight} requests in "
                               "flight; retry later", "overloaded")
            slot.model.in_flight += 1
            return role, slot.model

    def release(self, lm: LoadedModel) -> None:
        with self._lock:
            lm.in_flight -= 1

    def served(self) -> list[tuple[Role, LoadedModel]]:
        return [(r, s.model) for r, s in ((Role.CHAMPION, self.champion), (Role.CHALLENGER, self.challenger))
                if s.model is not None]

    def health(self) -> dict[str, Any]:
        with self._lock:
            expired = self._expire_lease()
            eff, lease = self.effective_weights(), self._lease_state()

            def slot(role: Role, s: _Slot) -> dict[str, Any] | None:
                if s.model is None and s.version is None:
                    return None
                m = s.model
                return {"alias": s.alias, "version": m.label if m else s.version,
                        "status": "serving" if m else "out_of_rotation", "weight": eff[role],
                        "requested_weight": self.weights[role], "reason": s.reason, "since": s.since,
                        "artifact_sha256": m.version.tags.get(Tag.ARTIFACT_SHA256) if m else None,
                        "device": m.deployable.device if m else None, "in_flight": m.in_flight if m else 0,
                        "engine": _engine_state(m, self.opts.stall_s) if m else None}

            champ, chal = slot(Role.CHAMPION, self.champion), slot(Role.CHALLENGER, self.challenger)
        if expired:
            self.on_change()
        stalled = [s for s in (champ, chal) if s and s["engine"] and s["engine"]["stalled"]]
        down = [s for s in (champ, chal) if s and s["engine"] and not s["engine"].get("alive", True)]
        if stalled:
            return {"status": "stalled", "model": self.opts.name, "champion": champ, "challenger": chal,
                    "weights": eff, "weights_lease": lease, "events": list(self.events)}
        degraded = self.champion.reason is not None or bool(down) or (chal is not None and chal["status"] != "serving")
        return {"status": "degraded" if degraded else "ok", "model": self.opts.name, "champion": champ,
                "challenger": chal, "weights": eff, "weights_lease": lease, "events": list(self.events)}


def _engine_state(lm: LoadedModel, stall_s: float) -> dict[str, Any]:
    """What the version's engine thread is doing; stalled: it has work and made no step for stall_s. For
    a vLLM engine: where it is, its state (serving, restarting, dead) and whether its process lives."""
    if lm.remote is not None:
        return lm.remote.health()
    b = lm.batcher
    assert b is not None and lm.engine is not None
    idle_for = b.stalled_s()
    return {"steps": b.scheduler.steps, "running": len(b.scheduler.running), "waiting": len(b.scheduler.waiting),
            "peak_running": b.peak_running,
            "slots": lm.engine.slots, "seconds_without_progress": round(idle_for, 3), "stalled": idle_for > stall_s}
