"""Continuous batching: one thread decodes every running sequence together, one token per step.

`mllm serve` turns each completion choice into a `Completion` and `submit`s it. The engine's thread
loops:

1. admit waiting sequences while there are free rows: each is prefilled alone (batch 1) straight
   into its row of one shared, preallocated KV cache (sequences with the same prompt, such as the
   `n` choices of one request, share a single prefill), and its first token is sampled;
2. decode one token for all running rows at once, through the same `Decoder` (mllm.decode) that
   `mllm generate` uses: rows hold prompts of different lengths, so each row passes its own
   position (one int when they all agree, as at one client, which is generate's exact path);
3. hand each row's token to its `TextStream` (complete UTF-8 only, stop strings held back), send
   the text that is ready, and retire rows that finished (end-of-text token, stop string,
   max_tokens) or whose client went away (`cancel`).

Rows stay packed at the front of the cache (a retiring row's slot receives the last row), so a
step runs exactly `len(rows)` rows. At batch 1 a CPU decode step is dominated by reading the
weights, so a step of 8 rows costs little more than a step of 1: concurrent requests share it.

A sequence that asks for log-probabilities (`logprobs`: k) gets, per sampled token, its fp32
log-probability and the k likeliest tokens, from the logits it was sampled from (no extra
forward); rows that do not ask pay nothing (no log_softmax, no top-k). With `score_prompt`
(echo), the prompt also runs once through a full forward, whose per-position logits give every
prompt token's log-probability as `mllm eval` computes them; `max_tokens` 0 then only scores.

CPU threads: the decode thread sets its own count (`threads`). With PyTorch's OpenMP, every
thread that runs parallel kernels gets its own team of worker threads, and once the process has
more OpenMP threads than cores, every team's workers stop spinning between kernels and sleep: a
main thread that had run a parallel kernel (loading the model, say) made each decode step of the
bench model at batch 8 take 9.3 ms on 2 cores instead of 3.3. So `mllm serve` keeps its main
thread at 1 thread (no team) and gives the cores to this one (benchmarks/bench_generate.py).

Each row samples with its own torch.Generator, so a seeded sequence draws the same tokens
whatever else is in the batch. Events go back through the `emit` callback each sequence carries
(serve.py hands them to the request's asyncio queue); the engine never blocks on a client.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mllm.decode import Decoder
from mllm.losses import rows_per_chunk
from mllm.model import GPT
from mllm.sampling import SamplingParams, sample_next
from mllm.textstream import TextStream


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its log-probability (fp32, from the model's raw logits) and the likeliest
    tokens at its position, likeliest first, plus the token itself where it is not among them.
    The first token of a prompt has neither (nothing precedes it): None, None."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] | None


@dataclass(frozen=True)
class TextDelta:
    """New text of a sequence, ready to show, with the log-probabilities (when asked) of the
    token that brought it, in one event, so a stream's chunk carries both together. The text
    may be "" (a token whose bytes end inside a character, or that may start a stop string);
    `logprobs` is () when not asked."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The sequence ended: `stop` (end-of-text token or a stop string) or `length` (max_tokens)."""

    reason: str
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """Decoding raised; the sequence is over."""

    message: str


@dataclass(frozen=True)
class Logprobs:
    """Log-probabilities of the prompt's tokens (score_prompt), all in one event, before anything
    else (a sampled token's come with its text: TextDelta.logprobs)."""

    entries: tuple[TokenLogprob, ...]
    prompt: bool = True


Event = TextDelta | Finished | Failed | Logprobs


@dataclass(eq=False)
class Completion:
    """One completion to generate (one choice of one prompt)."""

    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    emit: Callable[[Event], None]  # called on the engine thread; must not block
    seed: int | None = None
    stop: tuple[str, ...] = ()
    prompt_key: object = None  # sequences with the same key have the same prompt: one prefill
    logprobs: int | None = None  # k: each sampled token's logprob and the k likeliest (None: off)
    score_prompt: bool = False  # first send the prompt tokens' logprobs (needs `logprobs`)
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop decoding this sequence (its client left); its row is freed at the next step."""
        self.cancelled = True


@dataclass(eq=False)
class Row:
    """A running sequence and its place in the cache."""

    sequence: Completion
    text: TextStream
    generator: torch.Generator | None
    length: int  # tokens already in this row's cache
    next_token: int = 0  # the token to feed at position `length`
    generated: int = 0
    finished: bool = False


@dataclass
class EngineStats:
    """Counters for /health and the benchmark."""

    steps: int = 0
    rows_decoded: int = 0  # sum of batch sizes over steps
    decode_seconds: float = 0.0  # wall time of those steps (the model and sampling)
    sequences_finished: int = 0
    sequences_cancelled: int = 0
    waiting: int = 0
    running: int = 0


class QueueFull(Exception):
    """`Engine.submit` refused: as many sequences wait as the engine lets wait."""


class Engine:
    """The decode loop thread and its queue of waiting sequences."""

    def __init__(
        self,
        model: GPT,
        token_bytes: Sequence[bytes],
        eot_id: int | None,
        max_batch_size: int,
        max_waiting: int | None = None,
        threads: int | None = None,
    ) -> None:
        self.model = model
        self.threads = threads  # CPU threads of the decode thread (None: as torch has it)
        self.eot_id = eot_id
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting  # None: no limit
        self.context = model.config.context
        self.decoder = Decoder(model, max_batch_size)
        self.device = self.decoder.device
        # Every id the model can produce maps to bytes (ids past the tokenizer's vocab: none).
        vocab = model.token_embedding.num_embeddings
        self.token_bytes = list(token_bytes) + [b""] * max(0, vocab - len(token_bytes))
        self.stats = EngineStats()
        self._rows: list[Row] = []
        self._waiting: deque[Completion] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mllm-decode", daemon=True)

    # -- the API serve.py uses (any thread) ----------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the current step and end the thread; waiting sequences are dropped."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, sequences: Sequence[Completion]) -> None:
        """Queue sequences for decoding (they start as rows free up, in order). Raises QueueFull
        when `max_waiting` sequences already wait: an overloaded server then refuses new work at
        once instead of queueing it without bound (a request is taken whole or not at all, so
        one with more sequences than the limit still gets in when the queue is empty)."""
        for sequence in sequences:
            if len(sequence.prompt_ids) + sequence.max_tokens > self.context:
                raise ValueError("prompt plus max_tokens exceeds the context")
        with self._wakeup:
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} sequences are waiting")
            self._waiting.extend(sequences)
            self.stats.waiting = len(self._waiting)
            self._wakeup.notify()

    # -- the decode thread ---------------------------------------------------------------------

    def _run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # this thread's own OpenMP team (see the top)
        with torch.inference_mode():
            while (admitted := self._wait_for_work()) is not None:
                try:
                    self._admit(admitted)
                    self._retire_rows()  # rows that ended on their first token
                    if self._rows:
                        self._step()
                    self._retire_rows()
                except Exception as error:  # e.g. out of memory: fail what runs, keep serving
                    self._fail(self._rows, error)
                    self._rows.clear()
                    self.stats.running = 0

    def _wait_for_work(self) -> list[Completion] | None:
        """Sleep until there is something to do; the sequences to admit now (None: stop)."""
        with self._wakeup:
            while not (self._stopping or self._waiting or self._rows):
                self._wakeup.wait()
            return None if self._stopping else self._take_waiting()

    def _take_waiting(self) -> list[Completion]:
        free = self.max_batch_size - len(self._rows)
        admitted: list[Completion] = []
        while self._waiting and len(admitted) < free:
            sequence = self._waiting.popleft()
            if sequence.cancelled:
                self.stats.sequences_cancelled += 1
            else:
                admitted.append(sequence)
        self.stats.waiting = len(self._waiting)
        return admitted

    def _fail(self, rows: list[Row], error: Exception) -> None:
        """Decoding raised (e.g. out of memory): end `rows` with the error, keep serving."""
        failed = failure(error)
        for row in rows:
            if not row.finished:
                row.finished = True
                self._send(row.sequence, failed)

    def _admit(self, sequences: list[Completion]) -> None:
        """Prefill each new sequence into the next free row and take its first token (after
        scoring its prompt, if it asks); a sequence with max_tokens 0 ends there, rowless."""
        shared: tuple[object, int, torch.Tensor] | None = None  # (prompt key, slot, logits)
        scored: tuple[object, Logprobs] | None = None  # (prompt key, its prompt's logprobs)
        for sequence in sequences:
            if sequence.score_prompt or sequence.max_tokens == 0:
                try:
                    scored = self._score_prompt(sequence, scored)
                except Exception as error:
                    self._send(sequence, failure(error))
                    continue
                if sequence.max_tokens == 0:
                    self.stats.sequences_finished += 1
                    self._send(sequence, Finished("length", 0))
                    continue
            row = Row(sequence, TextStream(self.token_bytes, sequence.stop), None, 0)
            row.generator = self._generator_for(sequence)
            self._rows.append(row)
            try:
                shared = self._start_row(row, len(self._rows) - 1, shared)
            except Exception as error:
                self._fail([row], error)

    def _score_prompt(
        self, sequence: Completion, scored: tuple[object, Logprobs] | None
    ) -> tuple[object, Logprobs] | None:
        """Send the prompt's logprobs if the sequence asks (reusing those of the same prompt
        scored just before); returns what later sequences may reuse."""
        if not sequence.score_prompt or sequence.logprobs is None:
            return scored
        key = sequence.prompt_key
        if scored is None or key is None or scored[0] is not key:
            scored = (
                key,
                Logprobs(self._prompt_logprobs(sequence.prompt_ids, sequence.logprobs), True),
            )
        self._send(sequence, scored[1])
        return scored

    def _prompt_logprobs(self, prompt: list[int], k: int) -> tuple[TokenLogprob, ...]:
        """Every prompt token's logprob given the tokens before it, from one full forward (no
        cache), as `GPT.token_nll` scores it for `mllm eval`: the head runs a chunk of positions
        at a time, in fp32 after the model's dtype, so the full logits never exist at once."""
        ids = torch.tensor(prompt, dtype=torch.long, device=self.device)
        entries = [TokenLogprob(prompt[0], None, None)]
        if len(prompt) == 1:
            return tuple(entries)
        hidden = self.model.hidden_states(ids[None, :-1])[0]  # position i predicts token i + 1
        step = rows_per_chunk(self.model.head_weight.shape[0])
        for start in range(0, len(prompt) - 1, step):
            logits = self.model.logits(hidden[start : start + step])
            targets = ids[start + 1 : start + 1 + step]
            entries += token_logprobs(logits, targets, [k] * len(targets))
        return tuple(entries)

    def _start_row(
        self, row: Row, slot: int, shared: tuple[object, int, torch.Tensor] | None
    ) -> tuple[object, int, torch.Tensor]:
        """Fill the row's cache with its prompt (copied from a row with the same prompt when this
        admission round has one) and sample its first token; returns what later rows may share."""
        prompt, key = row.sequence.prompt_ids, row.sequence.prompt_key
        if shared is not None and key is not None and shared[0] is key:
            self.decoder.copy_row(shared[1], slot, len(prompt))
            logits = shared[2]
        else:
            logits = self._prefill(prompt, slot)
            shared = (key, slot, logits)
        row.length = len(prompt)
        token = sample_next(logits[None], [row.sequence.params], [row.generator])
        k = row.sequence.logprobs
        entry = None if k is None else token_logprobs(logits[None], token, [k])[0]
        self._accept(row, int(token[0]), entry)
        return shared

    def _prefill(self, prompt: list[int], slot: int) -> torch.Tensor:
        """Run the prompt through the model into cache row `slot`; the last position's logits."""
        tokens = torch.tensor([prompt], dtype=torch.long, device=self.device)
        return self.decoder.prefill(tokens, row=slot)[0]

    def _step(self) -> None:
        """One token for every running row, all rows in one forward pass."""
        started = time.perf_counter()
        rows = self._rows
        tokens = torch.tensor([row.next_token for row in rows], device=self.device)
        lengths = {row.length for row in rows}
        positions = (
            lengths.pop()
            if len(lengths) == 1
            else torch.tensor([row.length for row in rows], device=self.device)
        )
        logits = self.decoder.step(tokens, positions)
        sampled = sample_next(
            logits, [row.sequence.params for row in rows], [row.generator for row in rows]
        )
        entries = self._step_logprobs(logits, sampled)
        next_tokens = sampled.tolist()
        self.stats.steps += 1
        self.stats.rows_decoded += len(rows)
        self.stats.decode_seconds += time.perf_counter() - started
        for i, (row, token) in enumerate(zip(rows, next_tokens, strict=True)):
            row.length += 1
            self._accept(row, token, entries.get(i))

    def _step_logprobs(
        self, logits: torch.Tensor, sampled: torch.Tensor
    ) -> dict[int, TokenLogprob]:
        """The logprobs of the rows that ask for them (row index -> entry); nothing is computed
        when no row asks."""
        wanted = [i for i, row in enumerate(self._rows) if row.sequence.logprobs is not None]
        if not wanted:
            return {}
        ks = [self._rows[i].sequence.logprobs or 0 for i in wanted]
        if len(wanted) < len(self._rows):
            index = torch.tensor(wanted, device=logits.device)
            logits, sampled = logits[index], sampled[index]
        return dict(zip(wanted, token_logprobs(logits, sampled, ks), strict=True))

    def _accept(self, row: Row, token: int, logprob: TokenLogprob | None = None) -> None:
        """A newly sampled token: send its text with its logprobs (if asked), or end the row."""
        entries = () if logprob is None else (logprob,)
        row.generated += 1
        if token == self.eot_id:
            if entries:  # listed, as usage counts it, though it adds no text
                self._send(row.sequence, TextDelta("", entries))
            self._finish(row, "stop")
            return
        text = row.text.push(token)
        if text or entries:
            self._send(row.sequence, TextDelta(text, entries))
        if row.text.stopped:
            self._finish(row, "stop")
        elif row.generated >= row.sequence.max_tokens:
            self._finish(row, "length")
        else:
            row.next_token = token

    def _finish(self, row: Row, reason: str) -> None:
        rest = row.text.finish()
        if rest:
            self._send(row.sequence, TextDelta(rest))
        row.finished = True
        self.stats.sequences_finished += 1
        self._send(row.sequence, Finished(reason, row.generated))

    def _send(self, sequence: Completion, event: Event) -> None:
        if sequence.cancelled:
            return
        try:
            sequence.emit(event)
        except Exception:  # the receiver is gone (e.g. its event loop closed): stop decoding
            sequence.cancel()

    def _retire_rows(self) -> None:
        """Drop finished and cancelled rows, moving the last row into each freed slot."""
        slot = 0
        while slot < len(self._rows):
            row = self._rows[slot]
            if not (row.finished or row.sequence.cancelled):
                slot += 1
                continue
            if not row.finished:
                self.stats.sequences_cancelled += 1
            last = len(self._rows) - 1
            if slot != last:
                moved = self._rows[last]
                self.decoder.copy_row(last, slot, moved.length)
                self._rows[slot] = moved
            self._rows.pop()
        self.stats.running = len(self._rows)

    def _generator_for(self, sequence: Completion) -> torch.Generator | None:
        """The row's own random stream: the request's seed, else a fresh random one."""
        if sequence.params.temperature == 0:
            return None
        seed = sequence.seed if sequence.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed % 2**64)
        return generator


def failure(error: Exception) -> Failed:
    return Failed(f"decoding failed: {type(error).__name__}: {error}")


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, ks: Sequence[int]
) -> list[TokenLogprob]:
    """Row i's token `tokens[i]` with its log-probability under `logits[i]` (log_softmax in
    fp32) and the `ks[i]` likeliest tokens (plus the token itself where it is not among them).

    logits: (B, V) in any float dtype; tokens: (B,) ids. One top-k of the largest k serves
    every row, and one transfer to the host each for the values and the ids."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, None].to(logp.device))[:, 0].tolist()
    token_ids = tokens.tolist()
    k_max = min(max(ks, default=0), logp.shape[-1])
    top_values: list[list[float]] = [[] for _ in ks]
    top_ids: list[list[int]] = [[] for _ in ks]
    if k_max > 0:
        top = torch.topk(logp, k_max, dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    entries = []
    for row, k in enumerate(ks):
        best = list(zip(top_ids[row][:k], top_values[row][:k], strict=True))
        if all(token != token_ids[row] for token, _ in best):
            best.append((token_ids[row], chosen[row]))
        entries.append(TokenLogprob(token_ids[row], chosen[row], tuple(best)))
    return entries
