"""TODO."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

UNSUPPORTED = {  # OpenAI completion fields this server does not implement -> the only value it accepts
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


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields: neutral values accepted (UNSUPPORTED)
    model: str
    prompt: str
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stream: StrictBool = False
    user: str | None = None


class WeightsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    champion: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False)
    challenger: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False)


def _chunk(cid: str, created: int, model: str, text: str, finish: str | None) -> str:
    body = {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


def _validation_message(err: ValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "body"
        param = param or loc
        parts.append(f"{loc}: {'required' if e['type'] == 'missing' else e['msg']}")
    return "; ".join(parts), param
