"""Request bodies of the OpenAI-compatible endpoints (pydantic; unknown fields are refused), and the
OpenAI-style error body every 4xx/5xx carries."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

UNSUPPORTED_AT_DEFAULT = {"logprobs": (None, False, 0), "best_of": (None, 1), "presence_penalty": (0.0,),
                          "frequency_penalty": (0.0,), "repetition_penalty": (1.0,)}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    min_tokens: StrictInt = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=-1)          # 0 or -1: no top-k filter
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1, le=1)         # one choice per request
    user: str | None = None                     # accepted, unused
    return_token_ids: StrictBool = False        # (as vLLM's) choices and chunks also carry the output ids
    # fields benchmark clients send at their defaults: accepted at those, refused otherwise
    logprobs: StrictBool | StrictInt | None = None
    best_of: StrictInt | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @model_validator(mode="after")
    def _unsupported(self):
        for name, neutral in UNSUPPORTED_AT_DEFAULT.items():
            if getattr(self, name) not in neutral:
                raise ValueError(f"{name} is not supported (leave it at {neutral[-1]!r})")
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("stop: at most 16 non-empty strings")
        return stops

    def sampling_params(self, max_tokens: int, request_id: int) -> dict:
        """SamplingParams fields. A request without a seed gets its id as seed: requests sharing a
        seed would draw the same noise."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": max(0, self.top_k),
                "seed": self.seed if self.seed is not None else request_id, "max_tokens": max_tokens,
                "ignore_eos": self.ignore_eos, "min_tokens": self.min_tokens}


class CompletionRequest(_Sampling):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    echo: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError("prompt: one prompt per request (batches of prompts are not supported)")
            value = value[0]
        if not value:
            raise ValueError("prompt: empty")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_message(exc) -> tuple[str, str | None]:
    """pydantic's first error as one line, and the parameter it names."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if not str(p).startswith(("function-", "str", "list["))]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid request")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    return (f"{param}: {msg}" if param else msg), param


class ApiError(Exception):
    """A request the server answers with an error status and an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)
