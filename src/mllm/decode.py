"""Incremental decoding, shared by `mllm generate` and the serve engine: one `Decoder` over a
model, its KV cache and the matmul kernel its steps run through.

The maths is the model's own (`GPT.prefill`, `GPT.decode_step` in model.py); this module only
picks how it runs fastest on the device:

- On CPU the cache (and so attention) is fp32 whatever the weights' dtype: PyTorch's CPU
  attention kernel is several times slower in bf16 than in fp32 for one query (over 100 µs per
  layer at a few hundred positions), and bf16 keys and values are exact in fp32.
- bf16 weights on a CPU with native bf16 run every matmul through oneDNN with the weights
  prepacked once (`onednn_bf16_linear`); fp32 weights are re-stored in the memory order
  matrix-vector products read fastest (`prepare_for_decoding`).

At batch 1 a decode step is a chain of matrix-vector products bound by how fast the weights
stream from memory, plus a few hundred small ops whose dispatch costs as much as the arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mllm.model import GPT, KVCache, Linear


def prepare_for_decoding(model: GPT) -> GPT:
    """Re-store an fp32 CPU model's matmul weights in the memory order batch-1 decoding reads
    fastest; other models are returned as they are.

    On CPU, fp32 `x @ W.T` with W (out, in) kept column-major, i.e. (in, out) contiguous, ran
    20-25% faster over a whole decode step than the row-major original (3x for the output head
    alone; see benchmarks/bench_generate.py). Only the memory order changes, not a single value:
    F.linear on the transposed storage takes the faster path.
    """
    if model.head_weight.device.type != "cpu" or model.head_weight.dtype != torch.float32:
        return model
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.data = module.weight.data.t().contiguous().t()
    return model


def onednn_bf16_linear(model: GPT, batch_size: int) -> Linear | None:
    """`x @ W.T` through oneDNN with each weight prepacked once for `batch_size` rows, for a bf16
    model on a CPU with native bf16 (AVX512-BF16 / AMX); None where that is unavailable.

    At batch 1 the plain bf16 matmul is barely faster than fp32 on such CPUs, while the packed one
    runs the whole decode step 1.3-2.5x faster than fp32 (benchmarks/bench_generate.py). Packing
    for `batch_size` rows is a layout hint: fewer rows compute the same. The packed copies cost
    one more copy of the matmul weights in memory. These are the kernels `torch.compile` uses for
    frozen CPU models; if a PyTorch release drops them, decoding falls back to F.linear.
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
    """Up to `batch_size` sequences decoded incrementally through one KV cache.

    `prefill(ids, row)` fills cache rows row.. with prompts from position 0; `step(tokens,
    positions)` appends one token to each of the first len(tokens) rows. Both return next-token
    logits (B, vocab) in the model's dtype. The caller tracks each row's length. Building a
    Decoder prepares the model's weights for decoding (`prepare_for_decoding`).
    """

    def __init__(self, model: GPT, batch_size: int = 1) -> None:
        self.model = prepare_for_decoding(model)
        self.config = model.config
        weight = model.head_weight
        cache_dtype = torch.float32 if weight.device.type == "cpu" else weight.dtype
        self.cache = KVCache(self.config, batch_size, device=weight.device, dtype=cache_dtype)
        self.linear: Linear = onednn_bf16_linear(model, batch_size) or F.linear

    @property
    def context(self) -> int:
        return self.config.context

    @property
    def device(self) -> torch.device:
        return self.model.head_weight.device

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, row: int = 0) -> torch.Tensor:
        """Fill cache rows row..row+B with `ids` (B, T) from position 0; the logits after the
        last token of each."""
        return self.model.prefill(ids, self.cache.rows(row, row + ids.shape[0]))

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: int | torch.Tensor) -> torch.Tensor:
        """Append `tokens` (B,) to rows 0..B at `positions` (one int for every row, or a (B,)
        tensor); the logits after them."""
        cache = self.cache.rows(0, tokens.shape[0])
        return self.model.decode_step(tokens, positions, cache, self.linear)

    def copy_row(self, source: int, target: int, length: int) -> None:
        """Copy a row's first `length` cached positions into another row."""
        self.cache.copy_row(source, target, length)
