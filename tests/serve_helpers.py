"""Fixtures for the serve tests: a tiny tokenizer, a tiny checkpointed run, a real server process.

The run is what `mllm train` leaves behind (checkpoints/step_N with state.json, tokenizer.json
beside it), built directly from a random tiny GPT so the tests need no training.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from tokenizers import Tokenizer, pre_tokenizers, trainers

from mllm.config import ModelConfig
from mllm.data.tokenizer import EOT, load_tokenizer, new_byte_level_bpe
from mllm.fileio import sha256_file
from mllm.model import GPT
from mllm.train.checkpoint import write_checkpoint

TEXT = """Once upon a time there was a little fox who lived in the woods near a river.
Every morning the fox ran to the water to drink, and every evening it ran home again.
One day it met an old owl who knew the names of all the stars in the sky.
The owl said: "If you listen well, I will teach you the names, one star each night."
The fox listened, and soon it knew more stars than any other animal in the forest.
Café, naïve, 你好 and emoji 🦊 keep the byte-level alphabet honest.
"""


def train_tiny_tokenizer(path: Path, vocab_size: int = 320, text: str = TEXT) -> Tokenizer:
    """A tokenizer like `mllm tokenize` makes (byte-level BPE, full 256-byte alphabet,
    <|endoftext|>), trained on a few lines; saved to `path` and loaded as serve loads it."""
    tokenizer = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(), trainer)
    tokenizer.save(str(path))
    return load_tokenizer(path)


def tiny_model(
    vocab_size: int,
    eot_id: int,
    context: int = 64,
    d_model: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
) -> GPT:
    """A random GPT whose next-token distributions are peaked (so greedy text varies) and which
    never picks end-of-text (so max_tokens, not chance, ends a completion).

    Why end-of-text never wins: the final LayerNorm's output minus its bias has zero mean over
    features, so with a constant bias b and the EOT embedding set to -c everywhere, the EOT
    logit is exactly -c·b·d_model whatever the input.
    """
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab_size, context=context, d_model=d_model, layers=layers, heads=heads
    )
    model = GPT(config).eval()
    with torch.no_grad():
        model.token_embedding.weight.mul_(10.0)
        model.ln_final.bias.fill_(1.0)
        model.token_embedding.weight[eot_id] = -1.0
    return model


def make_run(
    run_dir: Path,
    *,
    context: int = 64,
    d_model: int = 32,
    layers: int = 2,
    heads: int = 2,
    vocab_size: int = 320,
    step: int = 1,
    seed: int = 0,
    tokenizer_text: str = TEXT,
) -> Path:
    """A run dir with tokenizer.json and one checkpoint of a tiny random GPT; returns the
    checkpoint folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = run_dir / "tokenizer.json"
    tokenizer = train_tiny_tokenizer(tokenizer_path, vocab_size, tokenizer_text)
    eot_id = tokenizer.token_to_id(EOT)
    vocab = tokenizer.get_vocab_size()
    model = tiny_model(vocab, eot_id, context, d_model, layers, heads, seed)
    state = {
        "step": step,
        "model_config": model.config.model_dump(),
        "data": {
            "tokenizer_sha256": sha256_file(tokenizer_path),
            "vocab_size": vocab,
            "eot_id": eot_id,
            "pack_id": "serve-test",
            "dtype": "uint16",
        },
    }
    return write_checkpoint(run_dir, step, model, state)


LISTENING = re.compile(r"at (http://\S+)")


class ServerProcess:
    """`mllm serve` in a subprocess on a free loopback port (--port 0)."""

    def __init__(self, run_dir: Path, *args: str, log_path: Path | None = None) -> None:
        self.log_path = log_path or run_dir / "serve.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mllm",
                "serve",
                "--run-dir",
                str(run_dir),
                "--port",
                "0",
                *args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.url = self._wait_until_ready()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_until_ready(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            match = LISTENING.search(self.log())
            if match:
                url = match.group(1)
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        return url
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become ready:\n{self.log()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
