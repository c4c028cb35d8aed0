"""The continuous-batching engine: batched decoding gives what decoding alone gives."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch
from tokenizers import Tokenizer

from fixtures import tiny_model, train_tiny_tokenizer
from mllm.data.tokenizer import EOT, load_tokenizer
from mllm.model import GPT
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
from mllm.textstream import TextStream, token_byte_table

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = ["Once upon a time", "The fox", "Every morning the fox ran to the water to drink", "A"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return load_tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


@pytest.fixture(scope="module")
def model(tokenizer: Tokenizer) -> GPT:
    vocab_size, eot_id = tokenizer.get_vocab_size(), tokenizer.token_to_id(EOT)
    return tiny_model(vocab_size, context=64, heads=2, weights="never_eot", eot_id=eot_id)


def make_engine(model: GPT, tokenizer: Tokenizer, max_batch_size: int, eot: int | None = None):
    eot_id = tokenizer.token_to_id(EOT) if eot is None else eot
    return Engine(model, token_byte_table(tokenizer), eot_id, max_batch_size)


@pytest.fixture
def engine_factory(model: GPT, tokenizer: Tokenizer) -> Iterator:
    engines: list[Engine] = []

    def factory(max_batch_size: int = 4, eot: int | None = None) -> Engine:
        engine = make_engine(model, tokenizer, max_batch_size, eot)
        engine.start()
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        engine.stop()


@dataclass
class Outcome:
    events: list[Event] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDelta))

    @property
    def end(self) -> Event:
        return self.events[-1]

    def record(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, Finished | Failed):
            self.done.set()


def sequence(
    tokenizer: Tokenizer,
    prompt: str,
    max_tokens: int = 12,
    params: SamplingParams = GREEDY,
    **kwargs,
) -> tuple[Completion, Outcome]:
    outcome = Outcome()
    ids = tokenizer.encode(prompt).ids
    return Completion(ids, max_tokens, params, outcome.record, **kwargs), outcome


def run(engine: Engine, pairs: list[tuple[Completion, Outcome]]) -> list[Outcome]:
    engine.submit([seq for seq, _ in pairs])
    for _, outcome in pairs:
        assert outcome.done.wait(30), "sequence did not finish"
    return [outcome for _, outcome in pairs]


def wait_until(predicate, timeout: float = 10.0) -> bool:
    """Poll `predicate` until it holds (the engine updates its counters after each step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def reference_greedy(model: GPT, tokenizer: Tokenizer, prompt: str, max_tokens: int) -> str:
    """Greedy decoding with full forward passes and no cache: the independent oracle."""
    ids = tokenizer.encode(prompt).ids
    stream = TextStream(token_byte_table(tokenizer))
    text = []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(token)
            text.append(stream.push(token))
    return "".join(text) + stream.finish()


def test_batched_greedy_equals_uncached_reference(engine_factory, model, tokenizer) -> None:
    engine = engine_factory(max_batch_size=4)
    outcomes = run(engine, [sequence(tokenizer, p, max_tokens=10) for p in PROMPTS])
    for prompt, outcome in zip(PROMPTS, outcomes, strict=True):
        assert outcome.text == reference_greedy(model, tokenizer, prompt, 10)
        assert outcome.end == Finished("length", 10)
    assert wait_until(lambda: engine.stats.running == 0)
    assert engine.stats.rows_decoded > engine.stats.steps  # rows really shared steps


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(engine_factory, tokenizer) -> None:
    params = [SamplingParams(1.0), SamplingParams(0.7, top_k=20), SamplingParams(1.2, top_p=0.8)]
    alone_engine = engine_factory(max_batch_size=1)
    alone = [
        run(alone_engine, [sequence(tokenizer, p, 15, params[i % 3], seed=i)])[0].text
        for i, p in enumerate(PROMPTS)
    ]
    batch_engine = engine_factory(max_batch_size=4)
    together = run(
        batch_engine,
        [sequence(tokenizer, p, 15, params[i % 3], seed=i) for i, p in enumerate(PROMPTS)],
    )
    assert [o.text for o in together] == alone


def test_more_sequences_than_rows_wait_their_turn(engine_factory, model, tokenizer) -> None:
    engine = engine_factory(max_batch_size=2)
    prompts = PROMPTS * 2
    lengths = [3, 9, 5, 1, 7, 2, 8, 4]  # rows retire at different steps, later ones move up
    outcomes = run(
        engine,
        [sequence(tokenizer, p, n) for p, n in zip(prompts, lengths, strict=True)],
    )
    for prompt, n, outcome in zip(prompts, lengths, outcomes, strict=True):
        assert outcome.text == reference_greedy(model, tokenizer, prompt, n)
        assert outcome.end == Finished("length", n)


def test_shared_prefill_matches_separate_prefills(engine_factory, tokenizer) -> None:
    engine = engine_factory(max_batch_size=4)
    params = SamplingParams(1.0)
    key = object()
    shared = run(
        engine,
        [sequence(tokenizer, PROMPTS[2], 8, params, seed=s, prompt_key=key) for s in range(3)],
    )
    separate = run(engine, [sequence(tokenizer, PROMPTS[2], 8, params, seed=s) for s in range(3)])
    assert [o.text for o in shared] == [o.text for o in separate]


def test_end_of_text_token_stops_with_reason_stop(engine_factory, model, tokenizer) -> None:
    ids = tokenizer.encode(PROMPTS[0]).ids
    with torch.no_grad():
        first = int(model(torch.tensor([ids]))[0, -1].argmax())
    engine = engine_factory(eot=first)  # pretend the first greedy token is end-of-text
    [outcome] = run(engine, [sequence(tokenizer, PROMPTS[0], 10)])
    assert outcome.end == Finished("stop", 1)
    assert outcome.text == ""


def test_stop_string_ends_the_text_before_it(engine_factory, model, tokenizer) -> None:
    full = reference_greedy(model, tokenizer, PROMPTS[1], 12)
    stop = full[3:5]
    engine = engine_factory()
    [outcome] = run(engine, [sequence(tokenizer, PROMPTS[1], 12, stop=(stop,))])
    assert outcome.text == full[: full.index(stop)]
    assert isinstance(outcome.end, Finished) and outcome.end.reason == "stop"


def test_cancelled_sequence_frees_its_row(engine_factory, tokenizer) -> None:
    engine = engine_factory(max_batch_size=2)
    first_event, resume = threading.Event(), threading.Event()
    long_seq, long_out = sequence(tokenizer, PROMPTS[0], 50)

    def emit(event: Event) -> None:  # holds the engine after the first event until cancelled
        long_out.record(event)
        first_event.set()
        resume.wait(10)

    long_seq.emit = emit
    engine.submit([long_seq])
    assert first_event.wait(10)
    long_seq.cancel()
    resume.set()
    [other] = run(engine, [sequence(tokenizer, PROMPTS[1], 5)])
    assert other.end == Finished("length", 5)
    assert len(long_out.events) == 1  # nothing was sent after the cancel
    assert wait_until(lambda: engine.stats.running == 0)  # updated after the step that ended
    assert engine.stats.sequences_cancelled == 1


def test_a_failing_step_fails_its_rows_and_the_engine_goes_on(model, tokenizer) -> None:
    engine = Engine(model, token_byte_table(tokenizer), None, 2)
    real_step, armed = engine.decoder.step, [True]

    def fail_once(tokens: torch.Tensor, positions: int | torch.Tensor) -> torch.Tensor:
        if armed.pop() if armed else False:
            raise RuntimeError("simulated out of memory")
        return real_step(tokens, positions)

    engine.decoder.step = fail_once  # type: ignore[method-assign]
    engine.start()
    try:
        [failed] = run(engine, [sequence(tokenizer, PROMPTS[0], 5)])
        assert isinstance(failed.end, Failed) and "simulated out of memory" in failed.end.message
        [ok] = run(engine, [sequence(tokenizer, PROMPTS[0], 5)])
        assert ok.end == Finished("length", 5)
    finally:
        engine.stop()


def test_submit_refuses_more_than_the_context(engine_factory, tokenizer) -> None:
    engine = engine_factory()
    seq, _ = sequence(tokenizer, PROMPTS[0], max_tokens=64)
    with pytest.raises(ValueError, match="context"):
        engine.submit([seq])


def test_submit_refuses_new_work_while_max_waiting_sequences_wait(model, tokenizer) -> None:
    engine = Engine(model, token_byte_table(tokenizer), tokenizer.token_to_id(EOT), 1, 2)
    pairs = [sequence(tokenizer, p, max_tokens=3) for p in PROMPTS]
    engine.submit([pairs[0][0]])  # not started: everything waits
    engine.submit([pairs[1][0], pairs[2][0]])  # one waits, under 2: taken whole
    with pytest.raises(QueueFull, match="3 sequences are waiting"):
        engine.submit([pairs[3][0]])
    assert engine.stats.waiting == 3
    engine.start()
    try:
        for _, outcome in pairs[:3]:
            assert outcome.done.wait(30) and outcome.end == Finished("length", 3)
        [late] = run(engine, [pairs[3]])  # the queue drained: taken now
        assert late.end == Finished("length", 3)
    finally:
        engine.stop()


def test_a_sampled_tokens_logprobs_come_with_its_text(model, tokenizer) -> None:
    """One event per sampled token carries both, so a stream's chunk never holds a token's
    logprobs without its text (or the text without them)."""
    engine = Engine(model, token_byte_table(tokenizer), tokenizer.token_to_id(EOT), 2)
    params = SamplingParams(temperature=1.0)
    pairs = [sequence(tokenizer, p, 10, params, seed=3, logprobs=2) for p in PROMPTS[:2]]
    engine.start()
    try:
        outcomes = run(engine, pairs)
    finally:
        engine.stop()
    for outcome in outcomes:
        deltas = [e for e in outcome.events if isinstance(e, TextDelta)]
        assert not any(isinstance(e, Logprobs) for e in outcome.events)  # no prompt scoring asked
        assert sum(len(delta.logprobs) for delta in deltas) == outcome.end.completion_tokens
        assert all(len(delta.logprobs) == 1 for delta in deltas if delta.text)


def test_the_decode_thread_runs_on_its_own_thread_count(model, tokenizer) -> None:
    """`threads` is the decode thread's own CPU thread count (mllm serve keeps its main thread
    at 1 and gives the cores to this one)."""
    before = torch.get_num_threads()
    wanted = before + 1  # differs from what this process has, so the check can fail
    seen: list[int] = []
    engine = Engine(model, token_byte_table(tokenizer), None, 1, threads=wanted)
    completion, outcome = sequence(tokenizer, PROMPTS[0], max_tokens=2)

    def record_threads(event: Event) -> None:  # called on the decode thread
        seen.append(torch.get_num_threads())
        outcome.record(event)

    completion.emit = record_threads
    engine.start()
    try:
        engine.submit([completion])
        assert outcome.done.wait(30) and outcome.end == Finished("length", 2)
    finally:
        engine.stop()
        torch.set_num_threads(before)  # torch's count is also a process-wide default
    assert seen and set(seen) == {wanted}
