"""The GPU path, end to end on tiny models: `pytest -m cuda` (docs/gpu.md; benchmarks/gpu_check.sh
runs these first on a bare GPU machine). Every test here skips where torch sees no CUDA device,
so they are always collected and CI (CPU only) reports them as skipped.

What runs on the GPU: training steps in bf16 and in fp16 (with its GradScaler), eager and
compiled; a run killed with SIGKILL and resumed; eval; KV-cache greedy decoding against full
recomputation; the serve engine decoding a batch of prompts of different lengths. The losses of
bf16 runs are compared with tolerances, not bit for bit: GPU kernels (attention's backward among
them) may add in a different order from run to run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import (
    CLI_ENV,
    VOCAB,
    config_for,
    config_from_flags,
    greedy_by_full_recompute,
    read_metrics,
    start_training,
    tiny_flags,
    tiny_model,
    train_losses,
    train_tiny_tokenizer,
    val_losses,
    wait_for_step,
    write_data_dir,
    write_tiny_run,
)
from mllm.config import EvalConfig, ModelConfig
from mllm.data.tokenizer import EOT, load_tokenizer
from mllm.decode import Decoder
from mllm.evaluate import evaluate
from mllm.generate import fit_prompt, generate_ids
from mllm.model import GPT
from mllm.sampling import SamplingParams
from mllm.serve.engine import Completion, Engine, Event, Failed, Finished, TextDelta
from mllm.textstream import TextStream, token_byte_table
from mllm.train import checkpoint as ckpt
from mllm.train import train

HAS_CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False); docs/gpu.md"
    ),
]

GREEDY = SamplingParams(temperature=0)
# bf16 keeps 8 bits of mantissa (relative step 2^-8 ~ 0.004); losses of two bf16 runs that add in
# a different order drift apart by a few of those steps over a hundred updates.
BF16_LOSS = {"rtol": 0.02, "atol": 0.02}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_data_dir(tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture
def exact_fp32() -> Iterator[None]:
    """fp32 matmuls in full fp32 (no TF32): cached and uncached decoding agree token for token."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


# --- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_training_steps_learn_on_the_gpu(
    data_dir: Path, tmp_path: Path, dtype: str, compile: bool
) -> None:
    """mllm train's own loop on cuda: the loss falls, the checkpoint holds finite fp32 weights
    and names the precision; fp16 saves its GradScaler state for --resume."""
    run_dir = tmp_path / "run"
    config = config_for(
        data_dir, run_dir, device="cuda", dtype=dtype, compile=compile, max_steps=60
    )
    result = train(config)
    assert result.exit_code == 0 and result.step == 60

    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 61))
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(loss) for loss in losses)
    assert all(r["tokens_per_s"] > 0 for r in records)
    first = float(np.mean(losses[:5]))
    assert first > math.log(VOCAB) - 0.5
    assert losses[-1] < first - 0.3, losses  # it learns the Markov chain
    vals = val_losses(run_dir)
    assert vals and vals[-1][1] < vals[0][1]

    state = ckpt.read_state(result.checkpoint)
    assert state.step == 60 and state.dtype == dtype
    loaded = ckpt.load_checkpoint(result.checkpoint)
    for name, param in loaded.model.named_parameters():
        assert param.dtype == torch.float32 and torch.isfinite(param).all(), name
    scaler = ckpt.read_trainer_state(result.checkpoint)["scaler"]
    if dtype == "fp16":
        assert float(scaler["scale"]) > 0  # the GradScaler ran and its state is saved
    else:
        assert not scaler  # bf16 needs no scaler: a disabled one saves nothing


# --- resume after a kill -------------------------------------------------------------------------


def test_sigkill_then_resume_on_the_gpu_logs_the_same_losses(
    data_dir: Path, tmp_path: Path
) -> None:
    """bf16 with dropout (the CUDA RNG state is restored too), killed mid-run in a subprocess,
    then `--resume` in this process: the same steps, and losses within bf16 tolerance of a run
    that was never interrupted."""
    common = {
        "max_steps": 400,  # long enough that the kill lands mid-run on a fast GPU
        "ckpt_interval": 7,
        "eval_interval": 100,
        "dropout": 0.1,
        "device": "cuda",
        "dtype": "bf16",
    }
    reference = tmp_path / "reference"
    train(config_for(data_dir, reference, **common))

    killed = tmp_path / "killed"
    process = start_training(tiny_flags(data_dir, killed, **common), tmp_path)
    wait_for_step(process, killed, 15, timeout=180)  # the child's CUDA start-up included
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    stopped_at = ckpt.read_state(ckpt.latest_checkpoint(killed)).step
    assert stopped_at < 400, "the kill came after the run finished: nothing was tested"

    result = train(config_from_flags(["--run-dir", str(killed), "--resume"]))
    assert result.step == 400 and result.exit_code == 0
    resumed, expected = train_losses(killed), train_losses(reference)
    assert [s for s, _ in resumed] == [s for s, _ in expected] == list(range(1, 401))
    torch.testing.assert_close(
        torch.tensor([loss for _, loss in resumed]),
        torch.tensor([loss for _, loss in expected]),
        **BF16_LOSS,
    )
    resumed_val, expected_val = val_losses(killed), val_losses(reference)
    assert [s for s, _ in resumed_val] == [s for s, _ in expected_val]
    torch.testing.assert_close(
        torch.tensor([v for _, v in resumed_val]),
        torch.tensor([v for _, v in expected_val]),
        **BF16_LOSS,
    )


# --- eval ----------------------------------------------------------------------------------------


def test_eval_on_the_gpu_matches_the_cpu(tmp_path: Path, exact_fp32: None) -> None:
    """The same checkpoint and split: fp32 on the GPU gives the CPU's loss; bf16 autocast is
    within bf16 rounding of it. Through evaluate() and through `mllm eval --device cuda --json`."""
    tokenizer_path = train_tiny_tokenizer(tmp_path / "tok" / "tokenizer.json")
    write_data_dir(tmp_path / "data", tokenizer_path)
    write_tiny_run(tmp_path / "run", tokenizer_path, context=16, seed=3, step=5)

    def run(device: str, dtype: str):
        config = EvalConfig(
            run_dir=tmp_path / "run", data_dir=tmp_path / "data", device=device, dtype=dtype
        )
        return evaluate(config)

    cpu = run("cpu", "fp32")
    gpu = run("cuda", "fp32")
    gpu_bf16 = run("cuda", "bf16")
    assert (gpu.device, gpu.dtype, gpu_bf16.dtype) == ("cuda", "fp32", "bf16")
    assert (gpu.tokens, gpu.bytes, gpu.windows) == (cpu.tokens, cpu.bytes, cpu.windows)
    assert gpu.loss == pytest.approx(cpu.loss, rel=1e-4)
    assert gpu.bits_per_byte == pytest.approx(cpu.bits_per_byte, rel=1e-4)
    assert gpu_bf16.loss == pytest.approx(cpu.loss, rel=2e-2)

    command = [sys.executable, "-m", "mllm", "eval", "--run-dir", str(tmp_path / "run")]
    command += ["--data-dir", str(tmp_path / "data"), "--device", "cuda", "--dtype", "fp32"]
    done = subprocess.run(
        [*command, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **CLI_ENV},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed["device"] == "cuda"
    assert printed["loss"] == pytest.approx(cpu.loss, rel=1e-4)


# --- KV-cache decoding ---------------------------------------------------------------------------


def tiny_gpt(dtype: torch.dtype, context: int = 16, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=97, context=context, d_model=32, layers=2, heads=4)
    return GPT(config).to(device="cuda", dtype=dtype).eval()


@pytest.mark.parametrize(("prompt_len", "new_tokens"), [(1, 12), (5, 40), (45, 25)])
def test_cached_greedy_equals_full_recompute_on_the_gpu(prompt_len: int, new_tokens: int) -> None:
    """fp64 on the GPU (as the CPU test): no near-tie can flip a token, so any difference is a
    cache or position bug on the GPU path (slides included: context 16)."""
    model = tiny_gpt(torch.float64)
    prompt = torch.randint(0, 97, (prompt_len,), generator=torch.Generator().manual_seed(1))
    prompt = prompt.tolist()
    decoder = Decoder(model)
    assert decoder.device.type == "cuda" and decoder.cache.keys[0].dtype == torch.float64
    cached = list(generate_ids(decoder, fit_prompt(prompt, 16), GREEDY, new_tokens))
    assert cached == greedy_by_full_recompute(model, prompt, new_tokens)


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)
def test_each_cached_step_gives_the_full_forward_logits_on_the_gpu(
    dtype: torch.dtype, exact_fp32: None
) -> None:
    """Half-precision weights on the GPU: the cache is kept in the weights' dtype and each step's
    logits stay within that dtype's rounding of a full forward."""
    model = tiny_gpt(dtype)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        full = model(ids)[:, 3:].float()
    decoder = Decoder(model, batch_size=2)
    assert decoder.cache.keys[0].dtype == dtype
    logits = [decoder.prefill(ids[:, :4])]
    logits += [decoder.step(ids[:, position], position) for position in range(4, 16)]
    stepped = torch.stack(logits, 1).float()
    half = dtype != torch.float32
    tolerance = {"rtol": 0.05, "atol": 0.05} if half else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(stepped, full, **tolerance)


# --- the serve engine ----------------------------------------------------------------------------

PROMPTS = ["Once upon a time", "The fox", "Every morning the fox ran to the water to drink", "A"]


def reference_greedy(model: GPT, tokenizer, prompt: str, max_tokens: int) -> str:
    """Greedy decoding with full forward passes and no cache, on the model's device."""
    ids = tokenizer.encode(prompt).ids
    stream = TextStream(token_byte_table(tokenizer))
    device = model.head_weight.device
    text = []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids], device=device))[0, -1].argmax())
            ids.append(token)
            text.append(stream.push(token))
    return "".join(text) + stream.finish()


def decode_batch(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[list[Event]]:
    """Submit every prompt at once (greedy) and wait for each to finish; their events."""
    events: list[list[Event]] = [[] for _ in prompts]
    finished = [threading.Event() for _ in prompts]

    def emitter(index: int):
        def emit(event: Event) -> None:
            events[index].append(event)
            if isinstance(event, Finished | Failed):
                finished[index].set()

        return emit

    engine.submit(
        [Completion(ids, max_tokens, GREEDY, emitter(i)) for i, ids in enumerate(prompts)]
    )
    for done in finished:
        assert done.wait(60), "a sequence did not finish"
    return events


def test_serve_engine_decodes_a_batch_on_the_gpu(tmp_path: Path, exact_fp32: None) -> None:
    """Four prompts of different lengths share decode steps (per-row positions) on the GPU and
    each gets the text uncached greedy decoding gives; a bf16 engine decodes them too."""
    tokenizer = load_tokenizer(train_tiny_tokenizer(tmp_path / "tokenizer.json"))
    eot_id = tokenizer.token_to_id(EOT)
    cpu_model = tiny_model(
        tokenizer.get_vocab_size(), context=64, heads=2, weights="never_eot", eot_id=eot_id
    )
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(cpu_model).to(device="cuda", dtype=dtype).eval()
        engine = Engine(model, token_byte_table(tokenizer), eot_id, max_batch_size=4)
        assert engine.device.type == "cuda"
        engine.start()
        try:
            outcomes = decode_batch(engine, prompts, 10)
        finally:
            engine.stop()
        for prompt, events in zip(PROMPTS, outcomes, strict=True):
            assert events[-1] == Finished("length", 10), (dtype, events[-1])
            text = "".join(e.text for e in events if isinstance(e, TextDelta))
            if dtype == torch.float32:
                assert text == reference_greedy(model, tokenizer, prompt, 10)
        assert engine.stats.rows_decoded > engine.stats.steps  # rows really shared steps


def test_fsdp_shards_a_step_on_the_gpu(tmp_path: Path) -> None:
    """--fsdp's sharding (NCCL, one rank): the sharded step, gathered weights and optimizer
    state equal the unsharded ones (test_fsdp runs the same on gloo, and two ranks)."""
    from test_fsdp import check_sharded_step

    check_sharded_step(torch.device("cuda"), tmp_path / "rendezvous")
