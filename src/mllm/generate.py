"""`mllm generate`: stream text from a trained checkpoint, one token at a time.

The prompt is run through the model once (prefill), filling a preallocated KV cache; after that
each new token costs one forward pass over a single position (`Decoder.step`), which attends over
the cached keys and values instead of recomputing the whole sequence.

The decoding itself is mllm.decode's `Decoder` (the model's own `prefill` and `decode_step`,
shared with the serve engine); this module holds the context policy, the sampling loop and the
command. The cached logits are those `GPT.forward` gives for the same window, which the tests
check token for token against full recomputation.

Context policy: a prompt longer than the model's context keeps its last `context` tokens (with a
warning). When generation fills the context, the window slides: the most recent three quarters
of the context are run through the model again (one prefill) and decoding continues in the freed
quarter. Absolute position embeddings rule out shifting the cache in place, and re-encoding a
quarter-context at a time keeps the cost of sliding small.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from mllm.config import GenerateConfig
from mllm.decode import Decoder
from mllm.sampling import SamplingParams, sample_next

EOT_TEXT = "<|endoftext|>"


def slide_keep(context: int) -> int:
    """Tokens kept when a full window slides: three quarters of the context (at least one)."""
    return max(1, context - max(1, context // 4))


def generate_ids(
    decoder: Decoder,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    eot_id: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time, for one sequence (batch 1).

    Ends after `max_new_tokens`, or at the end-of-text token (which is not yielded). The caller
    may stop early (e.g. at a stop string) simply by not asking for more. The prompt must fit the
    context (see `fit_prompt`); past the context the window slides (see the module doc).
    """
    device = decoder.device
    tokens = list(prompt_ids)
    window_start = 0
    logits = decoder.prefill(torch.tensor([tokens], dtype=torch.long, device=device))
    keep = slide_keep(decoder.context)
    for produced in range(1, max_new_tokens + 1):
        token = int(sample_next(logits, [params], [generator])[0])
        if token == eot_id:
            return
        yield token
        if produced == max_new_tokens:
            return
        tokens.append(token)
        if len(tokens) - window_start > decoder.context:
            window_start = len(tokens) - keep
            window = torch.tensor([tokens[window_start:]], dtype=torch.long, device=device)
            logits = decoder.prefill(window)
        else:
            position = len(tokens) - 1 - window_start  # the new token's place in the window
            logits = decoder.step(torch.tensor([token], dtype=torch.long, device=device), position)


def fit_prompt(prompt_ids: Sequence[int], context: int) -> list[int]:
    """The prompt's last `context` tokens (the model cannot see further back)."""
    return list(prompt_ids[-context:])


def sample_generator(seed: int | None, index: int, device: torch.device) -> torch.Generator | None:
    """Sample `index`'s own random stream: seed + index, so each sample of a seeded run is
    reproducible on its own (whatever --num-samples is); None draws from torch's global RNG."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed((seed + index) % 2**64)
    return generator


@dataclass
class SampleTiming:
    """Where one sample's time went (for the info line and the benchmark)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    first_token_s: float = 0.0  # prefill + first sample
    decode_s: float = 0.0  # every later token

    @property
    def decode_tokens_per_s(self) -> float:
        later = self.new_tokens - 1
        return later / self.decode_s if later > 0 and self.decode_s > 0 else 0.0


def timed(ids: Iterator[int], timing: SampleTiming) -> Iterator[int]:
    """Pass token ids through, recording time to the first token and the decode time after it."""
    start = first_at = time.perf_counter()
    for token in ids:
        now = time.perf_counter()
        if timing.new_tokens == 0:
            timing.first_token_s = now - start
            first_at = now
        else:
            timing.decode_s = now - first_at
        timing.new_tokens += 1
        yield token


def run_generate(config: GenerateConfig) -> None:
    """The `mllm generate` command: load the checkpoint and tokenizer, stream each sample."""
    from mllm import console
    from mllm.device import DTYPE_NAMES, decode_threads, pick_device, resolve_decode_dtype
    from mllm.textstream import TextStream, token_byte_table
    from mllm.train.checkpoint import find_checkpoint, load_checkpoint, load_run_tokenizer

    device = pick_device(config.device)
    dtype = resolve_decode_dtype(config.dtype, device)
    threads = ""
    if device.type == "cpu":
        choice = decode_threads(config.threads)
        torch.set_num_threads(choice.count)
        threads = f" · {choice}"
    path = find_checkpoint(config.run_dir, config.checkpoint)
    loaded = load_checkpoint(path, device, dtype)
    tokenizer = load_run_tokenizer(loaded, config.tokenizer)
    model = loaded.model
    context = model.config.context
    console.info(
        f"{path} · {model.num_parameters() / 1e6:.1f}M parameters · {device.type} "
        f"{DTYPE_NAMES[dtype]}{threads}"
    )

    prompt_ids = tokenizer.encode(config.prompt).ids
    if len(prompt_ids) > context:
        console.warn(
            f"the prompt is {len(prompt_ids)} tokens, longer than the model's context "
            f"({context}): only its last {context} tokens are used"
        )
    prompt_ids = fit_prompt(prompt_ids, context)
    eot_id = loaded.data.eot_id
    if eot_id is None:
        eot_id = tokenizer.token_to_id(EOT_TEXT)
    vocab = model.token_embedding.num_embeddings
    table = token_byte_table(tokenizer)
    table += [b""] * max(0, vocab - len(table))  # ids the model has but the tokenizer lacks
    params = SamplingParams(config.temperature, config.top_k, config.top_p)
    decoder = Decoder(model)  # before the first line: it re-stores fp32 weights for decoding

    out = sys.stdout
    for index in range(config.num_samples):
        if index:
            out.write("---\n")
        out.write(config.prompt)
        out.flush()
        stream = TextStream(table, config.stop)
        timing = SampleTiming(prompt_tokens=len(prompt_ids))
        generator = sample_generator(config.seed, index, device)
        ids = generate_ids(decoder, prompt_ids, params, config.max_new_tokens, generator, eot_id)
        with contextlib.closing(timed(ids, timing)) as tokens:
            for token in tokens:
                out.write(stream.push(token))
                out.flush()
                if stream.stopped:
                    break
        out.write(stream.finish() + "\n")
        out.flush()
        console.info(
            f"[dim]{timing.new_tokens} tokens · prefill {timing.prompt_tokens} tokens + first "
            f"token {timing.first_token_s * 1000:.0f} ms · {timing.decode_tokens_per_s:.0f} "
            "tokens/s after[/dim]"
        )
