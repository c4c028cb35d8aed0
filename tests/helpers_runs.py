"""Test helpers shared by the eval / generate / textstream tests: a tiny byte-level BPE tokenizer,
a tiny packed data dir and a tiny random-weight run dir, built in a few hundred milliseconds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from mllm.config import ModelConfig
from mllm.fileio import atomic_write_json, sha256_file
from mllm.model import GPT
from mllm.train import checkpoint as ckpt

EOT = "<|endoftext|>"

SAMPLE_TEXTS = [
    "Once upon a time there was a little fox who lived in a green forest.",
    "The fox liked to run, to jump and to play with the birds every day.",
    "Un café crème, s'il vous plaît. Naïve façade, déjà vu, 你好世界, 🙂 emoji.",
    "One day the fox found a shiny red ball under a tall old tree.",
    "She was happy. The end.",
] * 4


def train_tiny_tokenizer(path: Path, vocab_size: int = 300, texts: list[str] | None = None) -> Path:
    """A byte-level BPE tokenizer (full 256-byte alphabet, <|endoftext|> special) saved at path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts or SAMPLE_TEXTS, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def load_test_tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def write_data_dir(
    data_dir: Path,
    tokenizer_path: Path,
    texts: list[str] | None = None,
    ids: list[int] | None = None,
) -> dict:
    """Pack `texts` (each followed by <|endoftext|>), or exactly the token `ids`, into train.bin
    and val.bin (the same tokens) with a data.json, the way `mllm pack` lays them out; returns
    data.json's contents."""
    tokenizer = load_test_tokenizer(tokenizer_path)
    eot_id = tokenizer.token_to_id(EOT)
    if ids is None:
        ids = []
        for text in texts or SAMPLE_TEXTS:
            ids += [*tokenizer.encode(text).ids, eot_id]
    data_dir.mkdir(parents=True, exist_ok=True)
    tokens = np.asarray(ids, dtype=np.uint16)
    for name in ("train", "val"):
        tokens.tofile(data_dir / f"{name}.bin")
    if tokenizer_path != data_dir / "tokenizer.json":
        shutil.copyfile(tokenizer_path, data_dir / "tokenizer.json")
    split = {"tokens": len(ids), "documents": len(texts or SAMPLE_TEXTS)}
    meta = {
        "format_version": 1,
        "tokenizer_sha256": sha256_file(tokenizer_path),
        "vocab_size": tokenizer.get_vocab_size(),
        "dtype": "uint16",
        "eot_id": eot_id,
        "train": {"file": "train.bin", **split},
        "val": {"file": "val.bin", **split},
        "pack_id": "test-pack",
    }
    atomic_write_json(data_dir / "data.json", meta)
    return meta


def write_tiny_run(
    run_dir: Path,
    tokenizer_path: Path,
    *,
    context: int = 32,
    d_model: int = 32,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    step: int = 1,
    zero_weights: bool = False,
) -> Path:
    """A run dir with one checkpoint of a random tiny GPT over the tokenizer's vocab (every
    weight zero with `zero_weights`: its prediction is then uniform over the vocab)."""
    tokenizer = load_test_tokenizer(tokenizer_path)
    vocab_size = tokenizer.get_vocab_size()
    config = ModelConfig(
        vocab_size=vocab_size, context=context, d_model=d_model, layers=layers, heads=heads
    )
    torch.manual_seed(seed)
    model = GPT(config)
    if zero_weights:
        for param in model.parameters():
            torch.nn.init.zeros_(param)
    state = {
        "step": step,
        "model_config": config.model_dump(),
        "data": {
            "tokenizer_sha256": sha256_file(tokenizer_path),
            "vocab_size": vocab_size,
            "eot_id": tokenizer.token_to_id(EOT),
            "pack_id": "test-pack",
            "dtype": "uint16",
        },
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_path, run_dir / "tokenizer.json")
    return ckpt.write_checkpoint(run_dir, step, model, state)
