"""`logprobs` and `echo` in `mllm serve`, over real HTTP (httpx against a server subprocess):
the API's shape, the numbers against the model's own scoring (`GPT.token_nll`, what `mllm eval`
sums), the request lm-eval's `local-completions` sends, the refusals, and what /openapi.json
documents."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from tokenizers import Tokenizer

from fixtures import TEXTS, ServerProcess, tiny_model, train_tiny_tokenizer, write_run
from mllm.data.tokenizer import EOT, load_tokenizer
from mllm.model import GPT
from mllm.sampling import SamplingParams
from mllm.serve import engine as engine_module
from mllm.serve.engine import Completion, Engine, Finished, TextDelta
from mllm.serve.logprobs import TokenTable
from mllm.train.checkpoint import find_checkpoint, load_checkpoint

CONTEXT = 128
MODEL = "scored"
EOT_MODEL = "always-eot"
PROMPT = "Once upon a time there was a little fox"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: Path) -> Tokenizer:
    return load_tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer, tokenizer_path) -> Path:
    """Peaked next-token distributions (so greedy text varies and logprobs differ a lot between
    positions: an off-by-one would show), end-of-text never chosen."""
    run = Path(tmp_path_factory.mktemp("logprobs")) / MODEL
    eot_id = tokenizer.token_to_id(EOT)
    model = tiny_model(
        tokenizer.get_vocab_size(), context=CONTEXT, heads=2, weights="never_eot", eot_id=eot_id
    )
    write_run(run, model, tokenizer_path)
    return run


@pytest.fixture(scope="module")
def eot_run_dir(tmp_path_factory, tokenizer: Tokenizer, tokenizer_path: Path) -> Path:
    """A model whose likeliest next token is always end-of-text: with the final LayerNorm's bias
    b everywhere and EOT's embedding c everywhere, EOT's logit is c·b·d_model whatever the
    input (the normalised part sums to zero), far above the others' (N(0, 0.02) embeddings)."""
    run = Path(tmp_path_factory.mktemp("eot")) / EOT_MODEL
    model = tiny_model(tokenizer.get_vocab_size(), context=CONTEXT, heads=2)
    with torch.no_grad():
        model.ln_final.bias.fill_(1.0)
        model.token_embedding.weight[tokenizer.token_to_id(EOT)] = 1.0
    write_run(run, model, tokenizer_path)
    return run


def serve(run_dir: Path) -> ServerProcess:
    return ServerProcess(run_dir, "--device", "cpu", "--dtype", "fp32", "--max-batch-size", "4")


@pytest.fixture(scope="module")
def client(run_dir: Path) -> Iterator[httpx.Client]:
    with serve(run_dir) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        yield http
        assert "Traceback" not in server.log()


@pytest.fixture(scope="module")
def eot_client(eot_run_dir: Path) -> Iterator[httpx.Client]:
    with serve(eot_run_dir) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Token string (as the API writes it) -> id; every token has its own string."""
    strings = TokenTable.of(tokenizer, tokenizer.get_vocab_size()).strings
    assert len(set(strings)) == len(strings)
    return {string: i for i, string in enumerate(strings)}


@pytest.fixture(scope="module")
def model(run_dir: Path) -> GPT:
    """The served checkpoint, loaded as `mllm eval --dtype fp32` loads it."""
    return load_checkpoint(find_checkpoint(run_dir, None), "cpu", torch.float32).model


def complete(client: httpx.Client, model: str = MODEL, **fields: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, **fields}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def eval_logprobs(model: GPT, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, as `mllm eval` scores them (GPT.token_nll, negated)."""
    x = torch.tensor([ids[:-1]])
    y = torch.tensor([ids[1:]])
    with torch.no_grad():
        return (-model.token_nll(x, y)).tolist()


def full_forward_logprobs(model: GPT, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) fp32 log_softmax of one full forward."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def max_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


# -- the numbers ---------------------------------------------------------------------------------


def test_echoed_prompt_logprobs_equal_eval_per_token_nll(client, model, tokenizer) -> None:
    """Scoring only (max_tokens 0): the prompt's logprobs are eval's per-token losses, negated."""
    text = " ".join(TEXTS[:8])
    ids = tokenizer.encode(text).ids[:CONTEXT]
    assert len(ids) == CONTEXT  # a whole context window, as eval scores it
    result = complete(client, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    [choice] = result["choices"]
    logprobs = choice["logprobs"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    api = logprobs["token_logprobs"][1:]
    difference = max_difference(api, eval_logprobs(model, ids))
    print(f"max |API logprob + eval NLL| over {len(api)} tokens: {difference:.2e}")
    assert difference < TOLERANCE
    forward = full_forward_logprobs(model, ids)
    expected = forward[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    assert max_difference(api, expected) < TOLERANCE
    assert choice["text"] == tokenizer.decode(ids)
    assert choice["finish_reason"] == "length"
    assert result["usage"] == {
        "prompt_tokens": CONTEXT,
        "completion_tokens": 0,
        "total_tokens": 128,
    }


def test_generated_logprobs_equal_scoring_the_whole_text(client, model, token_ids) -> None:
    """Each sampled token's logprob (from the decode step's logits) is what a full forward over
    prompt + completion gives it, and so what echo-scoring that text through the API gives."""
    fields = {"seed": 7, "temperature": 1.3, "max_tokens": 20, "logprobs": 3}
    first = complete(client, echo=True, **fields)["choices"][0]["logprobs"]
    ids = [token_ids[token] for token in first["tokens"]]
    forward = full_forward_logprobs(model, ids)
    expected = forward[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    assert max_difference(first["token_logprobs"][1:], expected) < TOLERANCE
    rescored = complete(client, prompt=ids, max_tokens=0, echo=True, logprobs=3)
    assert (
        max_difference(
            rescored["choices"][0]["logprobs"]["token_logprobs"][1:], first["token_logprobs"][1:]
        )
        < TOLERANCE
    )


# -- the shape -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 5])
def test_logprobs_have_the_api_shape(client: httpx.Client, k: int) -> None:
    result = complete(client, temperature=0, max_tokens=10, logprobs=k)
    [choice] = result["choices"]
    logprobs = choice["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    count = result["usage"]["completion_tokens"]
    assert all(len(logprobs[key]) == count for key in logprobs)
    for token, logprob, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        assert logprob <= 0
        assert top[token] == logprob  # the chosen token is always there
        assert logprob == max(top.values())  # greedy: it is the likeliest (lm-eval's is_greedy)
        assert len(top) == max(k, 1)  # the k likeliest; at k = 0 the chosen one alone
        assert list(top.values()) == sorted(top.values(), reverse=True)
    assert_offsets_fit_the_text(choice["text"], logprobs)


def test_top_logprobs_add_the_chosen_token_when_it_is_not_among_them(client) -> None:
    fields = {"temperature": 2.0, "seed": 3, "max_tokens": 40, "logprobs": 1}
    logprobs = complete(client, **fields)["choices"][0]["logprobs"]
    sizes = {len(top) for top in logprobs["top_logprobs"]}
    assert sizes == {1, 2}  # hot sampling picks a token outside the top 1 now and then
    for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True):
        likeliest = next(iter(top))
        assert top[token] <= top[likeliest]
        if len(top) == 2:
            assert list(top)[1] == token


def assert_offsets_fit_the_text(text: str, logprobs: dict[str, Any], start: int = 0) -> None:
    """Each token's text starts at its offset; offsets grow by the token's characters."""
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and (not offsets or offsets[0] == start)
    for token, offset in zip(logprobs["tokens"], offsets, strict=True):
        if not token.startswith("bytes:") and token != EOT:
            assert text[offset : offset + len(token)] == token, (text, token, offset)


def test_echo_puts_the_prompt_first(client: httpx.Client, tokenizer: Tokenizer) -> None:
    plain = complete(client, temperature=0, max_tokens=6)["choices"][0]
    result = complete(client, temperature=0, max_tokens=6, echo=True, logprobs=2)
    [choice] = result["choices"]
    assert choice["text"] == PROMPT + plain["text"]
    logprobs = choice["logprobs"]
    prompt_tokens = len(tokenizer.encode(PROMPT).ids)
    assert len(logprobs["tokens"]) == prompt_tokens + result["usage"]["completion_tokens"]
    assert "".join(logprobs["tokens"][:prompt_tokens]) == PROMPT
    assert logprobs["text_offset"][prompt_tokens] == len(PROMPT)
    assert all(top is not None for top in logprobs["top_logprobs"][1:])
    assert_offsets_fit_the_text(choice["text"], logprobs)
    echo_only = complete(client, temperature=0, max_tokens=6, echo=True)["choices"][0]
    assert echo_only["text"] == choice["text"] and echo_only["logprobs"] is None


def test_echo_with_list_prompts_and_n(client: httpx.Client, tokenizer: Tokenizer) -> None:
    prompts = [PROMPT, "The fox ran"]
    result = complete(client, prompt=prompts, n=2, seed=1, max_tokens=5, echo=True, logprobs=1)
    choices = result["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for i, choice in enumerate(choices):
        prompt = prompts[i // 2]
        assert choice["text"].startswith(prompt)
        prompt_len = len(tokenizer.encode(prompt).ids)
        assert len(choice["logprobs"]["tokens"]) == prompt_len + 5
    first, second = choices[0]["logprobs"], choices[1]["logprobs"]
    n = len(tokenizer.encode(PROMPT).ids)
    assert first["token_logprobs"][:n] == second["token_logprobs"][:n]  # one scoring per prompt


def test_streamed_logprobs_join_to_the_whole(client: httpx.Client) -> None:
    fields = {"seed": 5, "temperature": 1.0, "max_tokens": 12, "logprobs": 2, "echo": True}
    whole = complete(client, **fields)["choices"][0]
    body = {"model": MODEL, "prompt": PROMPT, **fields, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line)["choices"][0] for line in lines[:-1]]
    assert chunks[0]["text"].startswith(PROMPT)  # the echo comes first
    joined: dict[str, list[Any]] = {key: [] for key in whole["logprobs"]}
    for chunk in chunks:
        for key, values in chunk["logprobs"].items():
            joined[key] += values
    assert joined == whole["logprobs"]
    assert "".join(chunk["text"] for chunk in chunks) == whole["text"]


def test_max_tokens_zero_without_echo_is_an_empty_completion(client: httpx.Client) -> None:
    [choice] = complete(client, max_tokens=0, logprobs=1)["choices"]
    assert choice["text"] == "" and choice["finish_reason"] == "length"
    assert choice["logprobs"] == {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }


def test_single_token_prompt_scores_to_one_null(client: httpx.Client) -> None:
    [choice] = complete(client, prompt=[5], max_tokens=0, echo=True, logprobs=2)["choices"]
    assert choice["logprobs"]["token_logprobs"] == [None]
    assert choice["logprobs"]["top_logprobs"] == [None]
    assert choice["logprobs"]["text_offset"] == [0]


# -- lm-eval's local-completions -----------------------------------------------------------------


def lm_eval_parse_logprobs(choice: dict[str, Any], ctxlen: int) -> tuple[float, bool]:
    """What lm-eval's LocalCompletionsAPI.parse_logprobs does with one choice: it drops the last
    entry as the generated token, whatever that token was."""
    token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    pairs = zip(token_logprobs, top_logprobs, strict=True)
    greedy = all(tok == max(top.values()) for tok, top in pairs)
    return sum(token_logprobs), greedy


def test_lm_eval_loglikelihood_request_when_end_of_text_comes_next(
    eot_client: httpx.Client, tokenizer: Tokenizer, eot_run_dir: Path
) -> None:
    contexts = ["The fox liked to", "She was"]
    continuations = [" run", " happy."]
    prompts = [
        tokenizer.encode(c).ids + tokenizer.encode(x).ids
        for c, x in zip(contexts, continuations, strict=True)
    ]
    body = {
        "model": EOT_MODEL,
        "prompt": prompts,
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    response = eot_client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["usage"]["completion_tokens"] == 2
    scorer = load_checkpoint(find_checkpoint(eot_run_dir, None), "cpu", torch.float32).model
    for choice, prompt, context in zip(result["choices"], prompts, contexts, strict=True):
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(prompt) + 1
        assert logprobs["tokens"][-1] == EOT  # listed, though it adds no text
        assert choice["finish_reason"] == "stop"
        assert choice["text"] == tokenizer.decode(prompt)
        ctxlen = len(tokenizer.encode(context).ids)
        total, greedy = lm_eval_parse_logprobs(choice, ctxlen)
        expected = sum(eval_logprobs(scorer, prompt)[ctxlen - 1 :])
        assert math.isclose(total, expected, abs_tol=TOLERANCE)
        assert not greedy  # end-of-text, not the continuation, is the likeliest


def test_lm_eval_generation_request(eot_client: httpx.Client, client: httpx.Client) -> None:
    body = {
        "prompt": ["Once upon a time", "The fox"],
        "model": MODEL,
        "max_tokens": 8,
        "temperature": 0,
        "stop": ["\n\n", "Question:", EOT],
        "seed": 1234,
    }
    result = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in result["choices"]] == [0, 1]
    body["model"] = EOT_MODEL
    result = eot_client.post("/v1/completions", json=body).json()
    assert [c["text"] for c in result["choices"]] == ["", ""]
    assert [c["finish_reason"] for c in result["choices"]] == ["stop", "stop"]


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"logprobs": 6}, "logprobs", "less than or equal to 5"),
        ({"logprobs": -1}, "logprobs", "greater than or equal to 0"),
        ({"logprobs": "1"}, "logprobs", "integer"),
        ({"logprobs": True}, "logprobs", "integer"),
        ({"echo": "yes"}, "echo", "boolean"),
        ({"max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
        (
            {"echo": True, "logprobs": 1, "max_tokens": 0, "prompt": [1] * (CONTEXT + 1)},
            "prompt",
            "maximum context length",
        ),
        (
            {"echo": True, "logprobs": 1, "max_tokens": 1, "prompt": [1] * CONTEXT},
            "prompt",
            "maximum context length",
        ),
        ({"echo": True, "logprobs": 1, "prompt": [1, 10**6]}, "prompt", "outside the vocabulary"),
        ({"echo": True, "logprobs": 1, "prompt": [[1], [-3]]}, "prompt", "outside the vocabulary"),
    ],
    ids=[
        "logprobs 6",
        "logprobs -1",
        "logprobs text",
        "logprobs bool",
        "echo text",
        "max_tokens -1",
        "echo beyond the context",
        "echo filling the context plus one token",
        "id beyond the vocab",
        "negative id",
    ],
)
def test_bad_values_are_400_and_the_server_keeps_serving(client, fields, param, words) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **fields}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]
    assert complete(client, max_tokens=2, logprobs=1)["usage"]["completion_tokens"] == 2


# -- /openapi.json -------------------------------------------------------------------------------

# What each route can answer (an unknown path's 404 and a wrong method's 405 belong to no route).
ANSWERS = {
    ("post", "/v1/completions"): {"200", "400", "404", "413", "499", "500", "503"},
    ("get", "/v1/models"): {"200"},
    ("get", "/v1/models/{model_id}"): {"200", "404"},
    ("get", "/health"): {"200"},
}


def test_openapi_documents_the_body_and_every_answer(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    documented = {
        (method, path): set(operation["responses"])
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    }
    assert documented == ANSWERS
    schemas = document["components"]["schemas"]
    completions = document["paths"]["/v1/completions"]["post"]
    body = completions["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CompletionRequest"
    }
    request = schemas["CompletionRequest"]
    assert request["additionalProperties"] is False
    assert set(request["required"]) == {"model", "prompt"}
    logprobs = request["properties"]["logprobs"]["anyOf"][0]
    assert (logprobs["minimum"], logprobs["maximum"]) == (0, 5)
    assert request["properties"]["max_tokens"]["anyOf"][0]["minimum"] == 0
    assert request["properties"]["stream_options"]["anyOf"][0]["$ref"].endswith("StreamOptions")
    assert "StreamOptions" in schemas and "ValidationError" not in schemas
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for (method, path), codes in ANSWERS.items():
        responses = document["paths"][path][method]["responses"]
        for code in codes - {"200", "499"}:
            assert responses[code]["content"]["application/json"]["schema"] == error_ref
    ok = completions["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/CompletionResponse"}
    assert "text/event-stream" in ok
    assert "Retry-After" in completions["responses"]["503"]["headers"]
    choice = schemas["CompletionChoice"]["properties"]["logprobs"]["anyOf"][0]
    assert choice == {"$ref": "#/components/schemas/CompletionLogprobs"}


# -- what logprobs cost the engine ---------------------------------------------------------------


def test_only_rows_that_ask_pay_for_logprobs(tokenizer: Tokenizer, monkeypatch) -> None:
    """No log_softmax or top-k for rows without logprobs (even beside rows with them); no extra
    forward for generated tokens' logprobs; one full forward more for echo's prompt scoring."""
    eot_id = tokenizer.token_to_id(EOT)
    model = tiny_model(
        tokenizer.get_vocab_size(), context=64, heads=2, weights="never_eot", eot_id=eot_id
    )
    scored_rows: list[int] = []
    real_token_logprobs = engine_module.token_logprobs

    def counting(logits, tokens, ks):
        scored_rows.append(len(ks))
        return real_token_logprobs(logits, tokens, ks)

    monkeypatch.setattr(engine_module, "token_logprobs", counting)
    forwards = 0
    real_hidden_states = model.hidden_states

    def counting_forward(*args, **kwargs):
        nonlocal forwards
        forwards += 1
        return real_hidden_states(*args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", counting_forward)
    engine = Engine(model, TokenTable.of(tokenizer, model.config.vocab_size).text_bytes, eot_id, 4)
    engine.start()
    prompt = tokenizer.encode(PROMPT).ids

    def run(**fields: Any) -> list[Any]:
        events: list[Any] = []
        done = threading.Event()

        def record(event: Any) -> None:
            events.append(event)
            if isinstance(event, Finished):
                done.set()

        engine.submit([Completion(prompt, 6, SamplingParams(0.0), record, **fields)])
        assert done.wait(30)
        return events

    try:
        plain = run()
        assert scored_rows == [] and forwards == 6  # a prefill and 5 decode steps
        forwards = 0
        with_logprobs = run(logprobs=2)
        assert forwards == 6 and scored_rows == [1] * 6
        # each token's logprobs come with its text, in one event; the texts are those of `plain`
        deltas = [e for e in with_logprobs if isinstance(e, TextDelta)]
        assert sum(len(e.logprobs) for e in deltas) == 6
        texts = [e.text for e in plain if isinstance(e, TextDelta)]
        assert [e.text for e in deltas if e.text] == texts
        assert [e for e in with_logprobs if not isinstance(e, TextDelta)] == [
            e for e in plain if not isinstance(e, TextDelta)
        ]
        forwards, scored_rows[:] = 0, []
        run(logprobs=2, score_prompt=True)
        assert forwards == 7  # the prompt's full forward, once
        # A row without logprobs beside one with them: only the one that asks is scored.
        scored_rows[:] = []
        events: list[list[Any]] = [[], []]
        done = [threading.Event(), threading.Event()]

        def recorder(i: int):
            def record(event: Any) -> None:
                events[i].append(event)
                if isinstance(event, Finished):
                    done[i].set()

            return record

        engine.submit(
            [
                Completion(prompt, 6, SamplingParams(0.0), recorder(0), logprobs=1),
                Completion(prompt, 6, SamplingParams(0.0), recorder(1)),
            ]
        )
        assert done[0].wait(30) and done[1].wait(30)
        assert set(scored_rows) == {1}
        assert not any(isinstance(e, TextDelta) and e.logprobs for e in events[1])
    finally:
        engine.stop()
