"""The one fixture layer of the tests (conftest.py exports its fixtures by name).

Builders of tiny artifacts, each made in well under a second, laid out as the mllm step that
makes the real one leaves it:
- `train_tiny_tokenizer`: tokenizer.json (byte-level BPE, full 256-byte alphabet, <|endoftext|>);
- `write_data_dir`: train.bin, val.bin, tokenizer.json and data.json (`mllm pack`);
- `tiny_model` + `write_run` (or both at once, `write_tiny_run`): a run dir with one checkpoint of
  a random-weight GPT (`mllm train`);
- `ServerProcess`: the real `mllm serve` in a subprocess (also used by benchmarks/bench_serve.py);
plus `mllm train` flags for tiny models, metrics readers, real-text helpers and the fixtures
`run_cli`, `shared_data`, `shared_data_extra` and `one_torch_thread`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import httpx
import numpy as np
import pytest
import torch

from mllm.cliargs import parse_config
from mllm.config import ModelConfig, TrainConfig
from mllm.data.datadir import DATA_JSON
from mllm.data.meta import DataMeta, SplitMeta
from mllm.data.tokenizer import EOT, load_tokenizer, new_byte_level_bpe
from mllm.fileio import atomic_write_json, sha256_file
from mllm.model import GPT
from mllm.train.checkpoint import DataIdentity, DataPosition, RunState, write_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SHARED_DATA_EXTRA = REPO_ROOT.parent / "shared" / "data-extra"

PACK_ID = "pack-a"  # of every tiny data dir and of the data every tiny run says it trained on

# Subprocesses: tiny models gain nothing from threads, which only contend on a shared machine.
# COLUMNS: rich wraps stderr at 80 columns when it is not a terminal, splitting one-line errors.
CLI_ENV = {"OMP_NUM_THREADS": "1", "COLUMNS": "400"}


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real English text); tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real text not found at {SHARED_DATA} (CI always has it)")
    return SHARED_DATA


@pytest.fixture
def shared_data_extra() -> Path:
    """../shared/data-extra (more real text); skipped where absent."""
    if not SHARED_DATA_EXTRA.is_dir():
        pytest.skip(f"extra text not found at {SHARED_DATA_EXTRA}")
    return SHARED_DATA_EXTRA


RunCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_cli(tmp_path: Path) -> RunCli:
    """Run the real `mllm` CLI (`python -m mllm ...`) in a subprocess, in tmp_path by default."""

    def run(
        *args: str | os.PathLike[str],
        cwd: Path | None = None,
        timeout: float = 600,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "mllm", *map(str, args)],
            cwd=cwd or tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            input=input,
        )

    return run


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """In-process training on one thread (modules that train ask for it with `usefixtures`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- tokenizer ---------------------------------------------------------------------------------

TEXTS = [
    "Once upon a time there was a little fox who lived in a green forest.",
    "The fox liked to run, to jump and to play with the birds every day.",
    "Un café crème, s'il vous plaît. Naïve façade, déjà vu, 你好世界, 🙂 emoji.",
    "One day the fox found a shiny red ball under a tall old tree.",
    "She was happy. The end.",
] * 4


def train_tiny_tokenizer(path: Path, vocab_size: int = 300, texts: list[str] = TEXTS) -> Path:
    """A tokenizer like `mllm tokenize` makes (its pipeline, the full 256-byte alphabet,
    <|endoftext|>), trained on `texts` and saved at `path`."""
    from tokenizers import pre_tokenizers, trainers

    tokenizer = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


# --- packed data dir ---------------------------------------------------------------------------

VOCAB = 48  # of the Markov data dirs
EOT_ID = VOCAB - 1


def markov_tokens(count: int, seed: int) -> np.ndarray:
    """`count` tokens where each mostly follows from the one before it (one of 3 successors): a
    tiny model learns the chain within tens of steps, so "the loss goes down" is a real signal."""
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
    tokenizer_path: Path | None = None,
    *,
    ids: list[int] | None = None,
    train_tokens: int = 20_000,
    val_tokens: int = 3_000,
    pack_id: str = PACK_ID,
) -> DataMeta:
    """train.bin, val.bin, tokenizer.json and data.json the way `mllm pack` lays them out.

    With `tokenizer_path`: both splits hold TEXTS, encoded, each followed by <|endoftext|> (or
    exactly the token `ids`). Without: Markov chains of `train_tokens` and `val_tokens` over VOCAB
    tokens, beside a stand-in tokenizer.json whose sha256 data.json names.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_path is None:
        train, val = markov_tokens(train_tokens, 0), markov_tokens(val_tokens, 1)
        tokenizer_path = data_dir / "tokenizer.json"
        tokenizer_path.write_text(json.dumps({"stand-in": "tokenizer", "vocab": VOCAB}))
        vocab_size, eot_id, documents = VOCAB, EOT_ID, 1
    else:
        tokenizer = load_tokenizer(tokenizer_path)
        vocab_size, eot_id, documents = tokenizer.get_vocab_size(), tokenizer.token_to_id(EOT), 1
        if ids is None:
            ids = [i for text in TEXTS for i in [*tokenizer.encode(text).ids, eot_id]]
            documents = len(TEXTS)
        train = val = np.asarray(ids, dtype=np.uint16)
        if tokenizer_path != data_dir / "tokenizer.json":
            shutil.copyfile(tokenizer_path, data_dir / "tokenizer.json")
    train.tofile(data_dir / "train.bin")
    val.tofile(data_dir / "val.bin")
    meta = DataMeta(
        tokenizer_sha256=sha256_file(tokenizer_path),
        vocab_size=vocab_size,
        dtype="uint16",
        eot_id=eot_id,
        train=SplitMeta(file="train.bin", tokens=len(train), documents=documents),
        val=SplitMeta(file="val.bin", tokens=len(val), documents=documents),
        pack_id=pack_id,
    )
    atomic_write_json(data_dir / DATA_JSON, meta.model_dump(mode="json"))
    return meta


# --- run dir -----------------------------------------------------------------------------------


def tiny_model(
    vocab_size: int,
    *,
    context: int = 32,
    d_model: int = 32,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    weights: Literal["random", "zero", "never_eot"] = "random",
    eot_id: int | None = None,
) -> GPT:
    """A GPT with random weights; "zero": every weight zero (its prediction is then uniform over
    the vocab); "never_eot": random, with peaked next-token distributions (so greedy text varies)
    and end-of-text (`eot_id`) never picked (so max_tokens, not chance, ends a completion).

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
        if weights == "zero":
            for param in model.parameters():
                torch.nn.init.zeros_(param)
        elif weights == "never_eot":
            assert eot_id is not None, "never_eot needs the eot_id"
            model.token_embedding.weight.mul_(10.0)
            model.ln_final.bias.fill_(1.0)
            model.token_embedding.weight[eot_id] = -1.0
    return model


def run_state(
    model_config: ModelConfig, data: DataIdentity, *, step: int = 1, tokens_seen: int = 0
) -> RunState:
    """The state.json of a checkpoint `mllm train` could have written at `step` (fresh data
    position, default train config around `model_config`)."""
    return RunState(
        step=step,
        tokens_seen=tokens_seen,
        total_steps=step,
        dtype="fp32",
        data_position=DataPosition(
            order="random", windows_drawn=0, generator=np.random.default_rng(0).bit_generator.state
        ),
        train_config=TrainConfig(model=model_config),
        data=data,
    )


def write_run(
    run_dir: Path, model: GPT, tokenizer_path: Path, *, step: int = 1, pack_id: str = PACK_ID
) -> Path:
    """A run dir as `mllm train` leaves it: tokenizer.json and checkpoints/step_N holding `model`
    and a state.json naming the tokenizer; returns the checkpoint folder."""
    tokenizer = load_tokenizer(tokenizer_path)
    data = DataIdentity(
        tokenizer_sha256=sha256_file(tokenizer_path),
        vocab_size=tokenizer.get_vocab_size(),
        eot_id=tokenizer.token_to_id(EOT),
        pack_id=pack_id,
        dtype="uint16",
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_path != run_dir / "tokenizer.json":
        shutil.copyfile(tokenizer_path, run_dir / "tokenizer.json")
    return write_checkpoint(run_dir, model, run_state(model.config, data, step=step))


def write_tiny_run(
    run_dir: Path,
    tokenizer_path: Path | None = None,
    *,
    step: int = 1,
    **model: object,
) -> Path:
    """`write_run` of a `tiny_model` (its keyword arguments in `model`) over the tokenizer's vocab;
    without `tokenizer_path`, a tiny tokenizer is trained into the run dir first."""
    if tokenizer_path is None:
        tokenizer_path = train_tiny_tokenizer(run_dir / "tokenizer.json")
    tokenizer = load_tokenizer(tokenizer_path)
    gpt = tiny_model(tokenizer.get_vocab_size(), eot_id=tokenizer.token_to_id(EOT), **model)
    return write_run(run_dir, gpt, tokenizer_path, step=step)


# --- a real server -----------------------------------------------------------------------------

LISTENING = re.compile(r"at (http://\S+)")


class ServerProcess:
    """`mllm serve --run-dir RUN_DIR --port 0 ARGS...` in a subprocess: started, its URL read from
    its start-up line, ready once /health answers 200; `stop()` (or leaving a `with`) ends it."""

    def __init__(
        self, run_dir: Path, *args: str, log_path: Path | None = None, timeout: float = 60.0
    ) -> None:
        self.log_path = log_path or run_dir / "serve.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
        command = [sys.executable, "-m", "mllm", "serve", "--run-dir", str(run_dir)]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [*command, "--port", "0", *args], stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        self.url = self._wait_until_ready(timeout)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_until_ready(self, timeout: float) -> str:
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


# --- mllm train on tiny models -----------------------------------------------------------------


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


# --- real text and the CLI's errors ------------------------------------------------------------


def write_paragraphs(source: Path, target: Path, max_bytes: int) -> list[str]:
    """corpus.txt from real text: one paragraph per line (whitespace runs made one space), at
    least 20 characters each, until about `max_bytes`; returns the documents written."""
    documents: list[str] = []
    size = 0
    for line in source.read_text(encoding="utf-8").splitlines():
        document = " ".join(line.split())
        if len(document) < 20:
            continue
        documents.append(document)
        size += len(document.encode()) + 1
        if size >= max_bytes:
            break
    target.write_text("".join(d + "\n" for d in documents), encoding="utf-8")
    return documents


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI's stderr must be exactly one line starting with 'error:'; return it."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), result.stderr
    return lines[0]


# --- training in a subprocess, and the decoding reference ------------------------------------


def start_training(flags: list[str], cwd: Path) -> subprocess.Popen[str]:
    """`mllm train FLAGS...` in a subprocess (to kill or signal mid-run)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mllm", "train", *flags],
        cwd=cwd,
        env={**os.environ, **CLI_ENV, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_step(
    process: subprocess.Popen[str], run_dir: Path, step: int, timeout: float = 120
) -> None:
    """Poll metrics.jsonl until a training record of `step` or later is there (and a checkpoint)."""
    from mllm.train.checkpoint import latest_checkpoint

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"training ended early: {process.communicate()[1]}"
        if latest_checkpoint(run_dir) is not None:
            try:
                if any(s >= step for s, _ in train_losses(run_dir)):
                    return
            except ValueError:  # a line being written
                pass
        time.sleep(0.005)
    raise AssertionError(f"step {step} not reached")


def greedy_by_full_recompute(model: GPT, prompt: list[int], new_tokens: int) -> list[int]:
    """The reference for cached decoding: no cache, the whole window through the model for every
    token, with the documented window policy (the last `context` tokens of the prompt; once the
    context is full, slide to the last `slide_keep(context)` tokens), on the model's device."""
    from mllm.generate import slide_keep

    context = model.config.context
    device = model.head_weight.device
    tokens, start, out = list(prompt), max(0, len(prompt) - context), []
    with torch.no_grad():
        for _ in range(new_tokens):
            if len(tokens) - start > context:
                start = len(tokens) - slide_keep(context)
            logits = model(torch.tensor([tokens[start:]], device=device))[0, -1]
            out.append(int(logits.argmax()))
            tokens.append(out[-1])
    return out
