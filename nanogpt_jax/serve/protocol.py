"""OpenAI's completions API as data: the request a client sends, the errors it understands,
and the objects it reads back (`/v1/completions`, streamed or not).

Only translation lives here; what the fields do is the scheduler's business. Non-OpenAI
knobs that vLLM also accepts (`top_k`, `min_p`) are extra fields of the same request.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

MAX_LOGPROBS = 5  # OpenAI's limit for the completions API
MAX_TOKENS_LIMIT = 1 << 16  # a generous cap: the window slides, so only time bounds a request
MAX_CHOICES = 128  # rows one request may ask for (prompts x n)
SEED_RANGE = (-(1 << 31), 1 << 31)  # the engine's seeds are 32-bit, like sample.py's


class OpenAIError(Exception):
    """An error as OpenAI shapes it: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return {400: "invalid_request_error", 404: "not_found_error"}.get(
            self.status, "server_error"
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions. Unknown fields are ignored, as OpenAI's are."""

    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = Field(None, ge=0, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], lt=SEED_RANGE[1])
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    top_k: StrictInt | None = Field(None, ge=-1)  # vLLM's: -1 or 0 (or none) is off
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    # OpenAI fields this server does not implement: accepted only at their neutral values
    best_of: StrictInt | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict | None = None
    suffix: str | None = None
    user: str | None = None

    def neutral_extras(self) -> None:
        """Refuse what would silently change the output if ignored."""
        if self.best_of not in (None, self.n):
            raise OpenAIError(400, "best_of is not supported (only best_of == n)", "best_of")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) != 0:
                raise OpenAIError(400, f"{name} is not supported (only 0)", name)
        if self.logit_bias:
            raise OpenAIError(400, "logit_bias is not supported", "logit_bias")
        if self.suffix:
            raise OpenAIError(400, "suffix is not supported", "suffix")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise OpenAIError(400, "stop must be up to 4 non-empty strings", "stop")
        return stops


def parse_request(body: object) -> CompletionRequest:
    """A validated request, or a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object", None)
    try:
        request = CompletionRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"][:1]) or None
        raise OpenAIError(400, f"{param}: {first['msg']}", param) from None
    request.neutral_extras()
    return request


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    id_: str, model: str, seed: int, choices: list[dict], usage_: dict | None, created=None
) -> dict:
    """A completion object; streamed chunks are the same object with partial choices.

    `seed` is the request's seed (drawn by the server when the client gave none), so that
    any completion can be replayed exactly.
    """
    return {
        "id": id_,
        "object": "text_completion",
        "created": int(created or time.time()),
        "model": model,
        "system_fingerprint": f"nanogpt-jax-seed-{seed}",
        "seed": seed,
        "choices": choices,
        "usage": usage_,
    }


def choice(
    index: int,
    text: str,
    finish_reason: Literal["stop", "length"] | None,
    logprobs: dict | None = None,
) -> dict:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}


def model_card(name: str, max_model_len: int, vocab_size: int, created: int) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "nanogpt-jax",
        "max_model_len": max_model_len,  # block_size: longer prompts are cropped
        "vocab_size": vocab_size,
    }
