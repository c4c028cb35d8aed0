"""The decoder-only GPT, readable top to bottom.

    tokens -> token embedding + learned position embedding
           -> N x Block:  x = x + Attn(LN(x));  x = x + SwiGLU(LN(x))     (Pre-LN)
           -> final LayerNorm -> output head (tied to the token embedding) -> logits

Attention is multi-head causal self-attention with one fused QKV projection and PyTorch's
`scaled_dot_product_attention`. A preallocated KV cache makes decoding incremental: `forward`
takes the position of its first token, so a cached decode step and a full forward give the same
logits. The cache also allows a different position per batch row, which lets a server decode
requests of different lengths together.

This module knows nothing of devices, distribution or files.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mllm.config import ModelConfig
from mllm.losses import linear_cross_entropy


def require_vocab_size(config: ModelConfig) -> int:
    """The vocab size of a resolved config (train fills it from data.json before building)."""
    if config.vocab_size is None:
        raise ValueError("ModelConfig.vocab_size must be set before building the model")
    return config.vocab_size


class KVCache:
    """Keys and values of every layer for up to `max_len` positions, preallocated once.

    Shapes: keys[layer] and values[layer] are (batch, heads, max_len, head_dim). Which positions
    are filled is tracked by the caller through the `start_pos` it passes to `GPT.forward`.
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


def positions_for(start_pos: int | torch.Tensor, length: int, device: torch.device) -> torch.Tensor:
    """Absolute positions of `length` new tokens: shape (length,) for an int start, (B, length)
    for a per-row start tensor of shape (B,)."""
    offsets = torch.arange(length, device=device)
    if isinstance(start_pos, int):
        return offsets + start_pos
    return start_pos.to(device)[:, None] + offsets[None, :]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one fused QKV matmul, SDPA, an output projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # (B, T, C) -> (B, heads, T, head_dim)
        q, k, v = (
            t.view(batch, length, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v)
        )
        dropout = self.dropout if self.training else 0.0

        if cache is None:
            if not isinstance(start_pos, int):
                raise ValueError("per-row start positions need a KV cache")
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=length > 1)
        else:
            y = self._attend_with_cache(q, k, v, start_pos, cache, dropout)

        y = y.transpose(1, 2).contiguous().view(batch, length, width)
        return self.resid_dropout(self.proj(y))

    @staticmethod
    def _attend_with_cache(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        start_pos: int | torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        dropout: float,
    ) -> torch.Tensor:
        """Write the new keys/values at their positions, attend over everything cached so far."""
        cache_k, cache_v = cache
        length = q.shape[2]
        if isinstance(start_pos, int):
            end = start_pos + length
            cache_k[:, :, start_pos:end] = k
            cache_v[:, :, start_pos:end] = v
            keys, values = cache_k[:, :, :end], cache_v[:, :, :end]
            if length == 1:  # one new token sees every cached position: no mask needed
                return F.scaled_dot_product_attention(q, keys, values, dropout_p=dropout)
            if start_pos == 0:
                return F.scaled_dot_product_attention(
                    q, keys, values, dropout_p=dropout, is_causal=True
                )
            query_pos = torch.arange(start_pos, end, device=q.device)[:, None]
            mask = torch.arange(end, device=q.device)[None, :] <= query_pos  # (T, end)
            return F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, dropout_p=dropout
            )

        # A start position per row (rows of different lengths decoded together).
        positions = positions_for(start_pos, length, q.device)  # (B, T)
        rows = torch.arange(q.shape[0], device=q.device)[:, None]  # (B, 1)
        cache_k[rows, :, positions] = k.transpose(1, 2)  # index (B, T) -> values (B, T, H, D)
        cache_v[rows, :, positions] = v.transpose(1, 2)
        end = int(positions.max()) + 1
        keys, values = cache_k[:, :, :end], cache_v[:, :, :end]
        mask = torch.arange(end, device=q.device)[None, None, :] <= positions[:, :, None]
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask[:, None], dropout_p=dropout
        )


class SwiGLU(nn.Module):
    """Feed-forward: down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.d_model, 2 * config.ffn_hidden, bias=False)
        self.down = nn.Linear(config.ffn_hidden, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.dropout(self.down(F.silu(gate) * up))


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
        start_pos: int | torch.Tensor = 0,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), start_pos, cache)
        return x + self.ffn(self.ln_ffn(x))


class GPT(nn.Module):
    """Decoder-only transformer language model with a tied output head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        vocab_size = require_vocab_size(config)
        self.token_embedding = nn.Embedding(vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.context, config.d_model)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_final = nn.LayerNorm(config.d_model)
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere, residual output projections scaled by
        1/sqrt(2·layers) so the residual stream's variance does not grow with depth."""
        residual_std = 0.02 / math.sqrt(2 * self.config.layers)
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ffn.down.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)
            elif param.dim() >= 2:
                nn.init.normal_(param, mean=0.0, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
            else:  # LayerNorm gains
                nn.init.ones_(param)

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
    ) -> torch.Tensor:
        """Final-LayerNorm outputs (B, T, d_model) for tokens `idx` (B, T) at positions
        start_pos.. (an int, or a (B,) tensor of per-row starts when decoding with a cache)."""
        length = idx.shape[1]
        positions = positions_for(start_pos, length, idx.device)
        # An int start is checked without reading the device (no host sync in a training step).
        last = start_pos + length - 1 if isinstance(start_pos, int) else int(positions.max())
        if last >= self.config.context:
            raise ValueError(f"position {last} is beyond the context {self.config.context}")
        x = self.embed_dropout(self.token_embedding(idx) + self.position_embedding(positions))
        for layer, block in enumerate(self.blocks):
            layer_cache = None if cache is None else (cache.keys[layer], cache.values[layer])
            x = block(x, start_pos, layer_cache)
        return self.ln_final(x)

    def forward(
        self,
        idx: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) for the last position only with `last_only`
        (decoding needs just that, and the head is the widest matmul)."""
        h = self.hidden_states(idx, start_pos, cache)
        if last_only:
            h = h[:, -1:]
        return F.linear(h, self.head_weight)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of `idx` against `targets` (both (B, T)), in fp32.

        The head and the loss run fused in row chunks (mllm.losses): the same value and
        gradients as cross-entropy over `self(idx)`, without materialising the full logits.
        """
        return linear_cross_entropy(self.hidden_states(idx), self.head_weight, targets)

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6·N (forward + backward matmuls over the non-embedding
        parameters plus the head) + 12·layers·d·context for attention scores (PaLM's MFU count)."""
        config = self.config
        n = self.num_parameters(exclude_position=True)
        return 6 * n + 12 * config.layers * config.d_model * config.context
