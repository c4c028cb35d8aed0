"""--time-budget: the plan from timed steps (on a fake clock), its cap, resume, bad values."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures import CLI_ENV, config_for, one_error_line, read_metrics, tiny_flags, write_data_dir
from mllm.cliargs import parse_config
from mllm.config import TrainConfig
from mllm.errors import UsageError
from mllm.train import budget, loop
from mllm.train import checkpoint as ckpt
from mllm.train.plan import DEFAULT_MAX_STEPS, total_steps_for
from mllm.train.schedule import wsd_decay_start

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEP_SECONDS = 1.0
START_UP_SECONDS = 5.0  # imports and data before the first step
BATCH_SECONDS = 0.1  # one validation batch
CHECKPOINT_SECONDS = 0.4


class FakeClock:
    """The budget's clock, moved on by the work the run does (see `fake_clock`)."""

    def __init__(self) -> None:
        self.seconds = START_UP_SECONDS
        self.step_seconds = STEP_SECONDS  # a test may change the machine's speed mid-run
        self.steps = 0

    def advance(self, seconds: float) -> None:
        self.seconds += seconds


class Killed(Exception):
    """Stands for a SIGKILL: the process ends where it is, with what is on disk."""


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Each training step takes STEP_SECONDS, each validation batch BATCH_SECONDS and each
    checkpoint CHECKPOINT_SECONDS of fake time; the process started at 0."""
    clock = FakeClock()
    monkeypatch.setattr(budget, "now", lambda: clock.seconds)
    monkeypatch.setattr(budget, "process_elapsed", lambda: clock.seconds)
    real_step, real_nll, real_save = loop.train_step, loop.sum_nll, loop.save_checkpoint

    def step(*args, **kwargs):
        clock.advance(clock.step_seconds)
        clock.steps += 1
        return real_step(*args, **kwargs)

    def nll(model, windows, starts, batch_size, *args, **kwargs):
        clock.advance(BATCH_SECONDS * -(-len(starts) // batch_size))
        return real_nll(model, windows, starts, batch_size, *args, **kwargs)

    def save(*args, **kwargs):
        clock.advance(CHECKPOINT_SECONDS)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step)
    monkeypatch.setattr(loop, "sum_nll", nll)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    return clock


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_data_dir(tmp_path / "data")
    return tmp_path / "data"


def budget_config(data_dir: Path, run_dir: Path, **overrides: object) -> TrainConfig:
    options: dict[str, object] = {
        "time_budget": "1m",
        "max_steps": None,
        "log_interval": 1,
        "eval_interval": 20,
        "ckpt_interval": 15,
    }
    options.update(overrides)
    return config_for(data_dir, run_dir, **options)


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_the_run_ends_on_its_planned_last_step_at_min_lr_inside_the_budget(
    fake_clock: FakeClock, data_dir: Path, tmp_path: Path, schedule: str
) -> None:
    run_dir = tmp_path / "r"
    config = budget_config(data_dir, run_dir, schedule=schedule, warmup_steps=10)
    result = loop.train(config)
    records = read_metrics(run_dir)
    plans = [budget.TimePlan.model_validate(r["time_plan"]) for r in records if "time_plan" in r]
    plan = plans[-1]
    # wsd plans again at the first plan's decay start; the cosine cannot (it decays throughout)
    assert [p.replanned for p in plans] == ([False, True] if schedule == "wsd" else [False])
    assert plan.budget == 60.0 and plan.seconds_per_step == STEP_SECONDS
    if schedule == "cosine":  # its shape depends on the length after the warmup
        assert plan.planned_at_step <= config.warmup_steps
    assert result.exit_code == 0 and result.step == plan.total_steps
    train_records = [r for r in records if "loss" in r]
    assert train_records[-1]["step"] == plan.total_steps
    assert train_records[-1]["lr"] == pytest.approx(config.min_lr)
    assert max(r["lr"] for r in train_records) == pytest.approx(config.lr)
    # The whole run, start-up and the last evaluation and checkpoint included, fits ...
    assert fake_clock.seconds <= 60.0
    # ... and the plan used the budget rather than stopping early (a few seconds spare).
    assert fake_clock.seconds >= 60.0 - budget.EXIT_SECONDS - 0.01 * 60 - 3 * STEP_SECONDS
    state = ckpt.read_state(ckpt.latest_checkpoint(run_dir))
    assert state.time_plan == plan and state.total_steps == plan.total_steps


def test_max_steps_caps_the_plan(fake_clock: FakeClock, data_dir: Path, tmp_path: Path) -> None:
    result = loop.train(budget_config(data_dir, tmp_path / "r", max_steps=25))
    assert result.step == 25
    train_records = [r for r in read_metrics(tmp_path / "r") if "loss" in r]
    assert train_records[-1]["lr"] == pytest.approx(3e-4)  # the cap's schedule ends on time


def test_a_resume_after_a_kill_continues_the_same_plan_bitwise(
    fake_clock: FakeClock, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = loop.train(budget_config(data_dir, tmp_path / "whole"))

    fake_clock.seconds = START_UP_SECONDS  # the same process again, killed after step 45 (after
    # its re-plan at step 34: the first process plans, and plans again; a resume does neither)
    stepping = loop.train_step

    def step_then_die(*args, **kwargs):
        if (ckpt.latest_checkpoint(tmp_path / "cut") or tmp_path).name == "step_000045":
            raise Killed
        return stepping(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step_then_die)
    with pytest.raises(Killed):
        loop.train(budget_config(data_dir, tmp_path / "cut"))
    monkeypatch.setattr(loop, "train_step", stepping)

    fake_clock.seconds = 1000.0  # a later process: its clock must not change the plan
    resumed = loop.train(budget_config(data_dir, tmp_path / "cut", resume=True))
    assert resumed.step == whole.step
    plans = [r for r in read_metrics(tmp_path / "cut") if "time_plan" in r]
    assert len(plans) == 2  # planned, then re-planned, by the first process alone
    a, b = (load_file(p / ckpt.WEIGHTS) for p in (whole.checkpoint, resumed.checkpoint))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_time_budget_alone_is_not_capped_by_the_default_steps() -> None:
    config = parse_config(TrainConfig, ["--time-budget", "2h"])
    assert total_steps_for(config, 4096) == budget.UNPLANNED
    plan = budget.plan_steps(config, 10, 30.0, 0.05, 1.0, 1.0, cap=None)
    assert plan.total_steps > DEFAULT_MAX_STEPS


def test_plan_counts_evaluations_and_checkpoints() -> None:
    config = parse_config(TrainConfig, ["--time-budget", "100", "--eval-interval", "10"])
    cheap = budget.plan_steps(config, 10, 10.0, 1.0, 0.0, 0.0, cap=None)
    dear = budget.plan_steps(config, 10, 10.0, 1.0, 2.0, 0.5, cap=None)
    assert cheap.total_steps == 10 + int(100 - 10 - budget.EXIT_SECONDS - 1.0)
    assert dear.total_steps < cheap.total_steps
    steps = dear.total_steps - 10
    evals = dear.total_steps // 10 - 1 + 1
    assert steps + evals * 2.5 + (dear.total_steps // 1000 + 1) * 0.5 <= 100 - 10 - 3.0


@pytest.mark.parametrize("value", ["20m", "90s", "2h", "45", "1.5h"])
def test_durations(value: str) -> None:
    seconds = {"20m": 1200, "90s": 90, "2h": 7200, "45": 45, "1.5h": 5400}[value]
    assert parse_config(TrainConfig, ["--time-budget", value]).time_budget == seconds


def test_cosine_budget_needs_a_warmup_to_plan_in() -> None:
    with pytest.raises(UsageError, match="--warmup-steps 5 or more"):
        parse_config(
            TrainConfig, ["--time-budget", "60", "--schedule", "cosine", "--warmup-steps", "0"]
        )


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--time-budget", "0"], "--time-budget: Input should be greater than 0"),
        (["--time-budget", "-5"], "--time-budget: Input should be greater than 0"),
        (["--time-budget", "abc"], "--time-budget: 'abc' is not a duration"),
        (["--decay-fraction", "1.5"], "--decay-fraction: Input should be less than or equal to 1"),
        (["--muon-ns-steps", "0"], "--muon-ns-steps: Input should be greater than or equal to 1"),
        (["--optimizer", "sgd"], "--optimizer"),
        (["--schedule", "linear"], "--schedule"),
    ],
)
def test_bad_values_exit_2_with_one_line(
    run_cli, data_dir: Path, tmp_path: Path, flags: list[str], expected: str
) -> None:
    result = run_cli("train", *tiny_flags(data_dir, tmp_path / "r"), *flags, env=CLI_ENV)
    assert result.returncode == 2
    assert expected in one_error_line(result)
    assert not (tmp_path / "r").exists()


def test_cli_run_with_a_budget_records_its_plan(run_cli, data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    flags = tiny_flags(data_dir, run_dir, max_steps=None, time_budget="20s", eval_interval=1000)
    result = run_cli("train", *flags, env=CLI_ENV, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "steps planned at step" in result.stderr
    state = json.loads((ckpt.latest_checkpoint(run_dir) / "state.json").read_text())
    assert state["step"] == state["time_plan"]["total_steps"] == state["total_steps"]


@pytest.mark.parametrize("later_step_seconds", [0.5, 1.3], ids=["faster", "slower"])
def test_wsd_replans_at_its_decay_start_when_the_machine_changes_speed(
    fake_clock: FakeClock, data_dir: Path, tmp_path: Path, later_step_seconds: float
) -> None:
    """Steps twice as fast after the first plan: more steps, the constant phase goes on. 30 %
    slower: fewer, the decay starts at the re-plan. Either way the run still fits its budget, no
    learning rate already used changes, and none jumps."""
    real_step = loop.train_step

    def speed_changes(*args, **kwargs):
        if fake_clock.steps == 12:  # just after the first plan (at step 11: 8 % of the budget)
            fake_clock.step_seconds = later_step_seconds
        return real_step(*args, **kwargs)

    loop.train_step = speed_changes
    try:
        config = budget_config(data_dir, tmp_path / "r", eval_interval=100, ckpt_interval=100)
        result = loop.train(config)
    finally:
        loop.train_step = real_step
    records = read_metrics(tmp_path / "r")
    first, second = [
        budget.TimePlan.model_validate(r["time_plan"]) for r in records if "time_plan" in r
    ]
    assert second.replanned and second.planned_at_step == wsd_decay_start(config, first.total_steps)
    assert second.seconds_per_step == pytest.approx(later_step_seconds)
    if later_step_seconds < STEP_SECONDS:
        assert second.total_steps > first.total_steps and second.decay_start is None
    else:
        assert second.total_steps < first.total_steps
        assert second.decay_start == second.planned_at_step
    assert result.step == second.total_steps
    assert fake_clock.seconds <= 60.0
    lrs = [r["lr"] for r in records if "loss" in r]
    constant = lrs[config.warmup_steps : second.planned_at_step]  # steps before the re-plan
    assert constant == [pytest.approx(config.lr)] * len(
        constant
    )  # the constant phase lasted at least to the re-plan
    starts = second.decay_start or wsd_decay_start(config, second.total_steps)
    decay = lrs[starts - 1 :]  # from the last step at the peak (lrs[k]: step k's, 0-based)
    assert decay[0] == pytest.approx(config.lr) and lrs[-1] == pytest.approx(config.min_lr)
    drops = [a - b for a, b in itertools.pairwise(decay)]
    even = (config.lr - config.min_lr) / (second.total_steps - starts)
    assert drops == [pytest.approx(even)] * len(drops)  # a straight line down: no jump
