"""`mllm eval`: window coverage, bits-per-byte arithmetic, determinism, split and data checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fixtures import train_tiny_tokenizer, write_data_dir, write_tiny_run
from mllm.cli import app
from mllm.config import EvalConfig
from mllm.data.tokenizer import EOT, load_tokenizer
from mllm.errors import MllmError
from mllm.evaluate import check_same_tokenizer, evaluate, resolve_split, window_plan
from mllm.textstream import byte_level_alphabet
from mllm.train.checkpoint import DataIdentity, load_checkpoint


def identity(meta, **changes: object) -> DataIdentity:
    """What a checkpoint that trained on `meta`'s data records of it, with `changes`."""
    return DataIdentity.of(meta).model_copy(update=changes)


def invoke(*args: object):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    write_tiny_run(run_dir, tokenizer_path, context=16, seed=3, step=5)
    return run_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Path:
    data_dir = tmp_path_factory.mktemp("data")
    write_data_dir(data_dir, tokenizer_path)
    return data_dir


def test_window_plan_covers_every_prediction_once() -> None:
    assert window_plan(2, 16) == (0, 1)
    assert window_plan(17, 16) == (1, 0)
    assert window_plan(18, 16) == (1, 1)
    assert window_plan(100, 16) == (6, 3)  # 6 * 16 + 3 = 99 predictions


def test_bits_per_byte_on_a_hand_checkable_case(tmp_path: Path, tokenizer_path: Path) -> None:
    """A model with every weight zero predicts uniformly: each token costs ln(V) nats. Tokens:
    EOT a b é(2 bytes as 2 tokens) EOT c -> 6 predictions (the first token is not predicted),
    standing for 1+1+1+1+0+1 = 5 bytes of text. So loss = ln V, bpb = 6·ln V / ln 2 / 5."""
    tokenizer = load_tokenizer(tokenizer_path)
    byte_id = {b: tokenizer.token_to_id(c) for c, b in byte_level_alphabet().items()}
    eot = tokenizer.token_to_id(EOT)
    e1, e2 = "é".encode()
    ids = [eot, byte_id[ord("a")], byte_id[ord("b")], byte_id[e1], byte_id[e2], eot]
    ids.append(byte_id[ord("c")])
    write_data_dir(tmp_path / "data", tokenizer_path, ids=ids)
    write_tiny_run(tmp_path / "run", tokenizer_path, context=4, weights="zero")

    config = EvalConfig(run_dir=tmp_path / "run", data_dir=tmp_path / "data", dtype="fp32")
    result = evaluate(config)
    vocab = tokenizer.get_vocab_size()
    assert (result.tokens, result.bytes, result.windows) == (6, 5, 2)  # 4 + a window of 2
    assert result.loss == pytest.approx(math.log(vocab), rel=1e-6)
    assert result.perplexity == pytest.approx(vocab, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(6 * math.log2(vocab) / 5, rel=1e-6)


def test_loss_is_the_mean_over_non_overlapping_windows(run: Path, data: Path) -> None:
    result = evaluate(EvalConfig(run_dir=run, data_dir=data, dtype="fp32", batch_size=3))
    model = load_checkpoint(run / "checkpoints/step_000005").model
    tokens = torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16).astype(np.int64))
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, 16):  # windows of 16 predictions, last shorter
            window = tokens[start : start + 17]
            logits = model(window[None, :-1])[0]
            total += F.cross_entropy(logits, window[1:], reduction="sum").item()
            count += len(window) - 1
    assert result.tokens == count == len(tokens) - 1
    assert result.loss == pytest.approx(total / count, rel=1e-5)
    assert result.windows == math.ceil((len(tokens) - 1) / 16)


def test_head_chunks_do_not_change_the_sum(run: Path, data: Path) -> None:
    from mllm.data.loader import TokenWindows
    from mllm.scoring import sum_nll

    model = load_checkpoint(run / "checkpoints/step_000005").model
    windows = TokenWindows(data / "val.bin", np.uint16, model.config.context)
    starts = np.arange(0, len(windows.tokens) - model.config.context - 1, 16)
    cpu = torch.device("cpu")
    whole = sum_nll(model, windows, starts, 4, cpu, torch.float32)
    chunked = sum_nll(model, windows, starts, 4, cpu, torch.float32, chunk_rows=7)
    assert chunked[1] == whole[1] == len(starts) * model.config.context
    assert chunked[0] == pytest.approx(whole[0], rel=1e-6)


def test_json_output_is_one_line_and_deterministic(run: Path, data: Path) -> None:
    args = ("eval", "--run-dir", run, "--data-dir", data, "--json")
    first, second = invoke(*args), invoke(*args, "--batch-size", "8")
    assert first.exit_code == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.count("\n") == 1
    report = json.loads(first.stdout)
    for key in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "checkpoint", "split"):
        assert key in report
    assert report["split"] == "val" and report["checkpoint"].endswith("step_000005")
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))


def test_table_max_tokens_and_train_split(run: Path, data: Path) -> None:
    result = invoke("eval", "--run-dir", run, "--data-dir", data, "--split", "train",
                    "--max-tokens", "20", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "bits per byte" in result.stdout and "train" in result.stdout
    assert "20" in result.stdout  # tokens scored
    capped = evaluate(EvalConfig(run_dir=run, data_dir=data, max_tokens=20, split="train"))
    assert capped.tokens == 20 and capped.windows == 2


def test_split_can_be_any_packed_bin(run: Path, data: Path, tmp_path: Path) -> None:
    by_name = evaluate(EvalConfig(run_dir=run, data_dir=data, dtype="fp32"))
    by_path = evaluate(EvalConfig(run_dir=run, split=str(data / "val.bin"), dtype="fp32"))
    assert by_path.loss == by_name.loss and by_path.split == str(data / "val.bin")

    lonely = tmp_path / "lonely.bin"
    lonely.write_bytes((data / "val.bin").read_bytes())
    result = invoke("eval", "--run-dir", run, "--split", lonely)
    assert result.exit_code == 1 and "no data.json beside it" in one_line(result.stderr)
    result = invoke("eval", "--run-dir", run, "--split", tmp_path / "missing.bin")
    assert result.exit_code == 1 and "not found" in one_line(result.stderr)
    result = invoke("eval", "--run-dir", run, "--data-dir", data, "--split", "test")
    assert result.exit_code == 2 and "--split" in result.stderr


def test_a_bin_given_by_path_is_checked_against_its_data_json(run: Path, data: Path, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(data / "data.json", copy / "data.json")
    (copy / "val.bin").write_bytes((data / "val.bin").read_bytes()[:100])  # cut short
    (copy / "other.bin").write_bytes((data / "val.bin").read_bytes())
    for name, words in [("val.bin", "holds 100 bytes but data.json says"),
                        ("other.bin", "does not describe other.bin")]:  # fmt: skip
        result = invoke("eval", "--run-dir", run, "--split", copy / name)
        assert result.exit_code == 1, result.stdout
        assert words in one_line(result.stderr)


def test_checkpoint_flag_picks_a_checkpoint(run: Path, data: Path, tmp_path: Path) -> None:
    other_run = tmp_path / "other"
    step = write_tiny_run(other_run, run / "tokenizer.json", context=16, seed=9, step=2)
    result = evaluate(EvalConfig(run_dir=run, checkpoint=step, data_dir=data))
    assert result.checkpoint == str(step) and result.step == 2


def test_data_packed_with_another_tokenizer_is_refused(run: Path, tmp_path: Path) -> None:
    other = train_tiny_tokenizer(tmp_path / "other.json", vocab_size=290)
    write_data_dir(tmp_path / "data", other)
    result = invoke("eval", "--run-dir", run, "--data-dir", tmp_path / "data")
    assert result.exit_code == 1
    assert result.stderr.startswith("error:")
    assert "packed with tokenizer sha256" in one_line(result.stderr)


def test_vocab_mismatch_is_refused(run: Path, data: Path) -> None:
    split = resolve_split(EvalConfig(run_dir=run, data_dir=data))
    trained_on = identity(split.meta, vocab_size=split.meta.vocab_size + 1)
    with pytest.raises(MllmError, match="vocab size"):
        check_same_tokenizer(split, trained_on, run)


def test_missing_data_and_run_dir_are_clear_errors(run: Path, tmp_path: Path) -> None:
    result = invoke("eval", "--run-dir", run, "--data-dir", tmp_path / "nodata")
    assert result.exit_code == 1 and "mllm pack" in one_line(result.stderr)
    result = invoke("eval", "--run-dir", tmp_path / "norun")
    assert result.exit_code == 1 and "does not exist" in one_line(result.stderr)
    result = invoke("eval", "--run-dir", run, "--batch-size", "0")
    assert result.exit_code == 2 and "--batch-size" in result.stderr


def test_data_from_another_pack_is_scored_with_a_warning(
    run: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    split = resolve_split(EvalConfig(run_dir=run, data_dir=data))
    check_same_tokenizer(split, identity(split.meta), run)
    assert "warning" not in capsys.readouterr().err
    check_same_tokenizer(split, identity(split.meta, pack_id="another-pack"), run)
    assert "not from the pack" in " ".join(capsys.readouterr().err.split())
