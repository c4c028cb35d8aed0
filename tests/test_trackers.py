"""`mllm train --tracker tensorboard|wandb`: what each tracker received, read back from its own
files (TensorBoard's event files, wandb's offline run file) and compared with metrics.jsonl and
config.json; a resumed run continues both; a tracker that cannot start or fails only warns."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures import config_from_flags, read_metrics, tiny_flags, write_data_dir
from mllm.train import checkpoint as ckpt
from mllm.train import trackers
from mllm.train.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # in-process training on one thread

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None
needs_tensorboard = pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard not installed")
needs_wandb = pytest.mark.skipif(not HAS_WANDB, reason="wandb not installed")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_data_dir(tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """wandb offline and silent, its settings and caches in tmp_path, none of the caller's own
    WANDB_* choices; its singleton torn down after, so the next test reads this environment."""
    for name in trackers.WANDB_ENV.values():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        wandb.teardown()


def tracked_config(
    data_dir: Path, run_dir: Path, *tracker: str, extra: tuple[str, ...] = (), **over
):
    flags = tiny_flags(data_dir, run_dir, **{"max_steps": 12, "eval_interval": 5, **over})
    for name in tracker:
        flags += ["--tracker", name]
    return config_from_flags([*flags, *extra])


def numbers(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as a tracker should have it: (step, value) of every number, by name."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in trackers.scalars(record).items():
            series.setdefault(key, []).append((record["step"], value))
    return series


# --- TensorBoard ---------------------------------------------------------------------------------


def tensorboard_scalars(run_dir: Path) -> tuple[Any, dict[str, list[tuple[int, float]]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        str(run_dir / trackers.TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0}
    )
    events.Reload()  # every event file of the folder, with the purges a resume asked for
    scalars = {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }
    return events, scalars


def assert_same_series(got: dict, expected: dict, rel: float) -> None:
    assert got.keys() == expected.keys()
    for tag, series in expected.items():
        assert [step for step, _ in got[tag]] == [step for step, _ in series], tag
        assert [value for _, value in got[tag]] == pytest.approx(
            [value for _, value in series], rel=rel
        ), tag


@needs_tensorboard
def test_tensorboard_has_every_metric_and_the_config(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(tracked_config(data_dir, run_dir, "tensorboard"))

    events, scalars = tensorboard_scalars(run_dir)
    expected = numbers(read_metrics(run_dir))
    assert {"loss", "val_loss", "lr", "tokens_per_s", "mfu", "grad_norm"} <= expected.keys()
    assert [step for step, _ in scalars["loss"]] == list(range(1, 13))
    assert_same_series(scalars, expected, rel=1e-6)  # TensorBoard keeps float32

    config_json = json.loads((run_dir / ckpt.RUN_CONFIG).read_text())
    (text,) = events.Tensors("config/text_summary")
    assert json.loads(text.tensor_proto.string_val[0].decode()) == config_json
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["model.d_model"].number_value == 32
    assert hparams["run_dir"].string_value == str(run_dir)
    assert json.loads(hparams["tracker"].string_value) == ["tensorboard"]


# --- wandb ---------------------------------------------------------------------------------------


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of a .wandb file: wandb's LevelDB-style log (a 7-byte ':W&B' header,
    then 32 KiB blocks of chunks: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending = 32768, 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # too short for a chunk header: zero padding to the next block
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_offline_run(run_dir: Path, index: int = -1) -> dict[str, Any]:
    """One offline run under RUN_DIR/wandb (in start order): its id, config and history rows.

    wandb's service process may still be writing the file when the run has returned (seen: a
    half-written record, a file without its run record yet), so this waits, up to 30 s, until
    the file parses and holds its exit record."""
    (wandb_file,) = sorted((run_dir / "wandb").glob("offline-run-*"))[index].glob("*.wandb")
    deadline = time.monotonic() + 30
    while True:
        try:
            records = list(wandb_records(wandb_file))
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                break
        except Exception:  # a record cut short by the writer: read it again
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    run: dict[str, Any] = {"history": {}}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run["project"] = record.run.project
            run["config"] = {
                item.key: json.loads(item.value_json)
                for item in record.run.config.update
                if item.key != "_wandb"
            }
        elif kind == "history":
            row = {
                "/".join(item.nested_key) or item.key: json.loads(item.value_json)
                for item in record.history.item
            }
            step = row.pop("_step")
            run["history"][step] = {k: v for k, v in row.items() if not k.startswith("_")}
    return run


def rows_by_step(records: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """metrics.jsonl as wandb's history: one row per step, the numbers of that step's records
    (a training and a validation record at one step share a row; the later one's tokens and
    elapsed win, as wandb.log(..., step=) merges them)."""
    rows: dict[int, dict[str, float]] = {}
    for record in records:
        rows.setdefault(record["step"], {}).update(trackers.scalars(record))
    return rows


@needs_wandb
@pytest.mark.usefixtures("offline_wandb")
def test_wandb_offline_run_has_every_metric_and_the_config(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(tracked_config(data_dir, run_dir, "wandb"))

    run = wandb_offline_run(run_dir)  # its files are under the run dir
    assert run["id"] == (run_dir / trackers.WANDB_RUN_ID).read_text().strip()
    assert run["project"] == "mllm"
    assert run["config"] == json.loads((run_dir / ckpt.RUN_CONFIG).read_text())
    expected = rows_by_step(read_metrics(run_dir))
    assert sorted(run["history"]) == list(range(1, 13))
    assert run["history"] == expected  # exactly: JSON numbers both ways
    assert {"loss", "val_loss", "lr", "tokens_per_s", "mfu", "grad_norm"} <= run["history"][
        10
    ].keys()


def test_wandb_options_yield_to_its_environment(tmp_path: Path) -> None:
    environ = {"WANDB_DIR": "/elsewhere", "WANDB_PROJECT": "mine"}
    options = trackers.wandb_options(tmp_path / "run", "abc", environ)
    assert options == {"name": "run", "id": "abc", "resume": "allow"}
    assert trackers.wandb_options(tmp_path / "run", None, {})["dir"] == str(tmp_path / "run")


# --- resuming ------------------------------------------------------------------------------------


@needs_tensorboard
@needs_wandb
@pytest.mark.usefixtures("offline_wandb")
def test_a_resumed_run_continues_both_trackers(data_dir: Path, tmp_path: Path) -> None:
    """Run 20 steps, then resume from step 10: the records after 10 are written again. TensorBoard
    drops the stale ones (purge), and the same wandb run id continues from step 11."""
    run_dir = tmp_path / "run"
    both = ("tensorboard", "wandb")
    train(tracked_config(data_dir, run_dir, *both, max_steps=20, eval_interval=10))
    first_records = read_metrics(run_dir)
    run_id = (run_dir / trackers.WANDB_RUN_ID).read_text().strip()

    resume_from = ckpt.checkpoints_dir(run_dir) / ckpt.checkpoint_name(10)
    extra = ("--resume-from", str(resume_from))
    train(tracked_config(data_dir, run_dir, *both, extra=extra, max_steps=20, eval_interval=10))
    records = read_metrics(run_dir)

    assert (run_dir / trackers.WANDB_RUN_ID).read_text().strip() == run_id
    first, second = wandb_offline_run(run_dir, 0), wandb_offline_run(run_dir, 1)
    assert first["id"] == second["id"] == run_id
    assert first["history"] == rows_by_step(first_records)
    assert second["history"] == rows_by_step([r for r in records if r["step"] > 10])

    assert len(list((run_dir / trackers.TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    _, scalars = tensorboard_scalars(run_dir)
    assert [step for step, _ in scalars["loss"]] == list(range(1, 21))  # each step once
    assert_same_series(scalars, numbers(records), rel=1e-6)


# --- failures only warn --------------------------------------------------------------------------


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def test_trackers_that_cannot_start_only_warn(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setitem(sys.modules, "wandb", None)
    run_dir = tmp_path / "run"
    result = train(tracked_config(data_dir, run_dir, "tensorboard", "wandb"))

    assert result.step == 12 and result.exit_code == 0
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, 13))
    warned = warnings_in(capsys.readouterr().err)
    assert len(warned) == 2, warned
    assert "--tracker tensorboard not started: cannot import it" in warned[0]
    assert "pip install 'mllm[tensorboard]'" in warned[0]
    assert "--tracker wandb not started: cannot import it" in warned[1]
    assert not (run_dir / trackers.WANDB_RUN_ID).exists()


@needs_tensorboard
@needs_wandb
@pytest.mark.usefixtures("offline_wandb")
def test_a_failing_wandb_init_and_an_unwritable_tensorboard_dir_only_warn(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import wandb

    def refuse(**_: object) -> None:
        raise wandb.errors.UsageError("api_key not configured (no-tty).\ncall wandb.login()")

    monkeypatch.setattr(wandb, "init", refuse)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / trackers.TENSORBOARD_DIR).write_text("a file where the folder would go")
    result = train(tracked_config(data_dir, run_dir, "tensorboard", "wandb", max_steps=6))

    assert result.step == 6
    warned = warnings_in(capsys.readouterr().err)
    assert len(warned) == 2, warned
    assert warned[0].startswith("warning: --tracker tensorboard not started (")
    assert warned[1] == (
        "warning: --tracker wandb not started (api_key not configured (no-tty). call "
        "wandb.login()); training goes on without it"
    )


@needs_tensorboard
def test_a_tracker_failing_mid_run_is_dropped_with_one_warning(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    calls: list[int] = []
    log = trackers.TensorBoardTracker.log

    def fail_at_step_4(self, step: int, values: dict[str, float]) -> None:
        calls.append(step)
        if step == 4:
            raise OSError(28, "No space left on device")
        log(self, step, values)

    monkeypatch.setattr(trackers.TensorBoardTracker, "log", fail_at_step_4)
    run_dir = tmp_path / "run"
    result = train(tracked_config(data_dir, run_dir, "tensorboard"))

    assert result.step == 12
    assert calls == [1, 2, 3, 4]  # dropped after the failure
    (warned,) = warnings_in(capsys.readouterr().err)
    assert "--tracker tensorboard failed at step 4 ([Errno 28] No space left on device)" in warned
    _, scalars = tensorboard_scalars(run_dir)
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3]  # what it had before, kept
    assert len(read_metrics(run_dir)) == 12 + 3  # metrics.jsonl has everything (+ 3 val records)
