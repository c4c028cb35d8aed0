"""--fsdp: parameters, gradients and optimizer state sharded over the ranks with FSDP2 (torch's
`fully_shard`), so a model whose training state does not fit one device trains on several.

Each block is one FSDP unit (its weights are gathered just before its forward and backward, and
freed after), the GPT itself the root unit (embeddings = tied head, final LayerNorm). Gradients
are reduce-scattered and averaged, as DDP all-reduces and averages them, so an FSDP run logs the
losses of a DDP or one-process run of the same global batch.

What a checkpoint holds does not depend on sharding: `full_weights` and `full_optimizer_state`
gather the whole tensors (collectives: every rank calls them, in the same order), so
model.safetensors and trainer.pt are what a one-process run writes, and eval / generate / serve
/ a resume on any number of processes read them as they are. `shard_saved_optimizer_state` is
the way back: a full optimizer state loaded into a sharded run keeps this rank's slice of each
tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from mllm.config import TrainConfig
from mllm.errors import UsageError
from mllm.model import GPT

# GPT's methods that run the network besides forward(): the training loss, validation's
# per-token NLL. FSDP gathers the root's weights around each, as it does around forward().
FORWARD_METHODS = ("loss", "token_nll")


def shard_model(model: GPT, device: torch.device, world_size: int, compile_blocks: bool) -> None:
    """Shard `model` in place over the `world_size` ranks of the process group: each block, then
    the root. Call it before building the optimizer: its parameters become sharded DTensors.

    With `compile_blocks`, each block is compiled before it is sharded (as torchtitan does):
    FSDP's gathers sit between the compiled blocks, not inside one graph."""
    mesh = init_device_mesh(device.type, (world_size,))
    for block in model.blocks:
        if compile_blocks:
            block.compile()
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for method in FORWARD_METHODS:
        register_fsdp_forward_method(model, method)


def check_precision(config: TrainConfig, world_size: int, dtype: torch.dtype) -> None:
    """Refuse --fsdp in fp16 (exit 2): its gradient scaler decides from this rank's shards alone
    whether to skip a step, so ranks could disagree and their shards diverge. (fp16 is what
    `--dtype auto` picks on pre-Ampere GPUs only; CPUs do not train in it.)"""
    if config.fsdp and world_size > 1 and dtype == torch.float16:
        raise UsageError(
            "--fsdp with fp16 (and its gradient scaler) is not supported: give --dtype fp32 "
            "(or bf16 where the GPU has it), or train without --fsdp"
        )


def is_sharded(model: torch.nn.Module | None) -> bool:
    """Whether `model` was sharded by `shard_model`."""
    return isinstance(model, FSDPModule)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective), or the tensor itself when not sharded."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gathered(tensor: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """The whole tensor, on the CPU, on the rank that keeps it (None on the others). Sharded,
    every rank calls it (a collective); gathered one tensor at a time, so a device holds at most
    one whole tensor beside its shards."""
    whole = full_tensor(tensor.detach())
    return whole.contiguous().cpu() if keep else None


def full_weights(model: GPT, keep: bool = True) -> dict[str, torch.Tensor] | None:
    """The model's state dict as whole tensors on the CPU, the names of the unwrapped model (what
    model.safetensors holds); None where not `keep` (sharded, every rank must call it, and only
    the one that writes keeps a copy)."""
    weights = {name: gathered(tensor, keep) for name, tensor in model.state_dict().items()}
    return weights if keep else None  # type: ignore[return-value]


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict[str, Any]:
    """optimizer.state_dict() with each sharded tensor gathered whole onto the CPU: the state
    dict of an unsharded run (on the rank that keeps it; elsewhere the gathers only). Every rank
    must call it (state_dict orders the state alike on every rank)."""
    saved = optimizer.state_dict()
    saved["state"] = {
        index: {
            key: gathered(value, keep) if isinstance(value, DTensor) else value
            for key, value in state.items()
        }
        for index, state in saved["state"].items()
    }
    return saved


def shard_saved_optimizer_state(
    optimizer: torch.optim.Optimizer, saved: dict[str, Any]
) -> dict[str, Any]:
    """A whole (unsharded) optimizer state dict, read on the CPU, with each tensor of a sharded
    parameter's state (AdamW's moments) cut to this rank's shard, laid out as the parameter is:
    what `optimizer.load_state_dict` then loads. One tensor at a time reaches the device (never
    the whole state), and no communication: every rank read the whole file."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state = {}
    for index, values in saved["state"].items():
        param = params[index]
        state[index] = {
            key: shard_like(value, param) if isinstance(param, DTensor) else value
            for key, value in values.items()
        }
    return {**saved, "state": state}


def shard_like(value: Any, param: DTensor) -> Any:
    """`value` as a DTensor laid out as `param`, if it has the parameter's shape (not AdamW's
    step count)."""
    if not isinstance(value, torch.Tensor) or value.shape != param.shape:
        return value
    whole = value.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
