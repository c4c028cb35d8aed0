"""`mllm serve` over real HTTP: a server subprocess on a free loopback port, driven by httpx."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from fixtures import ServerProcess, write_tiny_run
from mllm.data.tokenizer import load_tokenizer

CONTEXT = 512
BODY_LIMIT = 65_536
PROMPT = "Once upon a time"
MODEL = "tiny-run"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = Path(tmp_path_factory.mktemp("serve")) / "tiny-run"
    write_tiny_run(run, context=CONTEXT, heads=2, weights="never_eot")
    return run


@pytest.fixture(scope="module")
def server(run_dir: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(
        run_dir, "--max-batch-size", "4", "--max-request-bytes", str(BODY_LIMIT)
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def tokenizer(run_dir: Path) -> Tokenizer:
    return load_tokenizer(run_dir / "tokenizer.json")


def complete(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, **fields}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream(client: httpx.Client, **fields: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """(the JSON chunks, the raw data lines) of a streamed completion."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, **fields, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    data = [line.removeprefix("data: ") for line in lines]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]], data


def streamed_texts(chunks: list[dict[str, Any]]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


def health(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/health")
    assert response.status_code == 200
    return response.json()


def wait_for_health(client: httpx.Client, predicate, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = health(client)
        if predicate(state):
            return state
        time.sleep(0.05)
    raise AssertionError(f"server state never matched: {health(client)}")


def assert_error(response: httpx.Response, status: int, *, param=None, code=None, match=""):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert match.lower() in error["message"].lower()
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code


# -- the happy paths -----------------------------------------------------------------------------


def test_health_and_models(client: httpx.Client) -> None:
    assert health(client)["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    [card] = models["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "mllm"
    assert isinstance(card["created"], int)
    assert client.get(f"/v1/models/{MODEL}").json() == card
    assert_error(client.get("/v1/models/gpt-4"), 404, code="model_not_found")


def test_completion_has_the_api_shape(client: httpx.Client, tokenizer: Tokenizer) -> None:
    result = complete(client, max_tokens=6, temperature=0)
    assert result["id"].startswith("cmpl-")
    assert result["object"] == "text_completion"
    assert isinstance(result["created"], int) and result["model"] == MODEL
    [choice] = result["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] == "length"  # the test model never emits end-of-text
    assert choice["text"]
    prompt_tokens = len(tokenizer.encode(PROMPT).ids)
    assert result["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 6,
        "total_tokens": prompt_tokens + 6,
    }


def test_streaming_gives_the_same_text_in_the_chunk_format(client: httpx.Client) -> None:
    whole = complete(client, max_tokens=12, temperature=0)
    chunks, _ = stream(client, max_tokens=12, temperature=0, stream_options={"include_usage": True})
    *text_chunks, usage_chunk = chunks
    ids = {chunk["id"] for chunk in chunks}
    assert len(ids) == 1 and ids.pop().startswith("cmpl-")
    for chunk in text_chunks:
        assert chunk["object"] == "text_completion" and chunk["model"] == MODEL
        assert chunk["usage"] is None
        [choice] = chunk["choices"]
        assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])
    assert streamed_texts(text_chunks) == {0: whole["choices"][0]["text"]}
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]


def test_stream_without_usage_option_has_no_usage_field(client: httpx.Client) -> None:
    chunks, _ = stream(client, max_tokens=3, temperature=0)
    assert all("usage" not in chunk for chunk in chunks)


def test_list_prompts_and_n_give_prompt_major_choices(client: httpx.Client) -> None:
    prompts = [PROMPT, "The fox ran"]
    result = complete(client, prompt=prompts, n=2, seed=11, temperature=1.0, max_tokens=10)
    choices = result["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for i, choice in enumerate(choices):  # choice i: prompt i // n, drawn with seed + i
        alone = complete(
            client, prompt=prompts[i // 2], seed=11 + i, temperature=1.0, max_tokens=10
        )
        assert choice["text"] == alone["choices"][0]["text"]
    streamed = stream(client, prompt=prompts, n=2, seed=11, temperature=1.0, max_tokens=10)[0]
    assert streamed_texts(streamed) == {c["index"]: c["text"] for c in choices}
    assert result["usage"]["completion_tokens"] == 40


def test_seed_makes_sampling_reproducible(client: httpx.Client) -> None:
    first = complete(client, seed=5, temperature=1.5, max_tokens=20)["choices"][0]["text"]
    again = complete(client, seed=5, temperature=1.5, max_tokens=20)["choices"][0]["text"]
    other = complete(client, seed=6, temperature=1.5, max_tokens=20)["choices"][0]["text"]
    assert first == again
    assert first != other


def test_token_id_prompts_equal_text_prompts(client: httpx.Client, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(PROMPT).ids
    text = complete(client, temperature=0)["choices"][0]["text"]
    assert complete(client, prompt=ids, temperature=0)["choices"][0]["text"] == text
    assert complete(client, prompt=[ids], temperature=0)["choices"][0]["text"] == text


def test_stop_strings_cut_the_text(client: httpx.Client) -> None:
    fields = {"seed": 3, "temperature": 1.2, "max_tokens": 30}
    full = complete(client, **fields)["choices"][0]["text"]
    start = next(i for i in range(2, len(full) - 2) if full.index(full[i : i + 2]) == i)
    stop = full[start : start + 2]  # first occurs at `start`
    for stops in (stop, ["\x00never", stop]):
        [choice] = complete(client, stop=stops, **fields)["choices"]
        assert choice["text"] == full[:start]
        assert choice["finish_reason"] == "stop"
    chunks, _ = stream(client, stop=stop, **fields)
    assert streamed_texts(chunks) == {0: full[:start]}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_default_max_tokens_is_16_or_what_the_context_leaves(
    client: httpx.Client, tokenizer: Tokenizer
) -> None:
    body = {"model": MODEL, "prompt": PROMPT}
    assert client.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 16
    ids = tokenizer.encode(PROMPT).ids
    long_prompt = (ids * CONTEXT)[: CONTEXT - 3]
    usage = client.post("/v1/completions", json={**body, "prompt": long_prompt}).json()["usage"]
    assert usage["completion_tokens"] == 3


def test_concurrent_clients_get_what_they_get_alone(client: httpx.Client, server) -> None:
    requests = [
        {"prompt": PROMPT, "temperature": 0, "max_tokens": 40},
        {"prompt": "The fox", "temperature": 0, "max_tokens": 25},
        {"prompt": "Every morning the fox ran to the water", "seed": 1, "max_tokens": 30},
        {"prompt": "A", "seed": 2, "temperature": 0.7, "top_p": 0.9, "max_tokens": 35},
        {"prompt": ["one", "two"], "n": 2, "seed": 3, "max_tokens": 20},
        {"prompt": PROMPT, "seed": 4, "top_k": 5, "max_tokens": 45, "stream": True},
    ]

    def run(fields: dict[str, Any]) -> dict[int, str]:
        if fields.get("stream"):
            return streamed_texts(stream(client, **fields)[0])
        return {c["index"]: c["text"] for c in complete(client, **fields)["choices"]}

    alone = [run(fields) for fields in requests]
    together: list[dict[int, str] | None] = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def worker(i: int) -> None:
        barrier.wait()
        together[i] = run(requests[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert together == alone


# -- disconnects -----------------------------------------------------------------------------------


def test_client_leaving_mid_stream_frees_its_row(client: httpx.Client) -> None:
    before = wait_for_health(client, lambda s: s["running"] == 0)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": CONTEXT - 100, "stream": True}
    with (
        httpx.Client(base_url=client.base_url, timeout=30) as leaving,
        leaving.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert next(response.iter_lines()).startswith("data: ")
    # The stream was closed after one chunk: the server stops decoding it and frees the row.
    after = wait_for_health(client, lambda s: s["running"] == 0 and s["waiting"] == 0)
    assert after["cancelled"] == before["cancelled"] + 1
    assert complete(client, max_tokens=4)["usage"]["completion_tokens"] == 4


def test_client_leaving_a_plain_request_cancels_it(server: ServerProcess, client) -> None:
    before = wait_for_health(client, lambda s: s["running"] == 0)
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": CONTEXT - 100}).encode()
    with raw_connection(server.url) as sock:
        sock.sendall(request_head(server.url, len(body)) + body)
        wait_for_health(client, lambda s: s["running"] > 0)  # being decoded: now leave
    after = wait_for_health(client, lambda s: s["running"] == 0 and s["waiting"] == 0)
    assert after["cancelled"] == before["cancelled"] + 1
    assert complete(client, max_tokens=4)["usage"]["completion_tokens"] == 4


# -- bad input -------------------------------------------------------------------------------------

DROP = object()  # a field left out of the body
LONG_PROMPT = "the fox ran " * 400  # far more than CONTEXT tokens

BAD_BODIES: list[tuple[str, Any, str | None, str]] = [
    # (case, body, param, words in the message)
    ("no model", {"model": DROP}, "model", "model"),
    ("no prompt", {"prompt": DROP}, "prompt", "prompt"),
    ("prompt is a number", {"prompt": 5}, "prompt", "prompt must be"),
    ("prompt is an object", {"prompt": {"a": 1}}, "prompt", "prompt must be"),
    ("mixed prompt list", {"prompt": [1, "a"]}, "prompt", "prompt must be"),
    ("empty prompt", {"prompt": ""}, "prompt", "empty"),
    ("empty prompt list", {"prompt": []}, "prompt", "empty"),
    ("empty string in list", {"prompt": ["a", ""]}, "prompt", "empty"),
    ("empty token list", {"prompt": [[1], []]}, "prompt", "empty"),
    ("token id out of range", {"prompt": [1, 10**6]}, "prompt", "outside the vocabulary"),
    ("negative token id", {"prompt": [-1]}, "prompt", "outside the vocabulary"),
    ("max_tokens is a string", {"max_tokens": "5"}, "max_tokens", "integer"),
    ("max_tokens is a float", {"max_tokens": 5.5}, "max_tokens", "integer"),
    ("negative max_tokens", {"max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
    ("max_tokens beyond context", {"max_tokens": CONTEXT + 1}, "max_tokens", "context length"),
    ("prompt beyond context", {"prompt": LONG_PROMPT}, "prompt", "context length"),
    ("negative temperature", {"temperature": -0.5}, "temperature", "greater than"),
    ("temperature above 2", {"temperature": 2.5}, "temperature", "less than"),
    ("temperature is text", {"temperature": "hot"}, "temperature", "number"),
    ("temperature is a bool", {"temperature": True}, "temperature", "number"),
    ("top_p zero", {"top_p": 0}, "top_p", "greater than 0"),
    ("top_p above one", {"top_p": 1.5}, "top_p", "less than"),
    ("negative top_k", {"top_k": -1}, "top_k", "greater than"),
    ("n zero", {"n": 0}, "n", "greater than"),
    ("n too large", {"n": 1000}, "n", "less than"),
    ("too many choices", {"prompt": ["a"] * 20, "n": 10}, "n", "at most"),
    ("stream is text", {"stream": "yes"}, "stream", "boolean"),
    ("stop is a number", {"stop": 3}, "stop", ""),
    ("empty stop string", {"stop": ""}, "stop", "empty"),
    ("five stop strings", {"stop": list("abcde")}, "stop", "at most 4"),
    ("seed is text", {"seed": "x"}, "seed", "integer"),
    ("unknown field", {"frobnicate": 1}, "frobnicate", "unrecognized"),
    ("logprobs above 5", {"logprobs": 6}, "logprobs", "less than or equal to 5"),
    ("negative logprobs", {"logprobs": -1}, "logprobs", "greater than or equal to 0"),
    (
        "echo beyond context",
        {"echo": True, "max_tokens": 0, "prompt": LONG_PROMPT},
        "prompt",
        "context",
    ),
    ("best_of above n", {"best_of": 3}, "best_of", "not supported"),
    ("suffix", {"suffix": "the end"}, "suffix", "not supported"),
    ("logit_bias", {"logit_bias": {"5": 10}}, "logit_bias", "not supported"),
    ("presence_penalty", {"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ("frequency_penalty", {"frequency_penalty": -1}, "frequency_penalty", "not supported"),
    (
        "stream_options without stream",
        {"stream_options": {"include_usage": True}},
        "stream_options",
        "stream",
    ),
]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [case[1:] for case in BAD_BODIES],
    ids=[case[0] for case in BAD_BODIES],
)
def test_bad_fields_are_400_in_the_api_error_shape(client, body, param, words) -> None:
    full = {"model": MODEL, "prompt": PROMPT, **body}
    full = {key: value for key, value in full.items() if value is not DROP}
    assert_error(client.post("/v1/completions", json=full), 400, param=param, match=words)
    assert health(client)["status"] == "ok"


def test_fields_at_their_off_values_are_accepted(client: httpx.Client) -> None:
    result = complete(
        client,
        logprobs=None,
        echo=False,
        best_of=1,
        suffix=None,
        logit_bias={},
        presence_penalty=0,
        frequency_penalty=0.0,
        user="someone",
        temperature=None,
        top_p=None,
        n=None,
        stop=None,
    )
    assert result["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'{"model": "tiny-run", "prompt": "x"', "not valid json"),
        (b"\xff\xfe not utf-8", "not valid json"),
        (b"[1, 2]", "json object"),
        (b'"just a string"', "json object"),
        (b"", "empty"),
    ],
    ids=["truncated", "not utf-8", "array", "string", "empty"],
)
def test_malformed_bodies_are_400(client: httpx.Client, content: bytes, words: str) -> None:
    response = client.post(
        "/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    assert_error(response, 400, code="invalid_json", match=words)


def test_unknown_model_is_404_model_not_found(client: httpx.Client) -> None:
    response = client.post("/v1/completions", json={"model": "gpt-4", "prompt": PROMPT})
    assert_error(response, 404, param="model", code="model_not_found", match="gpt-4")


def test_unknown_routes_and_methods_use_the_error_shape(client: httpx.Client) -> None:
    assert_error(client.get("/v1/nothing"), 404, code="not_found")
    assert_error(client.get("/v1/completions"), 405, code="method_not_allowed")


def raw_connection(url: str) -> socket.socket:
    parts = urlparse(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    return sock


def request_head(url: str, length: int | None) -> bytes:
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST /v1/completions HTTP/1.1\r\nHost: {urlparse(url).netloc}\r\n"
        f"Content-Type: application/json\r\n{size}\r\n\r\n"
    ).encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_huge_declared_body_is_413_before_it_is_sent(server: ServerProcess, client) -> None:
    with raw_connection(server.url) as sock:
        sock.sendall(request_head(server.url, 50 * 2**20) + b'{"model": ')
        status, body = read_response(sock)  # answered with 50 MiB still unsent
    assert status == 413
    assert body["error"]["code"] == "request_too_large"
    assert health(client)["status"] == "ok"


def test_chunked_body_is_cut_at_the_limit_with_413(server: ServerProcess, client) -> None:
    piece = b"x" * 8192
    with raw_connection(server.url) as sock:
        sock.sendall(request_head(server.url, None))
        for _ in range(BODY_LIMIT // len(piece) + 1):  # one piece more than the limit
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        status, body = read_response(sock)
    assert status == 413
    assert "limit" in body["error"]["message"]
    assert complete(client, max_tokens=2)["usage"]["completion_tokens"] == 2


def test_megabyte_body_through_a_client_is_413(client: httpx.Client) -> None:
    big = {"model": MODEL, "prompt": "word " * 400_000}
    try:
        response = client.post("/v1/completions", json=big)
    except httpx.TransportError:  # the server may close before the client finishes sending
        pass
    else:
        assert_error(response, 413, code="request_too_large")
    assert health(client)["status"] == "ok"


# -- whatever the body, the server answers 200 or a clean 4xx and keeps serving ------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 600) | st.floats(-3, 3) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
fields = st.sampled_from(
    [
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "n",
        "stop",
        "seed",
        "stream",
        "logprobs",
        "echo",
        "best_of",
        "user",
        "stream_options",
    ]
)
bodies = st.dictionaries(fields, json_values, max_size=6).map(
    lambda body: {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **body}
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies)
def test_any_body_gets_200_or_a_clean_4xx(client: httpx.Client, body: dict[str, Any]) -> None:
    response = client.post("/v1/completions", json=body)
    if response.status_code == 200:
        if body.get("stream") is True:
            assert response.text.rstrip().endswith("data: [DONE]")
        else:
            assert response.json()["object"] == "text_completion"
    else:
        assert 400 <= response.status_code < 500, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_fastapi_validation_errors_become_400_in_the_api_shape() -> None:
    """No route of ours lets FastAPI validate (bodies are parsed by hand, to cap their size),
    but any that did would answer 400 in the API's shape, not FastAPI's 422."""
    from fastapi.testclient import TestClient

    from mllm.serve.app import ServedModel, create_app

    served = ServedModel(
        name=MODEL, created=0, context=CONTEXT, vocab_size=10, tokenizer=None, engine=None
    )
    app = create_app(served)

    @app.get("/probe")
    async def probe(count: int) -> dict[str, int]:
        return {"count": count}

    with TestClient(app) as test_client:
        assert test_client.get("/probe", params={"count": 3}).json() == {"count": 3}
        response = test_client.get("/probe", params={"count": "three"})
    assert_error(response, 400, param="query.count", match="integer")


def test_a_full_waiting_queue_is_503_with_retry_after(run_dir: Path) -> None:
    """Overload is refused at once, in the API's error shape, instead of queueing without bound.
    The engine is not started here, so what waits stays waiting."""
    from fastapi.testclient import TestClient

    from mllm.config import ServeConfig
    from mllm.sampling import SamplingParams
    from mllm.serve.app import create_app, load_served_model
    from mllm.serve.engine import Completion
    from mllm.train.checkpoint import find_checkpoint

    config = ServeConfig(run_dir=run_dir, max_waiting=1)
    served = load_served_model(config, find_checkpoint(run_dir, None))
    served.engine.submit([Completion([1, 2], 4, SamplingParams(0.0), lambda event: None)])
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4}
    with TestClient(create_app(served)) as test_client:
        response = test_client.post("/v1/completions", json=body)
    assert_error(response, 503, code="server_overloaded", match="--max-waiting 1")
    assert response.headers["Retry-After"] == "1"
