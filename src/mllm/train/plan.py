"""Deciding a training run before any work: the resolved config (a resume takes the run's saved
one, with the options given now on top), how many steps it plans, and every refusal (a resume onto
another model shape or other data, a context longer than the data, a tokenizer changed after
packing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mllm.config import ModelConfig, TrainConfig
from mllm.console import info, warn
from mllm.data.datadir import tokenizer_path
from mllm.data.meta import DataMeta, check_bins, load_data_meta
from mllm.distributed import DistributedInfo, on_rank0
from mllm.errors import MllmError, UsageError
from mllm.train import checkpoint as ckpt
from mllm.train.budget import UNPLANNED, TimePlan
from mllm.train.resume import (
    check_same_data,
    check_same_model,
    checkpoint_to_resume,
    merge_resume_config,
)

DEFAULT_MAX_STEPS = 5000

T = TypeVar("T")


@dataclass(frozen=True)
class RunPlan:
    """What `decide_run` settled: the config to train with, and where it resumes from."""

    config: TrainConfig  # resolved: the saved config on --resume, vocab_size filled in
    meta: DataMeta
    resume_from: Path | None
    state: ckpt.RunState | None  # the checkpoint's, on --resume
    tokenizer_matches: bool | None  # DATA_DIR/tokenizer.json packed the bins (None: absent)
    tokens_per_step: int
    total_steps: int  # with --time-budget before its plan: the cap, or budget.UNPLANNED
    time_plan: TimePlan | None  # the saved plan of a --time-budget run being resumed

    @property
    def needs_time_plan(self) -> bool:
        """A --time-budget run that has not yet decided its length (train/budget.py)."""
        return self.config.time_budget is not None and self.time_plan is None


def decide_run(config: TrainConfig, dist_info: DistributedInfo) -> RunPlan:
    """Resolve the config (a resume takes the run's saved one, with the options given now on top)
    and refuse anything that does not fit together, before any work starts."""
    given = config.model_fields_set  # what was given explicitly (flags or --config file)
    resume = config.resume or config.resume_from is not None
    resume_from = on_rank0(
        lambda: checkpoint_to_resume(config.run_dir, resume, config.resume_from), dist_info
    )
    state = None
    if resume_from is not None:
        state = load_resume_file(lambda: ckpt.read_state(resume_from))
    if state is not None:
        config = merge_resume_config(config, state.train_config)

    config = resolve_fsdp(config, given, state, dist_info)

    meta = load_data_meta(config.data_dir)
    check_bins(config.data_dir, meta)
    tokenizer_matches = ckpt.tokenizer_packed_the_bins(config.data_dir, meta)
    if state is None and tokenizer_matches is False:
        raise MllmError(
            f"{tokenizer_path(config.data_dir)} is not the tokenizer the bins in "
            f"{config.data_dir} were packed with (did `mllm tokenize` run after `mllm pack`?): "
            f"re-run `mllm pack --data-dir {config.data_dir}`"
        )
    model_config = resolve_model_config(config.model, meta)
    if state is not None and resume_from is not None:
        check_same_model(model_config, state, resume_from)
        check_same_data(meta, config.data_dir, state, resume_from)
    for split in ("train", "val"):
        check_context_fits(config.data_dir, meta, split, model_config.context)
    config = config.model_copy(update={"model": model_config})

    tokens_per_step = config.batch_size * dist_info.world_size * config.grad_accum
    tokens_per_step *= model_config.context
    time_plan = state.time_plan if state is not None else None
    total_steps = total_steps_for(config, tokens_per_step, time_plan)
    if time_plan is not None and dist_info.is_main:
        info(
            f"--time-budget: continuing the run's plan of {time_plan.total_steps:,} steps "
            f"(made at step {time_plan.planned_at_step:,} for {time_plan.budget:g} s)"
        )
    if config.warmup_steps > total_steps and dist_info.is_main:  # warmup reaches lr at its end
        warn(
            f"--warmup-steps {config.warmup_steps} is more than the {total_steps} steps of the "
            "run: the learning rate never reaches --lr (lower --warmup-steps)"
        )
    return RunPlan(
        config, meta, resume_from, state, tokenizer_matches, tokens_per_step, total_steps, time_plan
    )


def resolve_fsdp(
    config: TrainConfig,
    given: set[str],
    state: ckpt.RunState | None,
    dist_info: DistributedInfo,
) -> TrainConfig:
    """--fsdp trains with AdamW: Muon orthogonalises each matrix whole, which FSDP holds in
    slices. A new run given --optimizer muon --fsdp is refused; one given --fsdp alone takes AdamW
    (with a warning). A Muon run resumed with --fsdp on several processes is refused. On one
    process --fsdp has nothing to shard and the run trains unsharded, so a plain `--resume` of an
    FSDP run without torchrun just works."""
    if not config.fsdp:
        return config
    sharded = dist_info.enabled
    if state is None and config.optimizer == "muon":
        if "optimizer" in given:
            raise UsageError(
                "--optimizer muon --fsdp: Muon needs each weight matrix whole, and FSDP shards "
                "them: use --optimizer adamw with --fsdp, or Muon without --fsdp (DDP)"
            )
        if dist_info.is_main:
            warn("--fsdp: training with --optimizer adamw (Muon needs each matrix whole)")
        config = config.model_copy(update={"optimizer": "adamw"})
    elif sharded and config.optimizer == "muon":
        raise UsageError(
            "--fsdp: this run trains with Muon, which needs each weight matrix whole and cannot "
            "be sharded: resume it without --fsdp (DDP), or start a new --run-dir"
        )
    if not sharded and dist_info.is_main:
        info("--fsdp: one process, nothing to shard: training unsharded")
    return config


def resolve_model_config(model: ModelConfig, meta: DataMeta) -> ModelConfig:
    """The model config with vocab_size filled from data.json; a smaller --vocab-size than the
    data's is refused (token ids would index past the embedding)."""
    if model.vocab_size is None:
        return model.model_copy(update={"vocab_size": meta.vocab_size})
    if model.vocab_size < meta.vocab_size:
        raise UsageError(
            f"--vocab-size {model.vocab_size} is smaller than the data's vocabulary "
            f"({meta.vocab_size}, from data.json): leave --vocab-size out to use the data's, or "
            "raise it"
        )
    return model


def check_context_fits(data_dir: Path, meta: DataMeta, split: str, context: int) -> None:
    """A --context that not even one window of the split can fill is a bad flag value (exit 2)."""
    tokens = meta.split(split).tokens
    if tokens < context + 1:
        longest = f"use --context {tokens - 1} or less, or " if tokens > 1 else ""
        raise UsageError(
            f"--context {context}: {meta.bin_path(data_dir, split)} holds {tokens} tokens, "
            f"fewer than one window (context + 1): {longest}pack more text"
        )


def total_steps_for(
    config: TrainConfig, tokens_per_step: int, time_plan: TimePlan | None = None
) -> int:
    """--max-steps, or --max-tokens rounded up to whole steps, or the default; with
    --time-budget, its plan (once made; until then UNPLANNED) capped by either of the two."""
    cap = None
    if config.max_steps is not None:
        cap = config.max_steps
    elif config.max_tokens is not None:
        cap = -(-config.max_tokens // tokens_per_step)
    if config.time_budget is not None:
        planned = time_plan.total_steps if time_plan is not None else UNPLANNED
        return planned if cap is None else min(planned, cap)
    return DEFAULT_MAX_STEPS if cap is None else cap


def load_resume_file(load: Callable[[], T]) -> T:
    """Read a file of the checkpoint being resumed; a damaged one names --resume-from."""
    try:
        return load()
    except ckpt.DamagedCheckpoint as e:
        raise MllmError(e.describe(resuming=True)) from None
