"""How much memory a training step needs, estimated before the first one, so a run too big for
the device says so at start instead of being killed without a word (the kernel's OOM killer on
a CPU, an out-of-memory error on a GPU) after minutes of set-up.

A step's peak is the weights, their gradients, the optimizer's state, and the activations the
forward pass saves for the backward one. The first three follow from the parameter count (fp32
each; AdamW keeps two moments per parameter, Muon one momentum per matrix). The activations were
counted tensor by tensor with torch.autograd.graph.saved_tensors_hooks on the eager model
(tests/test_memory.py counts them again): per token, per block,

    bf16 / fp16 autocast   20·d_model + 8·ffn_hidden + 4·heads + 16 bytes
    fp32                   32·d_model + 16·ffn_hidden + 4·heads + 16 bytes

plus 6·d_model + 16 (8·d_model + 16 in fp32) for the embeddings, the final LayerNorm and the
loss (its head runs in chunks: the logits are never all kept), and under autocast a half-precision
copy of every weight. With --activation-checkpointing a block keeps only its input (4·d_model
bytes per token) and one block's activations exist at a time, while its backward recomputes
them. Beside these, the backward's transient buffers and torch's runtime (RUNTIME_BYTES,
WORKING_BLOCKS, measured). torch.compile keeps fewer tensors (it recomputes cheap elementwise
results), so the estimate errs high. The seed's example (d_model 1024, 16 layers, batch 16,
context 1024, AdamW, bf16) peaked at 16 GB on a CPU; the estimate says 17.0 GB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mllm.config import ModelConfig, TrainConfig
from mllm.model import GPT
from mllm.train.optim import parameter_groups

FP32 = 4
HALF = 2
GB = 1e9
# Measured beside the saved tensors (peak RSS of `mllm train` on a CPU, d_model 512, context 512,
# batch 16, 8 and 16 layers: 3.05 and 5.01 GB eager, 2.88 compiled at 8): torch's own runtime
# (0.4 GB for a tiny model) and the backward's transient buffers, about two blocks' activations.
RUNTIME_BYTES = 400_000_000
WORKING_BLOCKS = 2


@dataclass(frozen=True)
class StepMemory:
    """Bytes one process needs at the peak of a training step, by what holds them."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    working: int  # the backward's transient buffers and torch's own runtime

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.working

    def describe(self) -> str:
        parts = (
            f"weights {size(self.weights)}, gradients {size(self.gradients)}, optimizer state "
            f"{size(self.optimizer)}, activations {size(self.activations)}, working memory "
            f"{size(self.working)}"
        )
        return f"about {size(self.total)} at a step's peak ({parts})"


def size(nbytes: float) -> str:
    """Bytes for people: 512 MB, 3.2 GB."""
    return f"{nbytes / GB:.1f} GB" if nbytes >= GB else f"{nbytes / 1e6:.0f} MB"


def block_bytes_per_token(config: ModelConfig, half: bool) -> int:
    """Bytes one block's forward keeps for the backward, per token (see above)."""
    d, hidden = config.d_model, config.ffn_hidden
    if half:
        return 20 * d + 8 * hidden + 4 * config.heads + 16
    return 32 * d + 16 * hidden + 4 * config.heads + 16


def activation_bytes_per_token(config: ModelConfig, half: bool, checkpointing: bool) -> int:
    """Bytes the forward pass keeps for the backward, per token of a micro-batch (see above)."""
    d = config.d_model
    block = block_bytes_per_token(config, half)
    rest = 6 * d + 16 if half else 8 * d + 16
    if checkpointing:  # every block's input kept, one block's activations at a time
        return config.layers * FP32 * d + block + rest
    return config.layers * block + rest


def estimate_step_memory(
    model: GPT, config: TrainConfig, dtype: torch.dtype, world_size: int
) -> StepMemory:
    """One process's peak in a step of `config` (--fsdp over `world_size` processes: the
    weights, gradients and optimizer state are each process's shard, plus two blocks gathered
    whole). DDP keeps a second copy of the gradients in its all-reduce buckets."""
    parameters = model.num_parameters()
    muon = sum(  # the parameters Muon takes (none with AdamW): one momentum each
        p.numel()
        for name, group in parameter_groups(model, config.optimizer).items()
        if name.startswith("muon_")
        for p in group
    )
    optimizer = FP32 * muon + 2 * FP32 * (parameters - muon)
    weights = gradients = FP32 * parameters
    half = dtype in (torch.bfloat16, torch.float16)
    sharded = config.fsdp and world_size > 1
    if sharded:
        block = (parameters - model.token_embedding.weight.numel()) // max(1, config.model.layers)
        weights = weights // world_size + 2 * FP32 * block
        gradients //= world_size
        optimizer //= world_size
    elif world_size > 1:
        gradients *= 2
    tokens = config.batch_size * config.model.context
    activations = tokens * activation_bytes_per_token(
        config.model, half, config.activation_checkpointing
    )
    if half:  # autocast's half-precision copy of each weight (of this process's)
        activations += HALF * (parameters // world_size if sharded else parameters)
    working = RUNTIME_BYTES + WORKING_BLOCKS * tokens * block_bytes_per_token(config.model, half)
    return StepMemory(weights, gradients, optimizer, activations, working)


def free_memory(device: torch.device) -> int | None:
    """Bytes free for this run on `device` now: the GPU's free memory, or the host's available
    memory (Linux's MemAvailable) for CPU and MPS; None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_host_memory()


def available_host_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def processes_sharing_memory(device: torch.device) -> int:
    """Processes of this job on this machine that draw on the same memory: torchrun's ranks on
    one host share its RAM; each GPU has its own."""
    return 1 if device.type == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def too_big_warning(
    need: StepMemory, free: int | None, device: torch.device, config: TrainConfig, world_size: int
) -> str | None:
    """The one-line warning when the step needs more than the device has free, with the flags
    that make it fit; None when it fits or the free memory is unknown."""
    sharing = processes_sharing_memory(device)
    if free is None or need.total * sharing <= free:
        return None
    processes = f" x {sharing} processes" if sharing > 1 else ""
    ways = ["a smaller --batch-size with a larger --grad-accum (the same batch per step)"]
    if not config.activation_checkpointing:
        ways.append("--activation-checkpointing")
    if world_size > 1 and not config.fsdp:
        ways.append("--fsdp")
    return (
        f"the training step needs about {size(need.total)}{processes}, more than the "
        f"{size(free)} free on {device}: it may run out of memory; use " + ", or ".join(ways)
    )
