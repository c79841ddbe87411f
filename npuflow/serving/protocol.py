"""The OpenAI API as this server speaks it: request and response models with every field declared.

A field OpenAI defines but this server does not implement is declared with the one value it accepts
(`UNSUPPORTED`); any other value is a 400 naming the field. A field OpenAI does not define is a 400 too
(extra="forbid"). Errors are OpenAI's {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from npuflow.runtime.engine import SEED_MAX

# OpenAI completion fields this server does not implement -> the only value it accepts
UNSUPPORTED: dict[str, Any] = {
    "repetition_penalty": 1.0, "n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None,
    "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None,
}
CHAT_UNSUPPORTED: dict[str, Any] = {
    "repetition_penalty": 1.0, "n": 1, "logprobs": False, "top_logprobs": None, "presence_penalty": 0, "frequency_penalty": 0,
    "logit_bias": None, "tools": None, "tool_choice": None, "response_format": None,
}
MAX_STOP = 4  # stop strings per request, as OpenAI allows


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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False  # a last chunk with `usage` (and no choices) before [DONE]


class _Sampling(BaseModel):
    """The fields completions and chat share."""

    model_config = ConfigDict(extra="forbid")
    model: str  # NAME (weighted routing), NAME@champion, NAME@challenger or NAME@<challenger alias>
    max_tokens: int | None = Field(None, ge=1)  # tokens to generate at most (None: the server's default)
    # 0: greedy. Below 0.01 a softmax over bf16 logits is argmax in all but name: it is refused, not run.
    temperature: float = Field(1.0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)  # the sampling RNG's seed (torch takes 0..2**63-1)
    stop: str | list[str] | None = None  # up to MAX_STOP strings; the text ends before the first one
    stream: StrictBool = False  # server-sent events, one chunk per text delta, then [DONE]
    stream_options: StreamOptions | None = None
    user: str | None = None  # the caller's id, accepted and not used
    ignore_eos: StrictBool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)
    repetition_penalty: float | None = 1.0  # vLLM's extension, declared: only 1.0 (none) is accepted

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if v != 0 and not 0.01 <= v:
            raise ValueError("must be 0 (greedy) or in 0.01..2")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP} non-empty strings")
        return v

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> str | None:
        """The first field set to a value this server does not implement, or None."""
        for key, neutral in self._unsupported.items():
            value = getattr(self, key)
            if value is not None and value != neutral and not (neutral is None and value in ({}, [])):
                return key
        return None


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    _unsupported = UNSUPPORTED
    prompt: str | list[int] = Field(min_length=1)  # text, or token ids of the served model's tokenizer
    # declared, not implemented: only the neutral value (UNSUPPORTED) is accepted
    n: int | None = 1
    best_of: int | None = 1
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    presence_penalty: float | None = 0
    frequency_penalty: float | None = 0
    logit_bias: dict[str, float] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions: messages rendered with the tokenizer's chat template."""

    _unsupported = CHAT_UNSUPPORTED
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    n: int | None = 1
    logprobs: bool | None = False
    top_logprobs: int | None = None
    presence_penalty: float | None = 0
    frequency_penalty: float | None = 0
    logit_bias: dict[str, float] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


LEASE_MAX_S = 86400.0  # longest weights lease, seconds (longer: set permanent weights, without lease_s)


class WeightsRequest(BaseModel):
    """POST /admin/weights: relative routing weights, >= 0; lease_s: the challenger's weight lapses to 0
    unless the weights are posted again within this many seconds (absent: the weights stand until changed)."""

    model_config = ConfigDict(extra="forbid")
    champion: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False)
    challenger: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False)
    lease_s: float | None = Field(None, gt=0, le=LEASE_MAX_S, allow_inf_nan=False, strict=True)  # a JSON number


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: Literal["stop", "length", "cancelled"] | None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: Literal["stop", "length", "cancelled"] | None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length", "cancelled"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int  # Unix seconds: when the version was registered
    owned_by: str = "npuflow"
    max_model_len: int | None = None


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
