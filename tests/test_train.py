"""`mllm train` end to end on tiny models: the loss goes down, every artifact is where eval /
generate / serve look for it, bad values are one-line errors, retention keeps what it should."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures import (
    CLI_ENV,
    VOCAB,
    config_for,
    read_metrics,
    tiny_flags,
    val_losses,
    write_data_dir,
)
from mllm.cliargs import parse_config
from mllm.config import TrainConfig
from mllm.data.loader import TokenWindows
from mllm.errors import MllmError, UsageError
from mllm.train import checkpoint as ckpt
from mllm.train.checkpoint import DataPosition
from mllm.train.loop import train
from mllm.train.metrics import MetricsLog, read_records
from mllm.train.plan import total_steps_for
from mllm.train.resume import WindowStream, merge_resume_config, rank_micro_starts
from mllm.train.schedule import lr_at

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # in-process training on one thread

TRAIN_FIELDS = {"step", "loss", "lr", "tokens", "tokens_per_s", "mfu", "grad_norm", "elapsed"}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_data_dir(tmp_path / "data")
    return tmp_path / "data"


def test_cli_run_learns_and_writes_every_artifact(run_cli, data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "tiny"
    flags = tiny_flags(data_dir, run_dir, max_steps=40, ckpt_interval=10, keep_last=1)
    result = run_cli("train", *flags, env=CLI_ENV)
    assert result.returncode == 0, result.stderr
    assert "35,648 parameters" in result.stderr  # printed: the parameter count

    records = read_metrics(run_dir)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 41))
    assert all(r.keys() >= TRAIN_FIELDS for r in train_records)
    assert train_records[0]["cold"] and not any(r["cold"] for r in train_records[1:])
    assert [r["tokens"] for r in train_records[:2]] == [8 * 32, 2 * 8 * 32]
    first, last = np.mean([r["loss"] for r in train_records[:5]]), train_records[-1]["loss"]
    assert first > math.log(VOCAB) - 0.3 and last < first - 0.4  # it learns the Markov chain
    vals = val_losses(run_dir)
    assert [step for step, _ in vals] == [10, 20, 30, 40]
    assert vals[-1][1] < vals[0][1]
    config = config_for(data_dir, run_dir, max_steps=40)
    assert [r["lr"] for r in train_records] == [lr_at(s, config, 40) for s in range(40)]

    assert (run_dir / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((run_dir / "config.json").read_text())["model"]["vocab_size"] == VOCAB
    assert (run_dir / "data.json").read_bytes() == (data_dir / "data.json").read_bytes()
    assert (run_dir / "tokenizer.json").read_bytes() == (data_dir / "tokenizer.json").read_bytes()

    # Retention: the last one plus the best (val loss falls, so the best is the last here).
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_000040"]
    found = ckpt.find_checkpoint(run_dir)
    state = ckpt.read_state(found)
    assert state.step == 40 and state.tokens_seen == 40 * 8 * 32
    assert state.val_loss == state.best_val_loss == vals[-1][1]
    assert state.model.vocab_size == VOCAB
    assert state.data.pack_id == "pack-a" and state.data.eot_id == VOCAB - 1
    assert (
        state.data.tokenizer_sha256
        == json.loads((data_dir / "data.json").read_text())["tokenizer_sha256"]
    )
    assert state.data_position.windows_drawn == 40 * 8
    loaded = ckpt.load_checkpoint(found)  # what eval / generate / serve do
    assert loaded.model.num_parameters() == 35_648


def test_a_one_step_run_leaves_a_findable_checkpoint(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "one"
    result = train(config_for(data_dir, run_dir, max_steps=1, eval_interval=500))
    assert "never reaches --lr" in " ".join(capsys.readouterr().err.split())  # warmup 5 > 1 step
    assert result.exit_code == 0 and result.step == 1
    found = ckpt.find_checkpoint(run_dir)
    assert found.name == "step_000001" and found == result.checkpoint
    assert (
        json.loads((run_dir / "checkpoints" / "best.json").read_text())["checkpoint"] == found.name
    )
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 1]  # the train and the val record


def test_warmup_as_long_as_the_run_reaches_lr_without_a_warning(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_for(data_dir, tmp_path / "r", max_steps=2, warmup_steps=2, eval_interval=500)
    assert lr_at(1, config, 2) == config.lr
    train(config)
    assert "warning" not in capsys.readouterr().err


def test_best_checkpoint_survives_retention(data_dir: Path, tmp_path: Path) -> None:
    """A lr that makes the loss climb after step 4: the best stays, beside the last K."""
    run_dir = tmp_path / "best"
    config = config_for(
        data_dir,
        run_dir,
        max_steps=12,
        eval_interval=4,
        ckpt_interval=2,
        keep_last=2,
        lr=0.3,
        min_lr=0.3,
        warmup_steps=0,
        grad_clip=0,
    )
    train(config)
    vals = dict(val_losses(run_dir))
    best_step = min(vals, key=vals.get)
    kept = [p.name for p in ckpt.list_checkpoints(run_dir)]
    expected = sorted({f"step_{best_step:06d}", "step_000010", "step_000012"})
    assert kept == expected
    assert ckpt.find_checkpoint(run_dir).name == f"step_{best_step:06d}"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--d-model", "30", "--heads", "4"], "--d-model (30) must be divisible by --heads (4)"),
        (["--lr", "-0.1"], "--lr:"),
        (["--max-steps", "3", "--max-tokens", "1000"], "not both"),
        (["--batch-size", "0"], "--batch-size:"),
        (["--device", "cpu", "--dtype", "fp16"], "fp16 is not supported"),
    ],
)
def test_bad_flag_values_exit_2_with_one_line(
    run_cli, data_dir: Path, tmp_path: Path, flags: list[str], message: str
) -> None:
    result = run_cli(
        "train", "--data-dir", data_dir, "--run-dir", tmp_path / "r", *flags, env=CLI_ENV
    )
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_context_longer_than_the_data_is_a_bad_flag_value(tmp_path: Path) -> None:
    write_data_dir(tmp_path / "small", val_tokens=20)
    with pytest.raises(UsageError) as info:
        train(config_for(tmp_path / "small", tmp_path / "r", context=32))
    message = str(info.value)
    assert info.value.exit_code == 2 and "\n" not in message
    assert message.startswith("--context 32:") and "val.bin holds 20 tokens" in message
    assert "use --context 19 or less" in message
    assert not (tmp_path / "r").exists()


def test_vocab_size_smaller_than_the_data_is_refused(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--vocab-size 40 is smaller than the data's vocabulary"):
        train(config_for(data_dir, tmp_path / "r", vocab_size=40))
    # A larger one is fine (e.g. padded to a multiple of 64 for speed).
    result = train(config_for(data_dir, tmp_path / "r", vocab_size=64, max_steps=1))
    assert ckpt.read_state(result.checkpoint).model.vocab_size == 64


def test_missing_data_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MllmError, match="run `mllm pack"):
        train(config_for(tmp_path / "nothing", tmp_path / "r"))


def test_a_tokenizer_changed_after_pack_is_refused_for_a_new_run(
    data_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "r"
    train(config_for(data_dir, run_dir, max_steps=1))
    (data_dir / "tokenizer.json").write_text('{"another": "tokenizer"}')  # tokenize re-ran
    with pytest.raises(MllmError, match="did `mllm tokenize` run after `mllm pack`"):
        train(config_for(data_dir, tmp_path / "new", max_steps=1))
    assert not (tmp_path / "new").exists()
    # The run that has its copy resumes, keeping that copy.
    kept = (run_dir / "tokenizer.json").read_bytes()
    resumed = train(config_for(data_dir, run_dir, max_steps=2, resume=True))
    assert resumed.step == 2 and (run_dir / "tokenizer.json").read_bytes() == kept


def test_optimizer_options_given_to_resume_take_effect(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    first = {"weight_decay": 0.1, "beta2": 0.95, "muon_momentum": 0.9}
    train(config_for(data_dir, run_dir, max_steps=1, **first))
    given = {"weight_decay": 0.0, "beta2": 0.99, "muon_momentum": 0.8, "muon_lr": 0.01}
    resumed = train(config_for(data_dir, run_dir, max_steps=2, resume=True, **given))
    muon, adamw = ckpt.read_trainer_state(resumed.checkpoint)["optimizer"]["optimizers"]
    assert [g["weight_decay"] for g in adamw["param_groups"]] == [0.0, 0.0]
    assert all(tuple(g["betas"]) == (0.9, 0.99) for g in adamw["param_groups"])
    assert all(g["momentum"] == 0.8 and g["peak_lr"] == 0.01 for g in muon["param_groups"])


def test_resume_refuses_another_optimizer(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    train(config_for(data_dir, run_dir, max_steps=1, optimizer="adamw"))
    with pytest.raises(UsageError, match="trained with --optimizer adamw"):
        train(config_for(data_dir, run_dir, max_steps=2, resume=True, optimizer="muon"))


def test_a_resumed_runs_config_json_starts_a_new_run(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    train(config_for(data_dir, run_dir, max_steps=1))
    train(config_for(data_dir, run_dir, max_steps=2, resume=True))
    saved = json.loads((run_dir / "config.json").read_text())
    assert "resume" not in saved
    other = parse_config(
        TrainConfig,
        ["--run-dir", str(tmp_path / "other"), "--config", str(run_dir / "config.json")],
    )
    assert train(other).step == 2


def test_max_tokens_rounds_up_to_whole_steps(data_dir: Path, tmp_path: Path) -> None:
    config = config_for(data_dir, tmp_path / "r", max_steps=None, max_tokens=1000)
    assert total_steps_for(config, tokens_per_step=256) == 4
    assert total_steps_for(config.model_copy(update={"max_tokens": None}), 256) == 5000


def test_stride_walks_windows_in_order_and_wraps(tmp_path: Path) -> None:
    write_data_dir(tmp_path / "d", train_tokens=1000)
    windows = TokenWindows(tmp_path / "d" / "train.bin", "uint16", 32)
    stream = WindowStream(windows, global_batch=8, seed=0, stride=100)
    starts = np.concatenate([stream.next_starts() for _ in range(3)])
    assert list(starts[:10]) == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]
    assert starts[10] == 0  # 10 windows at stride 100 fit in 1000 tokens; then it wraps


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    stride=st.one_of(st.none(), st.integers(1, 50)),
    steps_before=st.integers(0, 5),
)
def test_window_stream_resumes_exactly(
    tmp_path_factory: pytest.TempPathFactory, seed: int, stride: int | None, steps_before: int
) -> None:
    """A stream restored from its saved (JSON round-tripped) state draws what the original draws."""
    folder = tmp_path_factory.getbasetemp() / "stream"
    if not (folder / "train.bin").exists():
        write_data_dir(folder, train_tokens=2000)
    windows = TokenWindows(folder / "train.bin", "uint16", 16)
    original = WindowStream(windows, 12, seed, stride)
    for _ in range(steps_before):
        original.next_starts()
    restored = WindowStream(windows, 12, seed=12345, stride=stride)
    saved = json.loads(original.state_dict().model_dump_json())
    restored.load_state_dict(DataPosition.model_validate(saved))
    for _ in range(3):
        assert np.array_equal(original.next_starts(), restored.next_starts())


@settings(max_examples=60, deadline=None)
@given(accum=st.integers(1, 4), world=st.integers(1, 4), batch=st.integers(1, 5), data=st.data())
def test_ranks_split_each_micro_step_like_one_big_process(
    accum: int, world: int, batch: int, data: st.DataObject
) -> None:
    """World size W with batch B sees, at every micro-step, exactly the windows one process with
    batch W*B sees: results do not depend on how many processes share a run."""
    starts = np.array(data.draw(st.permutations(range(accum * world * batch))))
    alone = rank_micro_starts(starts, accum, 1, 0)
    per_rank = [rank_micro_starts(starts, accum, world, rank) for rank in range(world)]
    for micro in range(accum):
        together = np.concatenate([per_rank[rank][micro] for rank in range(world)])
        assert np.array_equal(together, alone[micro])
        assert all(len(per_rank[rank][micro]) == batch for rank in range(world))


def test_metrics_log_drops_records_after_the_resume_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 8)]
    path.write_text("\n".join(lines) + '\n{"step": 8, "lo')  # a killed writer's half line
    assert len(read_records(path)) == 7
    log = MetricsLog(path)
    log.open(resume_step=5)
    log.write({"step": 6, "loss": 0.5})
    log.close()
    assert [r["step"] for r in read_records(path)] == [1, 2, 3, 4, 5, 6]
    fresh = MetricsLog(path)
    fresh.open(resume_step=None)
    fresh.close()
    assert path.read_text() == ""


def test_resume_config_keeps_the_saved_run_and_takes_explicit_options(tmp_path: Path) -> None:
    saved = config_for(tmp_path / "d", tmp_path / "r", max_steps=30, lr=0.01, min_lr=0.001)
    given_ = parse_config(
        TrainConfig, ["--resume", "--run-dir", str(tmp_path / "r"), "--max-tokens", "10000"]
    )
    merged = merge_resume_config(given_, saved)
    assert merged.model.d_model == 32 and merged.lr == 0.01 and merged.resume
    assert merged.max_tokens == 10_000 and merged.max_steps is None
    with pytest.raises(UsageError, match="--min-lr"):
        merge_resume_config(parse_config(TrainConfig, ["--resume", "--lr", "1e-4"]), saved)


def test_step_loss_matches_a_plain_forward(data_dir: Path, tmp_path: Path) -> None:
    """The first logged loss is the model's loss on the first batch at initialisation."""
    from mllm.model import GPT

    config = config_for(data_dir, tmp_path / "r", max_steps=1)
    train(config)
    first = read_metrics(tmp_path / "r")[0]["loss"]
    torch.manual_seed(config.seed)
    model = GPT(config.model.model_copy(update={"vocab_size": VOCAB}))
    assert config.zero_init_residual  # the default
    model.zero_residual_projections()
    windows = TokenWindows(data_dir / "train.bin", "uint16", 32)
    stream = WindowStream(windows, config.batch_size, config.seed, None)
    x, y = windows.gather(stream.next_starts())
    with torch.no_grad():
        assert model.loss(x, y).item() == first
