"""`mllm generate`: stream text from a trained checkpoint, one token at a time.

The prompt is run through the model once (prefill), filling a preallocated KV cache; after that
each new token costs one forward pass over a single position (`Decoder.step`), which attends over
the cached keys and values instead of recomputing the whole sequence.

At batch 1 on a CPU a step is a few hundred small ops, so Python and dispatch overhead count as
much as the arithmetic: the step calls the block's own modules directly on (B, d_model) tensors,
writes the new key/value with one copy per layer, and computes the output head only for the new
position. The logits are exactly those `GPT.forward` gives for the same window, which the tests
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mllm.config import GenerateConfig
from mllm.model import GPT, KVCache
from mllm.sampling import SamplingParams, sample_next

EOT_TEXT = "<|endoftext|>"


def prepare_for_decoding(model: GPT) -> GPT:
    """Re-store an fp32 model's matmul weights in the memory order batch-1 decoding reads fastest.

    A decode step is a chain of matrix-vector products, bound by how fast the weights stream from
    memory. On CPU, fp32 `x @ W.T` with W (out, in) kept column-major, i.e. (in, out) contiguous,
    ran 20-25% faster over a whole decode step than the row-major original (3x for the output head
    alone; see benchmarks/bench_generate.py). Only the memory order changes, not a single value,
    and the model code is untouched: F.linear on the transposed storage takes the faster path.
    (bf16 weights are left as they are: `Decoder` packs its own copies for oneDNN.)
    """
    if model.head_weight.device.type != "cpu" or model.head_weight.dtype != torch.float32:
        return model
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.data = module.weight.data.t().contiguous().t()
    return model


def slide_keep(context: int) -> int:
    """Tokens kept when a full window slides: three quarters of the context (at least one)."""
    return max(1, context - max(1, context // 4))


Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def onednn_bf16_linear(model: GPT, batch_size: int) -> Linear | None:
    """`x @ W.T` through oneDNN with each weight prepacked once for `batch_size` rows, for a bf16
    model on a CPU with native bf16 (AVX512-BF16 / AMX); None where that is unavailable.

    At batch 1 the plain bf16 matmul is barely faster than fp32 on such CPUs, while the packed one
    runs the whole decode step 1.3-2.5x faster than fp32 (benchmarks/bench_generate.py). The
    packed copies cost one more copy of the matmul weights in memory. These are the kernels
    `torch.compile` uses for frozen CPU models; if a PyTorch release drops them, decoding falls
    back to F.linear.
    """
    from mllm.device import cpu_has_fast_bf16

    weight = model.head_weight
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    linear_op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    usable = (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and cpu_has_fast_bf16()
        and reorder is not None
        and linear_op is not None
    )
    if not usable:
        return None
    matrices = [m.weight for m in model.modules() if isinstance(m, nn.Linear)] + [weight]
    packed = {id(w): reorder(w.detach(), batch_size) for w in matrices}

    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return linear_op(x, packed[id(w)], None, "none", [], "")

    return linear


class Decoder:
    """Incremental decoding of a batch of sequences (all at the same position) with a KV cache.

    `prefill(ids)` starts over with a new window; `step(tokens)` appends one token per row. Both
    return the next-token logits (B, vocab) in the model's dtype.

    On CPU the cache (and so attention) is fp32 whatever the weights' dtype: PyTorch's CPU
    attention kernel is several times slower in bf16 than in fp32 for one query (over 100 µs per
    layer at a few hundred positions), and bf16 keys and values are exact in fp32.
    """

    def __init__(self, model: GPT, batch_size: int = 1) -> None:
        self.model = model
        self.config = model.config
        weight = model.head_weight
        cache_dtype = torch.float32 if weight.device.type == "cpu" else weight.dtype
        self.cache = KVCache(self.config, batch_size, device=weight.device, dtype=cache_dtype)
        self.linear: Linear = onednn_bf16_linear(model, batch_size) or F.linear
        self.length = 0  # positions filled in the cache

    @property
    def context(self) -> int:
        return self.config.context

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Fill the cache with `ids` (B, T) from position 0; the logits after the last one."""
        length = ids.shape[1]
        if length > self.context:
            raise ValueError(f"{length} tokens do not fit the context {self.context}")
        weight = self.model.head_weight
        if self.cache.keys[0].dtype == weight.dtype:
            logits = self.model(ids, 0, self.cache, last_only=True)
        else:  # the model attends in its own dtype: prefill into a cache of that, then copy
            staging = KVCache(self.config, ids.shape[0], length, weight.device, weight.dtype)
            logits = self.model(ids, 0, staging, last_only=True)
            for cached, staged in zip(
                self.cache.keys + self.cache.values, staging.keys + staging.values, strict=True
            ):
                cached[:, :, :length] = staged
        self.length = length
        return logits[:, -1]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (`tokens` (B,)) at the next position; the logits after it.

        The same computation as `GPT.forward` for one position (blocks' LayerNorms, attention
        over the cache, SwiGLU as in `SwiGLU.forward`, dropout being off in eval), written out so
        each matmul is one `self.linear` call; tests compare it with full recomputation.
        """
        position = self.length
        if position >= self.context:
            raise ValueError(f"the cache is full ({self.context} positions): prefill a new window")
        model, config, linear = self.model, self.config, self.linear
        batch, width = tokens.shape[0], config.d_model
        x = model.token_embedding(tokens) + model.position_embedding.weight[position]
        for block, keys, values in zip(
            model.blocks, self.cache.keys, self.cache.values, strict=True
        ):
            qkv = linear(block.ln_attn(x), block.attn.qkv.weight)
            qkv = qkv.to(keys.dtype).view(batch, 3, config.heads, config.head_dim)
            query, key, value = qkv.unbind(1)  # each (B, heads, head_dim)
            keys[:, :, position] = key
            values[:, :, position] = value
            attended = F.scaled_dot_product_attention(
                query[:, :, None], keys[:, :, : position + 1], values[:, :, : position + 1]
            )  # one query sees every cached position: no mask
            x = x + linear(attended.view(batch, width).to(x.dtype), block.attn.proj.weight)
            gate, up = linear(block.ln_ffn(x), block.ffn.gate_up.weight).chunk(2, dim=-1)
            x = x + linear(F.silu(gate) * up, block.ffn.down.weight)
        self.length = position + 1
        return linear(model.ln_final(x), model.head_weight)


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
    device = decoder.model.head_weight.device
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
            logits = decoder.step(torch.tensor([token], dtype=torch.long, device=device))


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
    if device.type == "cpu":
        torch.set_num_threads(decode_threads(config.threads))
    path = find_checkpoint(config.run_dir, config.checkpoint)
    loaded = load_checkpoint(path, device, dtype)
    tokenizer = load_run_tokenizer(loaded, config.tokenizer)
    model = prepare_for_decoding(loaded.model)
    context = model.config.context
    count = torch.get_num_threads()
    threads = f" · {count} thread{'s' * (count != 1)}" if device.type == "cpu" else ""
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
    eot_id = loaded.data.get("eot_id", tokenizer.token_to_id(EOT_TEXT))
    vocab = model.token_embedding.num_embeddings
    table = token_byte_table(tokenizer)
    table += [b""] * max(0, vocab - len(table))  # ids the model has but the tokenizer lacks
    params = SamplingParams(config.temperature, config.top_k, config.top_p)
    decoder = Decoder(model)

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
