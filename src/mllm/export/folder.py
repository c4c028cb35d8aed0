"""The exported folder: what `mllm export` writes, and how it replaces an earlier one.

    OUT/
      config.json               MllmConfig's fields (transformers' names), auto_map, the marker
      configuration_mllm.py     the remote code, copied as is from this package
      modeling_mllm.py
      model.safetensors         the weights, q/k/v and gate/up split, under Llama-style names
      generation_config.json    eos_token_id (and pad_token_id) = <|endoftext|>'s id
      tokenizer.json            the run's tokenizer, byte for byte
      tokenizer_config.json     eos/pad token, model_max_length = the context, ...
      README.md                 the model card: data, tokens seen, val loss, versions

The folder is written under a temporary sibling name and renamed into place, so OUT is either the
previous folder or the complete new one. An existing OUT is replaced only if it is an earlier
export (its config.json carries the `mllm_export` marker); any other folder or file is refused.

Needs no transformers: the files are plain JSON, safetensors and copied source.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mllm import __version__
from mllm.config import ExportConfig
from mllm.errors import MllmError, UsageError
from mllm.fileio import (
    atomic_write_json,
    atomic_write_text,
    current_umask,
    ensure_writable_dir,
    fsync_dir,
    swap_in_folder,
)

CODE_FILES = ("configuration_mllm.py", "modeling_mllm.py")
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
MODEL_CARD = "README.md"
MARKER = "mllm_export"  # the config.json key that says mllm wrote the folder
EXPORT_FORMAT = 1  # of the folder's layout and names; bumped if they change
EOT = "<|endoftext|>"
TEMP_INFIX = ".tmp-"
OLD_INFIX = ".old-"


# --- weights: mllm's names -> transformers' ------------------------------------------------------


def convert_weights(state_dict: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """mllm's state dict under the exported names, fused matrices split: qkv's rows are q, k, v
    (in that order: CausalSelfAttention splits them so), gate_up's are gate then up (SwiGLU's
    chunk). The head is tied to the token embedding, so it is not stored."""
    weights = dict(state_dict)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        return weights.pop(name).detach().cpu().contiguous()

    out["model.embed_tokens.weight"] = take("token_embedding.weight")
    out["model.embed_positions.weight"] = take("position_embedding.weight")
    for n in range(layers):
        source, target = f"blocks.{n}", f"model.layers.{n}"
        for part in ("weight", "bias"):
            out[f"{target}.input_layernorm.{part}"] = take(f"{source}.ln_attn.{part}")
            out[f"{target}.post_attention_layernorm.{part}"] = take(f"{source}.ln_ffn.{part}")
        q, k, v = take(f"{source}.attn.qkv.weight").chunk(3, dim=0)
        out[f"{target}.self_attn.q_proj.weight"] = q.contiguous()
        out[f"{target}.self_attn.k_proj.weight"] = k.contiguous()
        out[f"{target}.self_attn.v_proj.weight"] = v.contiguous()
        out[f"{target}.self_attn.o_proj.weight"] = take(f"{source}.attn.proj.weight")
        gate, up = take(f"{source}.ffn.gate_up.weight").chunk(2, dim=0)
        out[f"{target}.mlp.gate_proj.weight"] = gate.contiguous()
        out[f"{target}.mlp.up_proj.weight"] = up.contiguous()
        out[f"{target}.mlp.down_proj.weight"] = take(f"{source}.ffn.down.weight")
    out["model.norm.weight"] = take("ln_final.weight")
    out["model.norm.bias"] = take("ln_final.bias")
    if weights:  # the model grew a tensor this exporter does not know: fail, never drop it
        raise MllmError(f"internal error: no exported name for {sorted(weights)[:3]}")
    return out


# --- the folder's files ----------------------------------------------------------------------


def model_config_json(loaded: Any, eot_id: int, checkpoint: Path) -> dict[str, Any]:
    """config.json: what MllmConfig reads, auto_map (so transformers finds the remote code) and
    the `mllm_export` marker."""
    model = loaded.model
    config = loaded.config
    return {
        "architectures": ["MllmForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_mllm.MllmConfig",
            "AutoModel": "modeling_mllm.MllmModel",
            "AutoModelForCausalLM": "modeling_mllm.MllmForCausalLM",
        },
        "model_type": "mllm",
        "vocab_size": model.token_embedding.num_embeddings,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "max_position_embeddings": config.context,
        "layer_norm_eps": model.ln_final.eps,
        "attention_dropout": config.dropout,
        "hidden_dropout": config.dropout,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
        "dtype": str(model.token_embedding.weight.dtype).removeprefix("torch."),
        MARKER: {
            "format": EXPORT_FORMAT,
            "mllm_version": __version__,
            "checkpoint": str(checkpoint),
            "step": loaded.state.step,
        },
    }


def tokenizer_config_json(context: int) -> dict[str, Any]:
    """tokenizer_config.json: the fast tokenizer over tokenizer.json, with mllm's behaviour
    (the literal text "<|endoftext|>" is text: split_special_tokens)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOT,
        "pad_token": EOT,
        "model_max_length": context,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "padding_side": "left",
    }


def generation_config_json(eot_id: int) -> dict[str, Any]:
    return {"eos_token_id": eot_id, "pad_token_id": eot_id}


def model_card(loaded: Any, checkpoint: Path, out_name: str, eot_id: int) -> str:
    """README.md: what the model is, what it was trained on, how well, and how to load it."""
    state = loaded.state
    config = loaded.config
    data = state.data
    val = "not measured" if state.val_loss is None else f"{state.val_loss:.4f} nats/token"
    best = "" if state.best_val_loss is None else f" (best of the run: {state.best_val_loss:.4f})"
    params = loaded.model.num_parameters()
    size = f"{params / 1e6:.1f}M-parameter" if params >= 1e6 else f"{params:,}-parameter"
    new_tokens = min(40, config.context // 2)
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- mllm
- custom_code
---

# {out_name}

A {size} decoder-only GPT trained with mllm {state.mllm_version}, exported by
mllm {__version__} (`mllm export`, from `{checkpoint}`).

| | |
|---|---|
| data | pack `{data.pack_id}`, tokenizer sha256 `{data.tokenizer_sha256}` \
(vocab {data.vocab_size:,}) |
| training | step {state.step:,}, {state.tokens_seen:,} tokens seen, {state.dtype} |
| val loss | {val}{best} |
| shape | {config.layers} layers, width {config.d_model}, {config.heads} heads, \
SwiGLU {config.ffn_hidden}, context {config.context} |

Architecture: learned absolute positions, Pre-LN blocks with LayerNorm (with bias), multi-head
attention and a SwiGLU feed-forward without biases, output head tied to the token embedding.
No transformers architecture matches it, so the modelling code ships in this folder
(`modeling_mllm.py`, `configuration_mllm.py`: torch and transformers only).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{out_name}", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("{out_name}", trust_remote_code=True)
inputs = tokenizer("Once upon a time", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens={new_tokens}, do_sample=False)
print(tokenizer.decode(output[0], skip_special_tokens=True))
```

Limits: the prompt plus the new tokens must fit the context ({config.context} tokens; more is
an error). The literal text `{EOT}` is encoded as text, as mllm does; to mark the end of
a document, append `tokenizer.eos_token_id` ({eot_id}).
"""


# --- writing it ---------------------------------------------------------------------------------


def is_export(folder: Path) -> bool:
    """Whether `folder` holds an earlier export (its config.json has the marker)."""
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and MARKER in config


def check_out(out: Path) -> None:
    """Refuse an --out that exists and is not an earlier export."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder: give a new folder")
    if is_export(out):
        return
    raise UsageError(
        f"--out {out} exists and is not an mllm export (no {CONFIG} with '{MARKER}'): "
        "give a new folder, or remove it first"
    )


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_files(
    folder: Path, loaded: Any, checkpoint: Path, tokenizer_bytes: bytes, eot_id: int, name: str
) -> None:
    """Every file of the export into `folder` (the temporary one), each flushed to disk."""
    weights = convert_weights(loaded.model.state_dict(), loaded.config.layers)
    try:
        save_file(weights, folder / WEIGHTS, metadata={"format": "pt"})
    except OSError:
        raise
    except Exception as e:  # safetensors raises its own error type for a failed write
        raise OSError(f"{folder / WEIGHTS}: {e}") from None
    os.chmod(folder / WEIGHTS, 0o666 & ~current_umask())  # safetensors leaves it private (0600)
    fsync_file(folder / WEIGHTS)
    here = Path(__file__).parent
    for code in CODE_FILES:
        atomic_write_text(folder / code, (here / code).read_text(encoding="utf-8"))
    atomic_write_json(folder / CONFIG, model_config_json(loaded, eot_id, checkpoint))
    atomic_write_json(folder / GENERATION_CONFIG, generation_config_json(eot_id))
    (folder / TOKENIZER).write_bytes(tokenizer_bytes)
    fsync_file(folder / TOKENIZER)
    atomic_write_json(folder / TOKENIZER_CONFIG, tokenizer_config_json(loaded.config.context))
    atomic_write_text(folder / MODEL_CARD, model_card(loaded, checkpoint, name, eot_id))
    fsync_dir(folder)


def remove_leftovers(out: Path, keep: Path | None = None) -> None:
    """Temporary and replaced folders a killed export of `out` left beside it."""
    for prefix in (f".{out.name}{TEMP_INFIX}", f".{out.name}{OLD_INFIX}"):
        for stale in out.parent.glob(f"{prefix}*"):
            if stale != keep and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)


def export_run(config: ExportConfig) -> Path:
    """The `mllm export` command: write the folder, return its path."""
    from rich.markup import escape

    from mllm import console
    from mllm.data.tokenizer import eot_id as tokenizer_eot_id
    from mllm.train.checkpoint import (
        RUN_TOKENIZER,
        find_checkpoint,
        load_checkpoint,
        load_run_tokenizer,
        run_dir_of,
    )

    checkpoint = find_checkpoint(config.run_dir, config.checkpoint)
    out = config.out
    check_out(out)
    loaded = load_checkpoint(checkpoint)
    tokenizer_path = run_dir_of(checkpoint) / RUN_TOKENIZER
    if not tokenizer_path.is_file():
        raise MllmError(
            f"{tokenizer_path} not found: the run dir must hold the tokenizer it trained with "
            "(copy that tokenizer.json there)"
        )
    tokenizer = load_run_tokenizer(loaded, tokenizer_path)  # refuses another tokenizer
    eot_id = loaded.data.eot_id
    if eot_id is None:
        eot_id = tokenizer_eot_id(tokenizer)

    parent = ensure_writable_dir(out.parent)
    remove_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TEMP_INFIX}", dir=parent))
    try:
        with contextlib.suppress(OSError):
            tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide the folder from others
        write_files(tmp, loaded, checkpoint, tokenizer_path.read_bytes(), eot_id, out.name)
        swap_in_folder(tmp, out, out.parent / f".{out.name}{OLD_INFIX}")
    except OSError as e:
        raise MllmError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap
    console.info(
        escape(
            f"wrote {out} (a transformers folder of {checkpoint}, step {loaded.state.step:,}; "
            "load it with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))"
        )
    )
    return out
