"""`mllm serve`: an OpenAI-compatible completions API over a trained checkpoint.

    POST /v1/completions   the Completions API (stream or not, n, list prompts, stop, seed,
                           logprobs, echo)
    GET  /v1/models        the one model served;  GET /v1/models/{id}
    GET  /health           liveness, with the number of running and waiting sequences
    GET  /openapi.json     all of the above, with every status code each route answers

Requests are served concurrently. The event loop only parses, validates and tokenises requests
and shuffles text: all model work happens on the engine's decode thread (engine.py), which
decodes every running choice of every request together (continuous batching). Each choice's
events come back through an asyncio queue, which a streaming response turns into server-sent
events and a plain response collects.

Bad input never reaches the engine: every request is checked first (body size, JSON, fields,
prompt length against the context) and refused with a 4xx in the API's error shape. A client
that disconnects stops its sequences; their rows are freed at the next step.

No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (Request)
at runtime, and they live inside create_app, where FastAPI cannot resolve them from strings.
"""

import asyncio
import copy
import errno
import itertools
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mllm.config import ServeConfig
from mllm.errors import MllmError, UsageError
from mllm.sampling import SamplingParams
from mllm.serve.engine import (
    Completion,
    Engine,
    Event,
    Failed,
    Finished,
    Logprobs,
    QueueFull,
    TextDelta,
)
from mllm.serve.logprobs import ChoiceLogprobs, TokenTable
from mllm.serve.schema import (
    DEFAULT_MAX_TOKENS,
    MAX_CHOICES,
    ApiError,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    describe_request_error,
    error_body,
    unsupported_field,
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServedModel:
    """What the HTTP layer needs to know about the model it serves."""

    name: str
    created: int  # unix time of the checkpoint
    context: int
    vocab_size: int
    tokenizer: Any  # a `tokenizers.Tokenizer`
    engine: Engine
    max_request_bytes: int = 1_048_576
    tokens: TokenTable | None = None  # token strings and bytes, for logprobs and echo


# -- reading and checking a request -----------------------------------------------------------


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes: from
    Content-Length before reading anything, else while reading (chunked uploads)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, too_large_message(limit), code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, too_large_message(limit), code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def too_large_message(limit: int) -> str:
    return f"the request body exceeds the server's limit of {limit} bytes"


def parse_request(body: bytes) -> CompletionRequest:
    """Body bytes -> a validated CompletionRequest, or a 400 naming the problem."""
    if not body:
        raise ApiError(400, "the request body is empty: send a JSON object", code="invalid_json")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(
            400, f"the request body is not valid JSON: {e}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as e:
        raise describe_request_error(e) from None


def tokenize_prompts(served: ServedModel, prompt: Any) -> list[list[int]]:
    """The prompt's token ids, one list per prompt (token-id prompts are checked, not encoded).

    Runs in a worker thread: encoding a long prompt must not stall the event loop.
    """
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt[0], str):
        return [encoding.ids for encoding in served.tokenizer.encode_batch(prompt)]
    token_lists = [prompt] if isinstance(prompt[0], int) else prompt
    for ids in token_lists:
        bad = next((t for t in ids if not 0 <= t < served.vocab_size), None)
        if bad is not None:
            raise ApiError(
                400,
                f"token id {bad} is outside the vocabulary (0..{served.vocab_size - 1})",
                param="prompt",
            )
    return [list(ids) for ids in token_lists]


def completion_budget(request: CompletionRequest, prompt_ids: list[int], context: int) -> int:
    """max_tokens for one prompt: as asked, or by default 16 capped to what the context has
    left; a prompt plus completion beyond the context is a 400, as in the API."""
    room = context - len(prompt_ids)
    wanted = request.max_tokens if request.max_tokens is not None else DEFAULT_MAX_TOKENS
    if request.max_tokens is None and room > 0:
        wanted = min(wanted, room)
    if len(prompt_ids) + wanted > context:
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens, however you requested "
            f"{len(prompt_ids) + wanted} tokens ({len(prompt_ids)} in your prompt; {wanted} for "
            "the completion). Please reduce your prompt; or completion length.",
            param="max_tokens" if room > 0 else "prompt",
            code="context_length_exceeded",
        )
    return wanted


# -- one request's sequences and their events --------------------------------------------------


CLIENT_GONE = object()  # put on a job's queue when its client disconnects


@dataclass
class ChoiceState:
    """One choice as its events arrive: its text pieces (the echoed prompt first), how many of
    them a stream has sent, and its logprobs when asked for."""

    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: ChoiceLogprobs | None = None
    sent: int = 0

    def unsent_text(self) -> str:
        text, self.sent = "".join(self.text[self.sent :]), len(self.text)
        return text


@dataclass
class CompletionJob:
    """The sequences of one request (prompt-major: choice index = prompt * n + j) and the queue
    their events arrive on, as (choice index, event)."""

    sequences: list[Completion]
    queue: asyncio.Queue[Any]
    prompt_tokens: int
    echoes: list[str]  # per choice: the text before the completion (its prompt, with echo)
    tokens: TokenTable | None = None  # set when the request asks for logprobs
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def cancel(self) -> None:
        for sequence in self.sequences:
            sequence.cancel()

    def new_choices(self) -> list[ChoiceState]:
        return [
            ChoiceState(
                text=[echo] if echo else [],
                logprobs=None if self.tokens is None else ChoiceLogprobs(self.tokens, len(echo)),
            )
            for echo in self.echoes
        ]


def build_job(
    request: CompletionRequest,
    prompts: list[list[int]],
    budgets: list[int],
    tokens: TokenTable | None = None,
) -> CompletionJob:
    """One engine Completion per choice; a seeded request seeds choice i with seed + i. With
    echo, each choice's text starts with its prompt (`tokens` decodes it)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def emitter(index: int) -> Callable[[Event], None]:
        return lambda event: loop.call_soon_threadsafe(queue.put_nowait, (index, event))

    params = SamplingParams(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_k=request.top_k or 0,
        top_p=1.0 if request.top_p is None else request.top_p,
    )
    if (request.echo or request.logprobs is not None) and tokens is None:
        raise ApiError(
            500, "this server has no token table for echo or logprobs", error_type="server_error"
        )
    sequences, echoes = [], []
    index = itertools.count()
    for prompt_ids, budget in zip(prompts, budgets, strict=True):
        prompt_key = object()  # the n choices of a prompt share one prefill
        echo = tokens.echo_text(prompt_ids) if request.echo and tokens is not None else ""
        for _ in range(request.choices_per_prompt):
            echoes.append(echo)
            i = next(index)
            sequences.append(
                Completion(
                    prompt_ids=prompt_ids,
                    max_tokens=budget,
                    params=params,
                    emit=emitter(i),
                    seed=None if request.seed is None else request.seed + i,
                    stop=request.stop_strings,
                    prompt_key=prompt_key,
                    logprobs=request.logprobs,
                    score_prompt=request.scores_prompt,
                )
            )
    return CompletionJob(
        sequences,
        queue,
        prompt_tokens=sum(len(p) for p in prompts),
        echoes=echoes,
        tokens=None if request.logprobs is None else tokens,
    )


def apply_event(choice: ChoiceState, event: Event) -> None:
    """Record an event; a failure becomes a 500 for the request."""
    if isinstance(event, TextDelta):
        choice.text.append(event.text)
        if event.logprobs and choice.logprobs is not None:
            choice.logprobs.add(event.logprobs, False)
    elif isinstance(event, Logprobs):
        if choice.logprobs is not None:
            choice.logprobs.add(event.entries, event.prompt)
    elif isinstance(event, Finished):
        choice.finish_reason = event.reason
        choice.completion_tokens = event.completion_tokens
    elif isinstance(event, Failed):
        raise ApiError(500, event.message, error_type="server_error")


def usage_of(job: CompletionJob, choices: list[ChoiceState]) -> Usage:
    completion = sum(choice.completion_tokens for choice in choices)
    return Usage(
        prompt_tokens=job.prompt_tokens,
        completion_tokens=completion,
        total_tokens=job.prompt_tokens + completion,
    )


async def wait_for_disconnect(request: Any) -> None:
    """Return when the client has gone (the body must have been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(job: CompletionJob, request: Any, model: str) -> CompletionResponse | None:
    """Wait for every choice to finish; None if the client disconnected first (then the
    sequences are cancelled)."""

    async def watch() -> None:
        await wait_for_disconnect(request)
        job.queue.put_nowait(CLIENT_GONE)

    watcher = asyncio.ensure_future(watch())
    choices = job.new_choices()
    try:
        while any(choice.finish_reason is None for choice in choices):
            item = await job.queue.get()
            if item is CLIENT_GONE:
                return None
            index, event = item
            apply_event(choices[index], event)
    finally:
        watcher.cancel()
        job.cancel()  # a no-op for finished sequences; stops the rest on disconnect or error
    return CompletionResponse(
        id=job.id,
        created=job.created,
        model=model,
        choices=[
            CompletionChoice(
                text="".join(c.text),
                index=i,
                logprobs=None if c.logprobs is None else c.logprobs.result(),
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(choices)
        ],
        usage=usage_of(job, choices),
    )


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def stream_chunks(
    job: CompletionJob, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    """Server-sent events in the API's chunk format, ending with `data: [DONE]`.

    Events waiting together are merged (one chunk per choice per wake-up), so a busy server
    sends fewer, larger chunks instead of falling behind. A choice's first chunk starts with its
    echoed prompt; each chunk's logprobs cover the tokens that arrived since the last one, their
    text_offset counting from the start of the choice's whole text. (The response that sends
    these cancels the job when it ends, however it ends: see JobStream in create_app.)
    """
    choices = job.new_choices()
    head = {"id": job.id, "object": "text_completion", "created": job.created, "model": model}
    while any(choice.finish_reason is None for choice in choices):
        ready: dict[int, None] = {}  # the choices that had events, in order
        for index, event in await drain(job.queue):
            try:
                apply_event(choices[index], event)
            except ApiError as error:  # decoding failed: say so and end the stream
                yield sse(error.body())
                yield sse("[DONE]")
                return
            ready[index] = None
        for index in ready:
            state = choices[index]
            choice = {
                "text": state.unsent_text(),
                "index": index,
                "logprobs": None if state.logprobs is None else state.logprobs.take().model_dump(),
                "finish_reason": state.finish_reason,  # None until the last chunk
            }
            chunk: dict[str, Any] = {**head, "choices": [choice]}
            if include_usage:
                chunk["usage"] = None
            yield sse(chunk)
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage_of(job, choices).model_dump()})
    yield sse("[DONE]")


async def drain(queue: asyncio.Queue[Any]) -> list[Any]:
    """The next item of `queue` and every item already waiting behind it."""
    items = [await queue.get()]
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


# -- what /openapi.json says ---------------------------------------------------------------------

REQUEST_SCHEMA_REF = "#/components/schemas/CompletionRequest"


def error_answer(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


# Every status POST /v1/completions answers (an unknown path is 404 and a wrong method 405 for
# every route; those are not the routes' own answers).
COMPLETION_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "model": CompletionResponse,
        "description": "The completion; with `stream: true`, server-sent events instead: "
        "`data: {chunk}` lines (a chunk has the response's shape, one choice each, and no usage "
        "unless stream_options.include_usage asks for a last usage-only chunk), ending with "
        "`data: [DONE]`. A decoding failure mid-stream is sent as a `data: {error}` line "
        "before [DONE].",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    400: error_answer(
        "A malformed body, a field of the wrong type or out of range, an unknown or unsupported "
        "field, a token id outside the vocabulary, or prompt + max_tokens beyond the context "
        "(code context_length_exceeded)."
    ),
    404: error_answer("`model` is not the served model (code model_not_found)."),
    413: error_answer("The body exceeds --max-request-bytes (code request_too_large)."),
    499: {
        "description": "Client Closed Request: the client left before the answer (it is never "
        "received; the access log shows it). Its sequences are cancelled."
    },
    500: error_answer("Decoding failed (e.g. out of memory); the server keeps serving."),
    503: {
        **error_answer(
            "Overloaded: --max-waiting sequences already wait (code server_overloaded); retry."
        ),
        "headers": {
            "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
        },
    },
}
COMPLETION_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": REQUEST_SCHEMA_REF}}},
    }
}


def truthful_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's generated document, corrected: the completions body (read by hand, to cap its
    size) is described by CompletionRequest, and the 422 FastAPI adds to routes with parameters
    is dropped (validation errors answer 400 here, and no route's parameters can fail)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    request = CompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(request.pop("$defs", {}))
    components["CompletionRequest"] = request
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    for unused in ("HTTPValidationError", "ValidationError"):
        if f'"#/components/schemas/{unused}"' not in json.dumps(schema["paths"]):
            components.pop(unused, None)
    return schema


# -- the app ----------------------------------------------------------------------------------


def create_app(served: ServedModel) -> Any:
    """The FastAPI app over a running engine."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    app = FastAPI(title="mllm", summary="OpenAI-compatible completions over an mllm checkpoint")
    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = truthful_openapi(generate_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    class JobStream(StreamingResponse):
        """A streamed completion that cancels its sequences however the response ends, even
        when the client leaves before the first chunk (the generator never starts then)."""

        def __init__(self, job: CompletionJob, chunks: AsyncIterator[bytes]) -> None:
            super().__init__(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
            self.job = job

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.job.cancel()

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        body = error_body(f"{where}: {first['msg']}", "invalid_request_error", where or None)
        return JSONResponse(body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        code = str(error.detail).lower().replace(" ", "_")
        return JSONResponse(
            error_body(str(error.detail), kind, None, code),
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        message = f"internal error: {type(error).__name__}"
        return JSONResponse(error_body(message, "server_error"), status_code=500)

    @app.get("/health", responses={200: {"description": "The server is up; engine counters."}})
    async def health() -> dict[str, Any]:
        stats = served.engine.stats
        return {
            "status": "ok",
            "model": served.name,
            "running": stats.running,
            "waiting": stats.waiting,
            "finished": stats.sequences_finished,
            "cancelled": stats.sequences_cancelled,
            "decode_steps": stats.steps,
            "decoded_tokens": stats.rows_decoded,
            "decode_seconds": round(stats.decode_seconds, 6),
        }

    def model_card() -> ModelCard:
        return ModelCard(id=served.name, created=served.created)

    @app.get("/v1/models", response_model=None, responses={200: {"model": ModelList}})
    async def list_models() -> dict[str, Any]:
        return ModelList(data=[model_card()]).model_dump()

    @app.get(
        "/v1/models/{model_id}",
        response_model=None,
        responses={
            200: {"model": ModelCard},
            404: error_answer("Not the served model (code model_not_found)."),
        },
    )
    async def get_model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card().model_dump()

    def check_model(name: str) -> None:
        if name != served.name:
            raise ApiError(
                404,
                f"The model `{name}` does not exist (this server serves `{served.name}`)",
                param="model",
                code="model_not_found",
            )

    @app.post(
        "/v1/completions",
        response_model=None,
        responses=COMPLETION_ANSWERS,
        openapi_extra=COMPLETION_BODY,
    )
    async def completions(request: Request) -> Response:
        try:
            body = await read_body(request, served.max_request_bytes)
        except ClientDisconnect:  # the client left before sending its whole request
            return Response(status_code=499)
        completion = parse_request(body)
        check_model(completion.model)
        refusal = unsupported_field(completion)
        if refusal is not None:
            raise refusal
        prompts = await run_in_threadpool(tokenize_prompts, served, completion.prompt)
        if len(prompts) * completion.choices_per_prompt > MAX_CHOICES:
            raise ApiError(
                400,
                f"prompts x n is {len(prompts) * completion.choices_per_prompt}: at most "
                f"{MAX_CHOICES} completions per request",
                param="n",
            )
        budgets = [completion_budget(completion, ids, served.context) for ids in prompts]
        job = build_job(completion, prompts, budgets, served.tokens)
        try:
            served.engine.submit(job.sequences)
        except QueueFull as full:
            raise ApiError(
                503,
                f"the server is overloaded ({full}; --max-waiting "
                f"{served.engine.max_waiting}): retry shortly",
                error_type="server_error",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            ) from None
        if completion.stream:
            return JobStream(job, stream_chunks(job, served.name, completion.include_usage))
        result = await collect(job, request, served.name)
        if result is None:  # the client left; nobody reads this
            return Response(status_code=499)
        return JSONResponse(result.model_dump())

    return app


# -- the command --------------------------------------------------------------------------------


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one clear error (port in use, unknown host)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise MllmError(
                f"port {port} on {host} is already in use: stop what is using it or pass "
                "another --port"
            ) from None
        raise MllmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def uvicorn_log_config(quiet: bool) -> dict[str, Any]:
    """uvicorn's logging, with access lines on stderr too (stdout is for data)."""
    import uvicorn.config

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    level = "WARNING" if quiet else "INFO"
    for logger in config["loggers"].values():
        logger["level"] = level
    return config


def load_served_model(config: ServeConfig, checkpoint: Path) -> ServedModel:
    """Load the checkpoint and its tokenizer (refusing a mismatch) and build the engine
    (`run_server` starts it)."""
    import torch

    from mllm.console import info
    from mllm.device import DTYPE_NAMES, decode_threads, pick_device, resolve_decode_dtype
    from mllm.train.checkpoint import STATE, load_checkpoint, load_run_tokenizer, run_dir_of

    device = pick_device(config.device)
    threads = None
    if device.type == "cpu":
        # Only the engine's decode thread runs parallel kernels: an OpenMP team of this thread's
        # as well would slow every decode step (engine.py, "CPU threads"). So 1 thread here,
        # from before the first kernel (loading the checkpoint).
        torch.set_num_threads(1)
        threads = decode_threads(config.threads, reserved=1)
    dtype = resolve_decode_dtype(config.dtype, device)
    loaded = load_checkpoint(checkpoint, device=device, dtype=dtype)
    tokenizer = load_run_tokenizer(loaded, config.tokenizer)
    vocab_size = loaded.model.token_embedding.num_embeddings
    if tokenizer.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise MllmError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
            f"{vocab_size}: pass the run's own tokenizer.json"
        )
    if threads is not None:
        info(f"decoding on cpu {DTYPE_NAMES[dtype]} with {threads}")
    tokens = TokenTable.of(tokenizer, vocab_size)
    engine = Engine(
        loaded.model,
        tokens.text_bytes,
        eot_id=loaded.data.eot_id,
        max_batch_size=config.max_batch_size,
        max_waiting=config.max_waiting,
        threads=None if threads is None else threads.count,
    )
    name = config.model_name or run_dir_of(checkpoint).resolve().name or "mllm"
    return ServedModel(
        name=name,
        created=int((checkpoint / STATE).stat().st_mtime),
        context=loaded.config.context,
        vocab_size=vocab_size,
        tokenizer=tokenizer,
        engine=engine,
        max_request_bytes=config.max_request_bytes,
        tokens=tokens,
    )


def run_server(config: ServeConfig) -> None:
    """Check everything a user can get wrong, then serve until interrupted (Ctrl-C / SIGTERM)."""
    try:
        import uvicorn
    except ImportError:
        raise MllmError("serving needs FastAPI and uvicorn: pip install 'mllm[serve]'") from None
    from rich.markup import escape

    from mllm.console import essential, is_quiet
    from mllm.train.checkpoint import find_checkpoint

    checkpoint = find_checkpoint(config.run_dir, config.checkpoint)
    sock = listen_socket(config.host, config.port)
    served = None
    try:
        served = load_served_model(config, checkpoint)
        served.engine.start()
        # Even with --quiet: with --port 0 this line is the only way to learn the port.
        essential(escape(f"serving model {served.name!r} ({checkpoint}) at {url_of(sock)}"))
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(served),
                log_config=uvicorn_log_config(is_quiet()),
                timeout_graceful_shutdown=5,
                access_log=not is_quiet(),
            )
        )
        server.run(sockets=[sock])
    finally:
        if served is not None:
            served.engine.stop()
        sock.close()
