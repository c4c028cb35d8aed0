"""The decoder-only GPT, readable top to bottom; the only home of its maths.

    tokens -> token embedding + learned position embedding
           -> N x Block:  x = x + Attn(LN(x));  x = x + SwiGLU(LN(x))     (Pre-LN)
           -> final LayerNorm -> output head (tied to the token embedding) -> logits

Attention is multi-head causal self-attention with one fused QKV projection and PyTorch's
`scaled_dot_product_attention` (in training on CPU with a faster backward: attention.py). A
preallocated KV cache makes decoding incremental: `forward` takes the position of its first
token, so a cached decode step and a full forward give the same logits. The cache also allows a
different position per batch row, which lets a server decode requests of different lengths
together.

Everything that uses the network goes through this file: training (`loss`), scoring
(`token_nll`: eval and validation), and decoding (`prefill` and `decode_step`: `mllm generate`
and the serve engine). Every matmul takes a `linear` function (default `F.linear`), so a decoder
can run the same maths through faster kernels (oneDNN-packed bf16 weights, mllm.decode) without
writing the block out again.

This module knows nothing of devices, distribution or files.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mllm.attention import causal_attention
from mllm.config import ModelConfig
from mllm.losses import linear_cross_entropy, rows_per_chunk

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""`linear(x, weight)` = x @ weight.T, as F.linear without a bias."""


def require_vocab_size(config: ModelConfig) -> int:
    """The vocab size of a resolved config (train fills it from data.json before building)."""
    if config.vocab_size is None:
        raise ValueError("ModelConfig.vocab_size must be set before building the model")
    return config.vocab_size


class KVCache:
    """Keys and values of every layer for up to `max_len` positions, preallocated once.

    Shapes: keys[layer] and values[layer] are (batch, heads, max_len, head_dim). Which positions
    are filled is tracked by the caller through the `start_pos` it passes to `GPT.forward`. The
    cache may hold another dtype than the weights (decoding on CPU keeps it in fp32): attention
    then runs in the cache's dtype.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len = max_len or config.context
        if self.max_len > config.context:
            raise ValueError(f"cache length {self.max_len} exceeds the context {config.context}")
        shape = (batch_size, config.heads, self.max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.layers)]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    def rows(self, start: int, stop: int) -> KVCache:
        """A view of batch rows start..stop (writes go to this cache)."""
        if start == 0 and stop == self.batch_size:
            return self
        view = object.__new__(KVCache)
        view.max_len = self.max_len
        view.keys = [keys[start:stop] for keys in self.keys]
        view.values = [values[start:stop] for values in self.values]
        return view

    def copy_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of row `source` into row `target`."""
        for layer in self.keys + self.values:
            layer[target, :, :length] = layer[source, :, :length]


def positions_for(start_pos: int | torch.Tensor, length: int, device: torch.device) -> torch.Tensor:
    """Absolute positions of `length` new tokens: shape (length,) for an int start, (B, length)
    for a per-row start tensor of shape (B,)."""
    offsets = torch.arange(length, device=device)
    if isinstance(start_pos, int):
        return offsets + start_pos
    return start_pos.to(device)[:, None] + offsets[None, :]


def dropout_if_training(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, skipped outright where it is the identity (decoding pays per call)."""
    return F.dropout(x, p, training) if training and p > 0 else x


class CacheSpan:
    """Where a forward's new tokens go in a KV cache and which cached positions they see,
    worked out once per forward and shared by every layer.

    An int start writes positions start..end as one slice; a (B,) start writes each row at its
    own positions and masks out what lies beyond each row's last position.
    """

    def __init__(self, start_pos: int | torch.Tensor, length: int, device: torch.device) -> None:
        self.start_pos = start_pos
        self.length = length
        self.mask: torch.Tensor | None = None  # True where a query may attend
        self.is_causal = False
        if isinstance(start_pos, int):
            self.end = start_pos + length
            if length > 1 and start_pos == 0:
                self.is_causal = True
            elif length > 1:  # a chunk after cached positions: causal within the chunk
                query_pos = torch.arange(start_pos, self.end, device=device)[:, None]
                self.mask = torch.arange(self.end, device=device)[None, :] <= query_pos
            # one new token sees every cached position: no mask needed
        else:
            self.positions = positions_for(start_pos, length, device)  # (B, T)
            self.rows = torch.arange(len(start_pos), device=device)[:, None]  # (B, 1)
            self.end = int(self.positions.max()) + 1
            keys = torch.arange(self.end, device=device)
            self.mask = (keys[None, None, :] <= self.positions[:, :, None])[:, None]  # (B,1,T,end)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        dropout: float,
    ) -> torch.Tensor:
        """Write k, v (B, heads, T, head_dim, in the cache's dtype) into one layer's cache;
        attend q over everything cached up to the span's end."""
        cache_k, cache_v = cache
        if isinstance(self.start_pos, int):
            cache_k[:, :, self.start_pos : self.end] = k
            cache_v[:, :, self.start_pos : self.end] = v
        else:  # index (B, T) -> values (B, T, heads, head_dim)
            cache_k[self.rows, :, self.positions] = k.transpose(1, 2)
            cache_v[self.rows, :, self.positions] = v.transpose(1, 2)
        keys, values = cache_k[:, :, : self.end], cache_v[:, :, : self.end]
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=self.mask, dropout_p=dropout, is_causal=self.is_causal
        )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one fused QKV matmul, SDPA, an output projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        span: CacheSpan | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        linear: Linear = F.linear,
    ) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = linear(x, self.qkv.weight)
        if cache is not None:  # attention runs in the cache's dtype
            qkv = qkv.to(cache[0].dtype)
        # (B, T, C) -> (B, heads, T, head_dim)
        q, k, v = (
            t.view(batch, length, self.heads, self.head_dim).transpose(1, 2)
            for t in qkv.split(width, dim=2)
        )
        dropout = self.dropout if self.training else 0.0
        if cache is None or span is None:
            y = causal_attention(q, k, v, dropout)
        else:
            y = span.attend(q, k, v, cache, dropout).to(x.dtype)
        y = y.transpose(1, 2).contiguous().view(batch, length, width)
        return dropout_if_training(linear(y, self.proj.weight), self.dropout, self.training)


class SwiGLU(nn.Module):
    """Feed-forward: down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.d_model, 2 * config.ffn_hidden, bias=False)
        self.down = nn.Linear(config.ffn_hidden, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, linear: Linear = F.linear) -> torch.Tensor:
        gate, up = linear(x, self.gate_up.weight).chunk(2, dim=-1)
        down = linear(F.silu(gate) * up, self.down.weight)
        return dropout_if_training(down, self.dropout, self.training)


# The weights whose outputs add into the residual stream: GPT-2 scales their init down.
RESIDUAL_PROJECTIONS = ("attn.proj.weight", "ffn.down.weight")


class Block(nn.Module):
    """One Pre-LN transformer block."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_ffn = nn.LayerNorm(config.d_model)
        self.ffn = SwiGLU(config)

    def forward(
        self,
        x: torch.Tensor,
        span: CacheSpan | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        linear: Linear = F.linear,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), span, cache, linear)
        return x + self.ffn(self.ln_ffn(x), linear)


class GPT(nn.Module):
    """Decoder-only transformer language model with a tied output head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        vocab_size = require_vocab_size(config)
        self.token_embedding = nn.Embedding(vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_final = nn.LayerNorm(config.d_model)
        # Training's --activation-checkpointing (not part of the network: the maths is the same)
        self.checkpoint_activations = False
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere, residual output projections scaled by
        1/sqrt(2·layers) so the residual stream's variance does not grow with depth."""
        residual_std = 0.02 / math.sqrt(2 * self.config.layers)
        for name, param in self.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(param, mean=0.0, std=residual_std)
            elif param.dim() >= 2:
                nn.init.normal_(param, mean=0.0, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
            else:  # LayerNorm gains
                nn.init.ones_(param)

    def zero_residual_projections(self) -> None:
        """Zero the weights that write into the residual stream (attention out, SwiGLU down):
        each block starts as the identity and the network as embeddings + head, which learns
        faster early on (modded-nanogpt's init). Their gradients are not zero, so they move
        from the first step."""
        for name, param in self.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.zeros_(param)

    def fused_parts(self) -> dict[str, int]:
        """Weights that fuse several linear maps along their rows, and how many: each block's
        Q, K, V (3) and SwiGLU gate, up (2). An optimizer that treats a matrix as one map
        (Muon) splits these first."""
        parts = {}
        for layer in range(self.config.layers):
            parts[f"blocks.{layer}.attn.qkv.weight"] = 3
            parts[f"blocks.{layer}.ffn.gate_up.weight"] = 2
        return parts

    @property
    def head_weight(self) -> torch.Tensor:
        """The output head's weight: the token embedding itself (weight tying)."""
        return self.token_embedding.weight

    def num_parameters(self, exclude_position: bool = False) -> int:
        """Parameter count (the tied head is counted once)."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.position_embedding.weight.numel() if exclude_position else total

    def hidden_states(
        self,
        idx: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        cache: KVCache | None = None,
        linear: Linear = F.linear,
    ) -> torch.Tensor:
        """Final-LayerNorm outputs (B, T, d_model) for tokens `idx` (B, T) at positions
        start_pos.. (an int, or a (B,) tensor of per-row starts when decoding with a cache)."""
        length = idx.shape[1]
        if cache is None and not isinstance(start_pos, int):
            raise ValueError("per-row start positions need a KV cache")
        positions = positions_for(start_pos, length, idx.device)
        # An int start is checked without reading the device (no host sync in a training step).
        last = start_pos + length - 1 if isinstance(start_pos, int) else int(positions.max())
        if last >= self.config.context:
            raise ValueError(f"position {last} is beyond the context {self.config.context}")
        x = self.token_embedding(idx) + self.position_embedding(positions)
        x = dropout_if_training(x, self.config.dropout, self.training)
        span = None if cache is None else CacheSpan(start_pos, length, idx.device)
        recompute = self.checkpoint_activations and cache is None and torch.is_grad_enabled()
        for layer, block in enumerate(self.blocks):
            if recompute:  # keep the block's input only; its backward recomputes the rest
                x = checkpoint(block, x, None, None, linear, use_reentrant=False)
                continue
            layer_cache = None if cache is None else (cache.keys[layer], cache.values[layer])
            x = block(x, span, layer_cache, linear)
        return self.ln_final(x)

    def logits(self, hidden: torch.Tensor, linear: Linear = F.linear) -> torch.Tensor:
        """The output head: logits (..., vocab) of hidden states (..., d_model)."""
        return linear(hidden, self.head_weight)

    def forward(
        self,
        idx: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        cache: KVCache | None = None,
        last_only: bool = False,
        linear: Linear = F.linear,
    ) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) for the last position only with `last_only`
        (decoding needs just that, and the head is the widest matmul)."""
        h = self.hidden_states(idx, start_pos, cache, linear)
        if last_only:
            h = h[:, -1:]
        return self.logits(h, linear)

    def prefill(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run `idx` (B, T) from position 0 into `cache` (B rows); the logits (B, vocab) after
        the last token.

        A cache of another dtype than the weights (fp32 on CPU) is filled through a staging cache
        of the weights' dtype, so the prompt attends exactly as a full forward does."""
        length = idx.shape[1]
        if length > self.config.context:
            raise ValueError(f"{length} tokens do not fit the context {self.config.context}")
        weight = self.head_weight
        if cache.dtype == weight.dtype:
            return self(idx, 0, cache, last_only=True)[:, -1]
        staging = KVCache(self.config, idx.shape[0], length, weight.device, weight.dtype)
        logits = self(idx, 0, staging, last_only=True)
        for cached, staged in zip(
            cache.keys + cache.values, staging.keys + staging.values, strict=True
        ):
            cached[:, :, :length] = staged
        return logits[:, -1]

    def decode_step(
        self,
        tokens: torch.Tensor,
        start_pos: int | torch.Tensor,
        cache: KVCache,
        linear: Linear = F.linear,
    ) -> torch.Tensor:
        """Append one token per row (`tokens` (B,)) at `start_pos` (an int for every row, or a
        (B,) tensor of per-row positions); the next-token logits (B, vocab).

        The one decode step `mllm generate` and the serve engine share: the same blocks as a full
        forward, over one position, attending over the cache."""
        if isinstance(start_pos, int) and start_pos >= cache.max_len:
            raise ValueError(f"the cache is full ({cache.max_len} positions): prefill a new window")
        hidden = self.hidden_states(tokens[:, None], start_pos, cache, linear)
        return self.logits(hidden[:, 0], linear)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of `idx` against `targets` (both (B, T)), in fp32.

        The head and the loss run fused in row chunks (mllm.losses): the same value and
        gradients as cross-entropy over `self(idx)`, without materialising the full logits.
        """
        return linear_cross_entropy(self.hidden_states(idx), self.head_weight, targets)

    def token_nll(
        self, idx: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None
    ) -> torch.Tensor:
        """Next-token negative log-likelihood of every target (B·T,), in fp32, for scoring.

        The head runs `chunk_rows` positions at a time (default: losses.rows_per_chunk), as
        training's loss does: never the whole batch's logits (8 windows of 1,024 at vocab 16,000
        would be 0.5 GB in fp32)."""
        hidden = self.hidden_states(idx).flatten(0, 1)
        targets = targets.flatten()
        step = chunk_rows or rows_per_chunk(self.head_weight.shape[0])
        return torch.cat(
            [
                F.cross_entropy(
                    self.logits(hidden[row : row + step]).float(),
                    targets[row : row + step],
                    reduction="none",
                )
                for row in range(0, len(targets), step)
            ]
        )

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6·N (forward + backward matmuls over the non-embedding
        parameters plus the head) + 12·layers·d·context for attention scores (PaLM's MFU count)."""
        config = self.config
        n = self.num_parameters(exclude_position=True)
        return 6 * n + 12 * config.layers * config.d_model * config.context
