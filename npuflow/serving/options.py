"""ServeOptions: what one serving process serves and how (CLI flags and environment, validated once)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from npuflow.core.config import ServingConfig
from npuflow.core.names import Alias


class ServeOptions(BaseModel):
    """What one serving process serves and how (CLI flags and environment, validated once)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str  # registered model (the config's `name`)
    tracking_uri: str  # MLflow registry
    store_uri: str  # artifact store, tried before the one recorded with the deployable
    cache_dir: Path  # local copies of remote artifacts
    challenger_alias: str = Alias.CANDIDATE  # served beside the champion when it is another version
    champion_weight: float = Field(100.0, ge=0)  # relative routing weight
    challenger_weight: float = Field(0.0, ge=0)  # relative routing weight (0: loaded, no weighted traffic)
    token: str | None = None  # bearer token for /v1 and /admin; None: no auth
    max_tokens_limit: int = Field(256, ge=1)  # largest max_tokens a request may ask for, tokens
    max_body_bytes: int = Field(64 << 10, ge=1024)  # request bodies above this get 413
    max_in_flight: int = Field(64, ge=1)  # requests queued or running per model; above: 503
    max_batch: int = Field(16, ge=1, le=256)  # sequences decoded together per version (KV cache slots)
    kv_cache_gib: float | None = Field(None, gt=0)  # KV cache per version; None: from free memory (loading)
    max_request_s: float = Field(600.0, gt=0)  # a generation running longer is stopped
    stall_s: float = Field(60.0, gt=0)  # /health: an engine with work and no step for this long is stalled
    serving: ServingConfig = ServingConfig()  # how versions whose deployable says engine vllm are run
    engine_restarts: int = Field(3, ge=0)  # a champion's vLLM engine that dies is restarted this often in a row
    seed: int = 0  # routing RNG seed (the same seed, the same sequence of choices)
    # Tests and rehearsals only: sleep this long before each token the challenger generates, ms. It makes a
    # challenger measurably slow through the real serving path (no mock) so a canary analysis can fail it.
    challenger_slowdown_ms: float = Field(0.0, ge=0)
