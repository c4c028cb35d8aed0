"""Validated configs, one per command, plus the ModelConfig they share.

Each field's description is also its `--flag` help text (see cliargs.py), and each field name is
the flag's name in kebab-case, so a config file, a flag and the saved config use the same words.
Constraints live here, so a bad value fails before any work starts, with exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_DATA_DIR = Path("data")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}
DEFAULT_RUN_DIR = Path("runs/default")

DeviceName = Annotated[
    Literal["auto", "cuda", "mps", "cpu"],
    Field(description="Device: auto picks cuda > mps > cpu."),
]
DataDir = Annotated[
    Path,
    Field(description="Folder holding corpus.txt, tokenizer.json, train.bin, val.bin, data.json."),
]
RunDir = Annotated[Path, Field(description="Folder of one training run (checkpoints, metrics).")]
CorpusPath = Annotated[
    Path | None, Field(description="corpus.txt to read (default: DATA_DIR/corpus.txt).")
]
CheckpointPath = Annotated[
    Path | None,
    Field(description="A checkpoint folder to use (default: the run's best, else its latest)."),
]
TokenizerPath = Annotated[
    Path | None,
    Field(description="tokenizer.json to use (default: the one saved in the run dir)."),
]


def parse_duration(text: str) -> float:
    """Seconds from "90", "90s", "20m", "1.5h"."""
    value = text.strip().lower()
    scale = DURATION_UNITS.get(value[-1:])
    number = value[:-1] if scale is not None else value
    try:
        return float(number) * (scale or 1)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a duration: give seconds, or a number with s, m or h (90s, 20m, 2h)"
        ) from None


class CommandConfig(BaseModel):
    """Base of every command's config: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CorpusConfig(CommandConfig):
    """`mllm corpus`: stream public text into corpus.txt, one document per line."""

    data_dir: DataDir = DEFAULT_DATA_DIR
    output: Path | None = Field(
        None, description="corpus.txt to write (default: DATA_DIR/corpus.txt)."
    )
    source: list[str] = Field(
        default_factory=list,
        description="Replace or add a source: NAME=PATH (file, folder or glob; .jsonl/.json/"
        ".parquet rows with a 'text' column, any other file plain text) or NAME=HUB_ID[:CONFIG]. "
        "Repeatable.",
    )
    ratio: list[str] = Field(
        default_factory=list,
        description="Mixture weights: W1:W2:... in source order (default 4:4:2 for wikitext, "
        "fineweb, tinystories; added sources follow), and/or NAME=W per source; 0 leaves a "
        "source out. Repeatable.",
    )
    max_lines: int = Field(
        10_000_000, gt=0, description="Total documents to write, split by the ratio."
    )
    min_chars: int = Field(
        64, ge=0, description="Drop documents shorter than this many characters (normalised)."
    )
    seed: int = Field(42, description="Seed of the shuffle buffer and the interleaving.")
    shuffle_buffer: int = Field(
        10_000, ge=1, description="Documents held per source for shuffling."
    )

    @field_validator("source", "ratio", mode="before")
    @classmethod
    def _one_value_is_a_list(cls, value: object) -> object:
        """A config file may give one source or ratio as a plain string. An unquoted YAML 4:4:2
        arrives as a number (YAML 1.1 reads it in base 60), which would be silently wrong."""
        if isinstance(value, str):
            return [value]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError('give it as a quoted string, e.g. ratio: "4:4:2"')
        return value


class TokenizeConfig(CommandConfig):
    """`mllm tokenize`: train a byte-level BPE tokenizer on corpus.txt."""

    data_dir: DataDir = DEFAULT_DATA_DIR
    corpus: CorpusPath = None
    output: Path | None = Field(
        None, description="tokenizer.json to write (default: DATA_DIR/tokenizer.json)."
    )
    vocab_size: int = Field(
        16_000,
        ge=257,
        le=2**32,
        description="Exact vocabulary size, special tokens included (at least 256 bytes + 1).",
    )
    max_bytes: int | None = Field(
        None, gt=0, description="Train on at most this many bytes of corpus (whole lines)."
    )
    min_frequency: int = Field(2, ge=1, description="Minimum pair count for a merge.")


class PackConfig(CommandConfig):
    """`mllm pack`: encode corpus.txt into train.bin / val.bin token streams plus data.json."""

    data_dir: DataDir = DEFAULT_DATA_DIR
    corpus: CorpusPath = None
    tokenizer: Path | None = Field(
        None, description="tokenizer.json to use (default: DATA_DIR/tokenizer.json)."
    )
    output_dir: Path | None = Field(
        None, description="Folder for train.bin, val.bin, data.json (default: DATA_DIR)."
    )
    val_fraction: float = Field(0.01, gt=0, lt=1, description="Fraction of documents held out.")
    seed: int = Field(42, description="Seed of the document-level train/val split.")
    workers: int | None = Field(
        None, ge=1, description="Encoding processes (default: one per core)."
    )
    dtype: Literal["auto", "uint16", "uint32"] = Field(
        "auto", description="Token dtype of the bins (auto: uint16 when the vocab fits)."
    )
    force: bool = Field(
        False, description="Re-encode even when data.json shows the bins are up to date."
    )


class ModelConfig(CommandConfig):
    """Shape of the decoder-only GPT. Saved in every checkpoint; resume refuses a change."""

    vocab_size: int | None = Field(
        None, ge=2, description="Vocabulary size (default: data.json's vocab_size)."
    )
    context: int = Field(1024, ge=1, description="Context length: the position table's size.")
    d_model: int = Field(1024, ge=1, description="Width of the residual stream.")
    layers: int = Field(16, ge=1, description="Number of transformer blocks.")
    heads: int = Field(16, ge=1, description="Attention heads (d_model must divide by it).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention and residuals.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.d_model % self.heads:
            raise ValueError(
                f"--d-model ({self.d_model}) must be divisible by --heads ({self.heads})"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden size: 4·d·2/3 (same parameters as a 4·d GELU MLP), rounded up to 64."""
        hidden = (4 * self.d_model * 2) // 3
        return -(-hidden // 64) * 64


class TrainConfig(CommandConfig):
    """`mllm train`: train the GPT on train.bin, evaluating on val.bin."""

    data_dir: DataDir = DEFAULT_DATA_DIR
    run_dir: RunDir = DEFAULT_RUN_DIR
    model: ModelConfig = Field(default_factory=ModelConfig)
    batch_size: int = Field(16, ge=1, description="Sequences per step per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Optimizer steps to train (default 5000 unless --max-tokens or "
        "--time-budget; with --time-budget, a cap).",
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Token budget instead of --max-steps (rounded up to whole steps)."
    )
    time_budget: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Wall-clock budget of the whole command: seconds, or 90s / 20m / 2h. The run "
        "plans its steps so that its schedule ends, and it exits, within it.",
        json_schema_extra={"cli_type": "text"},
    )
    stride: int | None = Field(
        None, ge=1, description="Ordered windows at this stride (default: random windows)."
    )
    optimizer: Literal["adamw", "muon"] = Field(
        "muon",
        description="muon: Muon for the blocks' matrices, AdamW for embeddings and LayerNorms; "
        "adamw: AdamW for everything.",
    )
    lr: float = Field(
        1e-3, gt=0, description="Peak learning rate of AdamW (with muon: its embeddings, norms)."
    )
    min_lr: float = Field(
        1e-4, ge=0, description="Learning rate at the end of the schedule (Muon's: scaled alike)."
    )
    muon_lr: float = Field(0.02, gt=0, description="Peak learning rate of Muon's matrices.")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="Muon's (Nesterov) momentum.")
    muon_weight_decay: float = Field(0.0, ge=0, description="Muon's decoupled weight decay.")
    muon_ns_steps: int = Field(
        5, ge=1, le=20, description="Newton-Schulz iterations of each Muon update."
    )
    schedule: Literal["cosine", "wsd"] = Field(
        "wsd",
        description="wsd: warmup, constant, then a linear decay over the last --decay-fraction; "
        "cosine: warmup, then a cosine to --min-lr.",
    )
    decay_fraction: float = Field(
        0.3, gt=0, le=1, description="Fraction of the run the wsd schedule spends decaying."
    )
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.99, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the gradient norm to this (0: off).")
    zero_init_residual: bool = Field(
        True,
        description="Start the blocks' residual output projections (attention out, SwiGLU "
        "down) at zero: each block begins as the identity.",
    )
    eval_interval: int = Field(500, ge=1, description="Steps between validation evaluations.")
    eval_batches: int = Field(
        20,
        ge=1,
        description="Validation batches (of batch-size x processes windows) per evaluation; "
        "the same windows every time.",
    )
    ckpt_interval: int = Field(
        1000,
        ge=1,
        description="Steps between checkpoints (one is also saved at each new best val loss, at "
        "the end, and on SIGINT/SIGTERM).",
    )
    keep_last: int = Field(3, ge=1, description="Checkpoints kept (plus the best by val loss).")
    log_interval: int = Field(10, ge=1, description="Steps between metrics.jsonl records.")
    seed: int = Field(1337, description="Seed of initialisation and data order.")
    device: DeviceName = "auto"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Precision: auto picks bf16 where the hardware has it, else fp16/fp32."
    )
    compile: bool = Field(
        True, description="torch.compile the model and its loss (the first steps take longer)."
    )
    fsdp: bool = Field(
        False,
        description="Under torchrun: shard the weights, gradients and optimizer state over the "
        "processes (FSDP2) instead of replicating them (DDP); for a model whose training state "
        "does not fit one device. Trains with AdamW (Muon needs each matrix whole).",
    )
    activation_checkpointing: bool = Field(
        False,
        description="Keep only each block's input for the backward pass and recompute the rest: "
        "a step's activations take a fraction of the memory, for about a third more compute.",
    )
    tracker: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list,
        description="Also log metrics and the config to this experiment tracker: tensorboard "
        "or wandb (optional extras). Repeatable.",
    )
    resume: bool = Field(
        False,
        description="Continue the run in --run-dir from its latest checkpoint, with its saved "
        "config (options given now override it).",
    )
    resume_from: Path | None = Field(
        None,
        description="Continue the run from this checkpoint folder of --run-dir instead of the "
        "latest (e.g. when the latest is damaged); implies --resume.",
    )

    @model_validator(mode="after")
    def _lr_range(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        return self

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _budget_plans_in_warmup(self) -> TrainConfig:
        if self.time_budget is not None and self.schedule == "cosine" and self.warmup_steps < 5:
            raise ValueError(
                "--time-budget with --schedule cosine plans the run's steps during the warmup: "
                "give --warmup-steps 5 or more, or use --schedule wsd"
            )
        return self

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        if self.max_steps is not None and self.max_tokens is not None:
            raise ValueError("give --max-steps or --max-tokens, not both")
        return self


class EvalConfig(CommandConfig):
    """`mllm eval`: loss, perplexity and bits per byte of a checkpoint on a packed split."""

    run_dir: RunDir = DEFAULT_RUN_DIR
    checkpoint: CheckpointPath = None
    data_dir: DataDir = DEFAULT_DATA_DIR
    split: str = Field("val", description="val, train, or the path of any packed .bin.")
    max_tokens: int | None = Field(None, ge=1, description="Evaluate only the first N tokens.")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass.")
    device: DeviceName = "auto"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Precision of the forward pass."
    )
    json_output: bool = Field(
        False,
        description="Print one JSON object on stdout instead of a table.",
        json_schema_extra={"flag": "--json"},
    )
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks to run instead of the loss on --split: names "
        "(hub tasks need the hub) or paths of task YAML files, comma-separated or repeated.",
    )
    limit: int | None = Field(
        None, ge=1, description="With --tasks: at most N examples per task (a quick look)."
    )


class SamplingConfig(CommandConfig):
    """How tokens are drawn; shared by `generate` and the values `serve` accepts per request."""

    max_new_tokens: int = Field(200, ge=1, description="Tokens to generate per sample.")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature (0: greedy).")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens (0: off).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass, in (0, 1].")
    seed: int | None = Field(None, description="Seed for reproducible samples.")
    stop: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="Stop at this string (not empty). Repeatable."
    )


class GenerateConfig(SamplingConfig):
    """`mllm generate`: stream text from a trained checkpoint."""

    prompt: str = Field(..., min_length=1, description="Text to continue.")
    run_dir: RunDir = DEFAULT_RUN_DIR
    checkpoint: CheckpointPath = None
    tokenizer: TokenizerPath = None
    num_samples: int = Field(1, ge=1, description="Independent samples to draw.")
    device: DeviceName = "auto"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Precision of decoding (auto: fastest measured for the device)."
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for decoding (default: the cores other processes leave idle).",
    )


class ExportConfig(CommandConfig):
    """`mllm export`: a Hugging Face transformers model folder from a trained checkpoint."""

    run_dir: RunDir = DEFAULT_RUN_DIR
    checkpoint: CheckpointPath = None
    out: Path = Field(
        ...,
        description="Folder to write (missing parents are created; an earlier export there is "
        "replaced, any other folder is refused).",
    )


class ServeConfig(CommandConfig):
    """`mllm serve`: an OpenAI-compatible completions API over a trained checkpoint."""

    run_dir: RunDir = DEFAULT_RUN_DIR
    checkpoint: CheckpointPath = None
    tokenizer: TokenizerPath = None
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free port).")
    max_batch_size: int = Field(
        16, ge=1, description="Sequences decoded together at most (more wait their turn)."
    )
    max_waiting: int = Field(
        256,
        ge=1,
        description="Sequences that may wait for a free row; while that many wait, new requests "
        "get HTTP 503 with Retry-After.",
    )
    model_name: str | None = Field(
        None,
        min_length=1,
        description="Model id clients pass as `model` (default: the run dir's name).",
    )
    max_request_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body accepted (larger: HTTP 413)."
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for the model (default: the idle cores but one, left to HTTP).",
    )
    device: DeviceName = "auto"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Precision of decoding (auto: fastest measured for the device)."
    )
