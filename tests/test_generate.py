"""`mllm generate`: cached decoding equals full recomputation, sampling options, streaming CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fixtures import greedy_by_full_recompute, train_tiny_tokenizer, write_tiny_run
from mllm import device
from mllm.cli import app
from mllm.config import ModelConfig
from mllm.data.tokenizer import EOT, load_tokenizer
from mllm.decode import Decoder, onednn_bf16_linear, prepare_for_decoding
from mllm.device import ThreadChoice, decode_threads, usable_cpus
from mllm.generate import fit_prompt, generate_ids, slide_keep
from mllm.model import GPT
from mllm.sampling import SamplingParams
from mllm.textstream import TextStream, token_byte_table
from mllm.train.checkpoint import load_checkpoint

GREEDY = SamplingParams(temperature=0)


def tiny_gpt(context: int = 16, seed: int = 0, dtype: torch.dtype = torch.float64) -> GPT:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=97, context=context, d_model=32, layers=2, heads=4)
    return GPT(config).to(dtype).eval()


def greedy_with_cache(model: GPT, prompt: list[int], new_tokens: int) -> list[int]:
    decoder = Decoder(model)
    return list(generate_ids(decoder, fit_prompt(prompt, model.config.context), GREEDY, new_tokens))


@pytest.mark.parametrize(
    ("prompt_len", "new_tokens"),
    [(1, 12), (5, 40), (16, 30), (45, 25)],  # short; sliding several times; full; longer than C
)
def test_cached_greedy_equals_full_recompute(prompt_len: int, new_tokens: int) -> None:
    model = tiny_gpt()
    prompt = torch.randint(0, 97, (prompt_len,), generator=torch.Generator().manual_seed(1))
    prompt = prompt.tolist()
    assert greedy_with_cache(model, prompt, new_tokens) == greedy_by_full_recompute(
        model, prompt, new_tokens
    )


def test_each_cached_step_gives_the_full_forward_logits() -> None:
    model = tiny_gpt(dtype=torch.float32)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
    decoder = Decoder(model, batch_size=2)
    logits = [decoder.prefill(ids[:, :3])]
    logits += [decoder.step(ids[:, position], position) for position in range(3, 16)]
    torch.testing.assert_close(torch.stack(logits[:-1], 1), full[:, 2:15], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cache is full"):
        decoder.step(ids[:, 0], 16)


def test_decoding_layout_changes_memory_order_not_values() -> None:
    model = tiny_gpt(dtype=torch.float32)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(ids)
        weights = {name: p.clone() for name, p in model.named_parameters()}
        prepare_for_decoding(model)
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        assert torch.equal(param, weights[name])
    assert model.blocks[0].ffn.down.weight.stride() == (1, model.config.d_model)  # (in, out)
    cached = greedy_with_cache(model, [3, 4, 5], 30)
    assert cached == greedy_by_full_recompute(model, [3, 4, 5], 30)


def test_bf16_decoding_matches_the_full_forward() -> None:
    """bf16 weights: steps run through oneDNN-packed weights where the CPU has native bf16 (else
    F.linear) and attend in fp32; the logits stay within bf16 rounding of the full forward."""
    model = prepare_for_decoding(tiny_gpt(dtype=torch.float32).to(torch.bfloat16))
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(5))
    decoder = Decoder(model)
    assert decoder.cache.keys[0].dtype == torch.float32
    logits = [decoder.prefill(ids[:, :4])]
    logits += [decoder.step(ids[:, position], position) for position in range(4, 16)]
    with torch.no_grad():
        full = model(ids)[:, 3:].float()
    torch.testing.assert_close(torch.stack(logits, 1).float(), full, rtol=0.05, atol=0.05)


def test_packed_bf16_linear_equals_f_linear() -> None:
    model = tiny_gpt(dtype=torch.bfloat16)
    linear = onednn_bf16_linear(model, batch_size=2)
    if linear is None:
        pytest.skip("no oneDNN bf16 on this CPU / PyTorch build: decoding uses F.linear")
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    for weight in (model.blocks[0].attn.qkv.weight, model.head_weight):
        torch.testing.assert_close(linear(x, weight), F.linear(x, weight), rtol=0.02, atol=0.02)
    assert onednn_bf16_linear(tiny_gpt(dtype=torch.float32), 1) is None


def test_slide_keeps_three_quarters_of_the_context() -> None:
    assert [slide_keep(c) for c in (1, 2, 4, 16, 256, 1024)] == [1, 1, 3, 12, 192, 768]
    assert fit_prompt([1, 2, 3, 4, 5], 3) == [3, 4, 5]


def test_end_of_text_ends_the_sample_and_is_not_yielded() -> None:
    model = tiny_gpt()
    first = greedy_with_cache(model, [1, 2, 3], 1)[0]
    assert list(generate_ids(Decoder(model), [1, 2, 3], GREEDY, 10, eot_id=first)) == []


def test_seeded_sampling_is_reproducible_and_top_k_one_is_greedy() -> None:
    model = tiny_gpt()
    params = SamplingParams(temperature=1.0)

    def draw(seed: int, sampling: SamplingParams = params) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return list(generate_ids(Decoder(model), [5, 6], sampling, 20, gen))

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    greedy = greedy_with_cache(model, [5, 6], 20)
    assert draw(3, SamplingParams(temperature=2.0, top_k=1)) == greedy
    assert draw(3, SamplingParams(temperature=2.0, top_p=1e-6)) == greedy


# --- the CLI -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir with two checkpoints (step 1 and, latest, step 2) of random tiny GPTs."""
    root = tmp_path_factory.mktemp("gen")
    tokenizer = train_tiny_tokenizer(root / "tokenizer.json")
    run_dir = root / "run"
    write_tiny_run(run_dir, tokenizer, seed=1, step=1)
    write_tiny_run(run_dir, tokenizer, seed=2, step=2)
    return run_dir


def expected_greedy_text(checkpoint: Path, prompt: str, new_tokens: int, stop=()) -> str:
    """What greedy decoding of `checkpoint` prints after the prompt, computed in-process."""
    loaded = load_checkpoint(checkpoint)
    tokenizer = load_tokenizer(checkpoint.parent.parent / "tokenizer.json")
    ids = generate_ids(
        Decoder(prepare_for_decoding(loaded.model)),
        fit_prompt(tokenizer.encode(prompt).ids, loaded.config.context),
        GREEDY,
        new_tokens,
        eot_id=tokenizer.token_to_id(EOT),
    )
    stream = TextStream(token_byte_table(tokenizer), stop)
    text = ""
    for token in ids:
        text += stream.push(token)
        if stream.stopped:
            break
    return text + stream.finish()


def test_cli_streams_prompt_and_greedy_text_to_stdout(run_cli, run: Path) -> None:
    result = run_cli(
        "generate", "Once upon a time", "--run-dir", run, "--temperature", "0",
        "--max-new-tokens", "30", "--device", "cpu", "--dtype", "fp32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = expected_greedy_text(run / "checkpoints/step_000002", "Once upon a time", 30)
    assert result.stdout == "Once upon a time" + expected + "\n"
    assert "step_000002" in result.stderr and "tokens/s" in result.stderr


def invoke(*args: object):
    """The CLI in-process (much faster than a subprocess; stdout and stderr kept apart)."""
    return CliRunner().invoke(app, [str(arg) for arg in args])


def one_line(text: str) -> str:
    """Error text with the terminal's wrapping undone."""
    return " ".join(text.split())


def test_cli_checkpoint_stop_and_quiet(run: Path) -> None:
    step1 = run / "checkpoints/step_000001"
    full = expected_greedy_text(step1, "The fox", 40)
    stop = full[10:13]
    assert stop and stop in full
    result = invoke(
        "generate", "The fox", "--run-dir", run, "--checkpoint", step1, "--temperature", "0",
        "--max-new-tokens", "40", "--stop", "never-there", "--stop", stop, "--quiet",
        "--dtype", "fp32",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "The fox" + full[: full.index(stop)] + "\n"
    assert result.stderr == ""


def test_cli_max_new_tokens_and_latest_checkpoint(run: Path) -> None:
    result = invoke("generate", "The fox", "--run-dir", run, "--temperature", "0",
                    "--max-new-tokens", "7", "--dtype", "fp32")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    expected = expected_greedy_text(run / "checkpoints/step_000002", "The fox", 7)
    assert result.stdout == "The fox" + expected + "\n"
    assert "7 tokens" in result.stderr


def test_cli_threads_flag_sets_the_decode_threads(run: Path) -> None:
    before = torch.get_num_threads()
    try:
        args = ("--threads", "1", "--max-new-tokens", "3")
        result = invoke("generate", "Hi", "--run-dir", run, *args)
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.stderr
    assert "cpu" in result.stderr and "1 thread (--threads)" in result.stderr


def test_decode_threads_default_to_the_idle_cores() -> None:
    assert decode_threads(3) == ThreadChoice(3, "--threads")
    assert 1 <= decode_threads().count <= len(usable_cpus())


@pytest.mark.parametrize(
    ("busy", "reserved", "expected"),
    [
        (0.0, 0, (8, "8 of 8 cores idle now")),
        (0.3, 1, (7, "8 of 8 cores idle now, 1 kept for HTTP")),
        (2.6, 0, (5, "5 of 8 cores idle now")),
        (2.6, 1, (4, "5 of 8 cores idle now, 1 kept for HTTP")),
        (7.8, 1, (1, "0 of 8 cores idle now, 1 kept for HTTP")),
        (None, 0, (8, "every core")),
        (None, 1, (7, "every core, 1 kept for HTTP")),
    ],
)
def test_decode_threads_are_the_cores_idle_now_less_the_reserved(
    monkeypatch: pytest.MonkeyPatch, busy: float | None, reserved: int, expected: tuple
) -> None:
    monkeypatch.setattr(device, "usable_cpus", lambda: list(range(8)))
    monkeypatch.setattr(device, "busy_cpus_now", lambda cpus: busy)
    assert decode_threads(reserved=reserved) == ThreadChoice(*expected)


def test_busy_cpus_now_sees_a_busy_process() -> None:
    """A process spinning on one CPU shows as that CPU busy right now (the load average, used
    before, lags by a minute both ways)."""
    cpu = usable_cpus()[-1]
    if device.busy_cpus_now([cpu]) is None:
        pytest.skip("no /proc/stat on this OS: decoding uses every core")
    code = f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    spin = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.3)
        busy = device.busy_cpus_now([cpu], sample_s=0.3)
    finally:
        spin.kill()
        spin.wait()
    assert busy is not None and busy > 0.8


def test_cli_seeded_samples_are_reproducible(run: Path) -> None:
    args = ("generate", "The fox", "--run-dir", run, "--seed", "7", "--top-k", "50")
    args += ("--top-p", "0.9", "--temperature", "1.3", "--max-new-tokens", "15", "-q")
    two = invoke(*args, "--num-samples", "2")
    one = invoke(*args, "--num-samples", "1")
    assert two.exit_code == 0 and one.exit_code == 0, two.stderr + one.stderr
    samples = two.stdout.split("---\n")
    assert len(samples) == 2 and all(s.startswith("The fox") for s in samples)
    assert samples[0] == one.stdout  # sample 1 does not depend on --num-samples
    assert samples[0] != samples[1]


def test_cli_long_prompt_is_cut_with_a_warning_and_bf16_runs(run: Path) -> None:
    prompt = "the fox runs and jumps " * 30  # far more tokens than the context of 32
    result = invoke(
        "generate", prompt, "--run-dir", run, "--max-new-tokens", "40", "--dtype", "bf16",
        "--device", "cpu", "--seed", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "longer than the model's context" in one_line(result.stderr)
    assert result.stdout.startswith(prompt)


def test_cli_tokenizer_override(run: Path, tmp_path: Path) -> None:
    same = tmp_path / "same.json"
    shutil.copyfile(run / "tokenizer.json", same)
    other = train_tiny_tokenizer(tmp_path / "other.json", vocab_size=280)
    ok = invoke("generate", "Hi", "--run-dir", run, "--tokenizer", same, "--max-new-tokens", "3")
    assert ok.exit_code == 0, ok.stderr
    bad = invoke("generate", "Hi", "--run-dir", run, "--tokenizer", other)
    assert bad.exit_code == 1
    assert bad.stderr.startswith("error:") and bad.stdout == ""
    assert "is not the one this model was trained with" in one_line(bad.stderr)


def test_cli_missing_run_dir_is_one_clear_error(tmp_path: Path) -> None:
    result = invoke("generate", "Hi", "--run-dir", tmp_path / "nope")
    assert result.exit_code == 1
    assert result.stderr.startswith("error:") and "does not exist" in one_line(result.stderr)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--temperature", "-0.5"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-k", "-1"], "--top-k"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--num-samples", "0"], "--num-samples"),
        (["--threads", "0"], "--threads"),
        (["--stop", ""], "--stop"),
    ],
)
def test_invalid_sampling_values_exit_2(args: list[str], flag: str, tmp_path: Path) -> None:
    result = invoke("generate", "Hi", "--run-dir", tmp_path, *args)
    assert result.exit_code == 2
    assert flag in result.output


def test_empty_prompt_exits_2(tmp_path: Path) -> None:
    result = invoke("generate", "", "--run-dir", tmp_path)
    assert result.exit_code == 2
    assert "PROMPT" in result.output


def test_a_reader_that_leaves_early_ends_generation_quietly(run: Path) -> None:
    """`mllm generate ... | head -c 10`: the closed pipe stops decoding, with no error."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mllm", "generate", "Once upon a time", "--run-dir", str(run),
         "--max-new-tokens", "5000", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.read(10)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0, stderr
    assert "error" not in stderr and "Traceback" not in stderr
