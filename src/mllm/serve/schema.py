"""The OpenAI Completions API as pydantic models: what `mllm serve` accepts and returns.

Field names, defaults and shapes follow the published API reference (POST /v1/completions,
GET /v1/models), so the `openai` client and tools built on it work unchanged. Validation is strict
(a string is not an integer, `true` is not a number) and unknown fields are refused, as the
API does. Fields the model cannot honour (`suffix`, `best_of` other than `n`, `logit_bias`,
penalties) are refused by `unsupported_field` rather than ignored, so a client never gets a
result that silently differs from what it asked for.

The models here are also what /openapi.json documents (app.py): the request body with its
constraints, the answers, and the error shape every 4xx/5xx uses.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

DEFAULT_MAX_TOKENS = 16  # the API's default when max_tokens is absent
MAX_CHOICES = 128  # prompts x n per request (the API caps n at 128)
MAX_STOP_STRINGS = 4  # the API allows up to 4 stop sequences
MAX_LOGPROBS = 5  # the API's limit on `logprobs` (most likely tokens listed per position)

Prompt = str | list[str] | list[int] | list[list[int]]


class ApiError(Exception):
    """An error answered with the API's error object: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The API's error object."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(..., description="invalid_request_error (4xx) or server_error (5xx).")
    param: str | None = Field(None, description="The request field at fault, if one is.")
    code: str | None = Field(None, description="e.g. context_length_exceeded, model_not_found.")


class ErrorResponse(BaseModel):
    """The API's error object: the body of every 4xx and 5xx answer."""

    error: ErrorDetail


# What the before-validators below accept, for the JSON schema (they check it by hand, to give
# the API's messages).
PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        {
            "type": "array",
            "items": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0},
                "minItems": 1,
            },
            "minItems": 1,
        },
    ],
    "description": "A string, a list of strings, a list of token ids or a list of such lists "
    "(ids must lie in the vocabulary).",
}
STOP_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "maxItems": MAX_STOP_STRINGS,
        },
        {"type": "null"},
    ],
    "default": None,
    "description": f"Up to {MAX_STOP_STRINGS} strings that end the text (never part of it).",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    include_usage: bool = Field(
        False, description="Send a last chunk with the usage counts (and no choices)."
    )


class CompletionRequest(BaseModel):
    """Body of POST /v1/completions. None means "the API's default" for every optional field."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = Field(..., description="The served model's id (see GET /v1/models).")
    prompt: Annotated[Any, WithJsonSchema(PROMPT_SCHEMA)] = Field(...)
    max_tokens: int | None = Field(
        None,
        ge=0,
        description="Tokens to generate at most (default 16, or what is left of the context); "
        "0 generates nothing (with echo and logprobs: score the prompt). Prompt plus max_tokens "
        "must fit the model's context.",
    )
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy (default 1).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass (default 1).")
    top_k: int | None = Field(None, ge=0, description="Extension: keep the k likeliest (0: off).")
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description="Completions per prompt.")
    stop: Annotated[str | list[str] | None, WithJsonSchema(STOP_SCHEMA)] = None
    seed: int | None = Field(None, description="Makes sampling reproducible.")
    stream: bool | None = Field(None, description="Send server-sent events as tokens arrive.")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="An end-user id; accepted and not used.")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="List each token's log-probability (fp32, of the model's own distribution, "
        "before temperature / top_p / top_k) and the `logprobs` likeliest tokens at each "
        "position, plus the chosen one when it is not among them.",
    )
    echo: bool | None = Field(
        None,
        description="Put the prompt before the completion in `text` (and, with logprobs, its "
        "tokens first in `logprobs`; the first prompt token's logprob is null).",
    )
    # Accepted only at the values that mean "off": the model cannot honour anything else.
    best_of: int | None = Field(None, description="Only equal to n (or absent).")
    suffix: str | None = Field(None, description="Only null or empty.")
    logit_bias: dict[str, float] | None = Field(None, description="Only null or {}.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0 (or absent).")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0 (or absent).")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Prompt:
        return check_prompt_shape(value)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(stop == "" for stop in stops):
            raise ValueError("stop strings must not be empty")
        return value

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def scores_prompt(self) -> bool:
        """Whether the prompt's own tokens get log-probabilities (echo with logprobs)."""
        return bool(self.echo) and self.logprobs is not None


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_prompt_shape(value: Any) -> Prompt:
    """The prompt as one of the API's four shapes, none of them empty."""
    shapes = "a string, a list of strings, a list of token ids or a list of token id lists"
    if isinstance(value, str):
        if not value:
            raise ValueError("the prompt must not be empty")
        return value
    if not isinstance(value, list):
        raise ValueError(f"the prompt must be {shapes}")
    if not value:
        raise ValueError("the prompt list must not be empty")
    if all(isinstance(item, str) for item in value):
        if any(not item for item in value):
            raise ValueError("prompts must not be empty strings")
        return value
    if all(_is_token_id(item) for item in value):
        return value
    if all(isinstance(item, list) and all(_is_token_id(t) for t in item) for item in value):
        if any(not item for item in value):
            raise ValueError("token id lists must not be empty")
        return value
    raise ValueError(f"the prompt must be {shapes}")


def unsupported_field(request: CompletionRequest) -> ApiError | None:
    """A 400 for the first field set to something this server cannot do, else None."""
    refusals: list[tuple[str, bool, str]] = [
        ("suffix", bool(request.suffix), "suffix (insertion) is not supported"),
        (
            "best_of",
            request.best_of is not None and request.best_of != request.choices_per_prompt,
            "best_of is not supported: omit it or set it equal to n",
        ),
        ("logit_bias", bool(request.logit_bias), "logit_bias is not supported"),
        ("presence_penalty", bool(request.presence_penalty), "presence_penalty is not supported"),
        (
            "frequency_penalty",
            bool(request.frequency_penalty),
            "frequency_penalty is not supported",
        ),
        (
            "stream_options",
            request.stream_options is not None and not request.stream,
            "stream_options is only allowed when stream is true",
        ),
    ]
    for param, refused, message in refusals:
        if refused:
            return ApiError(400, message, param=param, code="unsupported_parameter")
    return None


def describe_request_error(error: ValidationError) -> ApiError:
    """The first problem of a request as a 400 naming the field, in the API's error shape."""
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    param = loc[0] if loc else None
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return ApiError(
            400,
            f"Unrecognized request argument supplied: {'.'.join(loc)}",
            param=param,
            code="unrecognized_argument",
        )
    if first["type"] == "missing":
        return ApiError(400, f"you must provide a {param} parameter", param=param)
    if first["type"] == "model_type":  # the body is not a JSON object
        return ApiError(400, "the request body must be a JSON object", code="invalid_json")
    where = ".".join(loc)
    return ApiError(400, f"{where}: {message}" if where else message, param=param)


class CompletionLogprobs(BaseModel):
    """Per-token log-probabilities of one choice (or of one streamed chunk of it): with echo the
    prompt's tokens come first, then one entry per generated token `completion_tokens` counts
    (an end-of-text token that ends the choice included, though it adds nothing to `text`)."""

    tokens: list[str] = Field(
        ...,
        description="Each token's text; special tokens by name (<|endoftext|>), a token that "
        "is not whole UTF-8 as `bytes:\\xNN...`.",
    )
    token_logprobs: list[float | None] = Field(
        ..., description="log p(token | what precedes it); null for the first prompt token."
    )
    top_logprobs: list[dict[str, float] | None] = Field(
        ...,
        description="The `logprobs` likeliest tokens at each position, likeliest first, plus "
        "the chosen token where it is not among them; null for the first prompt token.",
    )
    text_offset: list[int] = Field(
        ...,
        description="Where each token starts in the choice's `text` (in characters); with a "
        "stop string the last entries may lie past the end of the text.",
    )


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """A whole completion (stream: false); a streamed chunk has the same shape."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mllm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
