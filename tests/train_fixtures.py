"""Tiny packed data dirs and tiny-model flags for the training tests (a run takes about a second).

The token stream is a noisy first-order Markov chain over a small vocabulary: a model can learn it
within tens of steps, so "the loss goes down" is a real signal, not noise.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from mllm.cliargs import parse_config
from mllm.config import TrainConfig
from mllm.data.meta import DataMeta, SplitMeta
from mllm.fileio import sha256_file

VOCAB = 48
EOT_ID = VOCAB - 1


# Subprocesses: tiny models gain nothing from threads, which only contend on a shared machine.
# COLUMNS: rich wraps stderr at 80 columns when it is not a terminal, splitting one-line errors.
CLI_ENV = {"OMP_NUM_THREADS": "1", "COLUMNS": "400"}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """In-process training on one thread (imported by the test modules, so it applies there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def markov_tokens(count: int, seed: int) -> np.ndarray:
    """`count` tokens where each mostly follows from the one before it (one of 3 successors)."""
    rng = np.random.default_rng(seed)
    successors = np.random.default_rng(0).integers(0, VOCAB - 1, size=(VOCAB, 3))
    tokens = np.empty(count, dtype=np.uint16)
    token = 0
    for i in range(count):
        token = int(successors[token, rng.integers(0, 3)]) if rng.random() > 0.05 else EOT_ID
        tokens[i] = token
    return tokens


def write_data_dir(
    data_dir: Path,
    *,
    train_tokens: int = 20_000,
    val_tokens: int = 3_000,
    pack_id: str = "pack-a",
    seed: int = 0,
    tokenizer: bool = True,
) -> DataMeta:
    """train.bin, val.bin and data.json (plus a stand-in tokenizer.json whose sha256 data.json
    names) the way `mllm pack` lays them out."""
    data_dir.mkdir(parents=True, exist_ok=True)
    markov_tokens(train_tokens, seed).tofile(data_dir / "train.bin")
    markov_tokens(val_tokens, seed + 1).tofile(data_dir / "val.bin")
    tokenizer_path = data_dir / "tokenizer.json"
    if tokenizer:
        tokenizer_path.write_text(json.dumps({"stand-in": "tokenizer", "vocab": VOCAB}))
    meta = DataMeta(
        tokenizer_sha256=sha256_file(tokenizer_path) if tokenizer else "0" * 64,
        vocab_size=VOCAB,
        dtype="uint16",
        eot_id=EOT_ID,
        train=SplitMeta(file="train.bin", tokens=train_tokens, documents=1),
        val=SplitMeta(file="val.bin", tokens=val_tokens, documents=1),
        pack_id=pack_id,
    )
    (data_dir / "data.json").write_text(meta.model_dump_json(indent=2))
    return meta


def tiny_flags(data_dir: Path, run_dir: Path, **overrides: object) -> list[str]:
    """`mllm train` flags for a tiny fp32 CPU model; overrides use field names (max_steps=5)."""
    options: dict[str, object] = {
        "data_dir": data_dir,
        "run_dir": run_dir,
        "d_model": 32,
        "layers": 2,
        "heads": 2,
        "context": 32,
        "batch_size": 8,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 5,
        "max_steps": 30,
        "log_interval": 1,
        "eval_interval": 10,
        "eval_batches": 4,
        "ckpt_interval": 10,
        "device": "cpu",
        "dtype": "fp32",
        "compile": False,
    }
    options.update(overrides)
    flags: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def config_from_flags(flags: list[str | Path]) -> TrainConfig:
    """The TrainConfig the CLI builds from `flags` (in-process tests skip a subprocess's start-up);
    only the flags given count as explicitly set, as on the command line."""
    return parse_config(TrainConfig, [str(word) for word in flags])


def config_for(data_dir: Path, run_dir: Path, **overrides: object) -> TrainConfig:
    """`tiny_flags` as a TrainConfig."""
    return config_from_flags(tiny_flags(data_dir, run_dir, **overrides))


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def val_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r]
