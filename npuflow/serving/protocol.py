"""The OpenAI API as this server speaks it: request and response models with every field declared.

A field OpenAI defines but this server does not implement is declared with the one value it accepts
(`UNSUPPORTED`); any other value is a 400 naming the field. A field OpenAI does not define is a 400 too
(extra="forbid"). Errors are OpenAI's {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from npuflow.runtime.engine import SEED_MAX

# OpenAI completion fields this server does not implement -> the only value it accepts
UNSUPPORTED: dict[str, Any] = {
    "n": 1, "best_of": 1, "echo": False, "logprobs": None, "stop": None, "suffix": None,
    "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None,
}


class ApiError(Exception):
    """An error answered as OpenAI's {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param)


class CompletionRequest(BaseModel):
    """POST /v1/completions."""

    model_config = ConfigDict(extra="forbid")
    model: str  # NAME (weighted routing), NAME@champion, NAME@challenger or NAME@<challenger alias>
    prompt: str
    max_tokens: int = Field(16, ge=1)  # tokens to generate at most
    temperature: float = Field(1.0, ge=0, le=2)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)  # the sampling RNG's seed (torch takes 0..2**63-1)
    stream: StrictBool = False  # server-sent events, one chunk per text delta, then [DONE]
    user: str | None = None  # the caller's id, accepted and not used
    # declared, not implemented: only the neutral value (UNSUPPORTED) is accepted
    n: int | None = 1
    best_of: int | None = 1
    echo: bool | None = False
    logprobs: int | None = None
    stop: str | list[str] | None = None
    suffix: str | None = None
    presence_penalty: float | None = 0
    frequency_penalty: float | None = 0
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> str | None:
        """The first field set to a value this server does not implement, or None."""
        for key, neutral in UNSUPPORTED.items():
            value = getattr(self, key)
            if value is not None and value != neutral and not (neutral is None and value in ({}, [])):
                return key
        return None


class WeightsRequest(BaseModel):
    """POST /admin/weights: relative routing weights, >= 0."""

    model_config = ConfigDict(extra="forbid")
    champion: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False)
    challenger: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: Literal["stop", "length", "cancelled"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int  # Unix seconds
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


def sse(body: BaseModel | dict[str, Any]) -> str:
    """One server-sent event carrying `body` as JSON."""
    data = body.model_dump_json() if isinstance(body, BaseModel) else json.dumps(body)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def validation_message(err: ValidationError, fields: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """A 400's message naming each bad field, and the first field as OpenAI's `param`."""
    parts, param = [], None
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "body"
        param = param or loc
        if e["type"] == "missing":
            parts.append(f"{loc}: required")
        elif e["type"] == "extra_forbidden":
            known = f" (fields: {', '.join(fields)})" if fields else ""
            parts.append(f"{loc}: not a field of this API{known}")
        else:
            parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts), param
