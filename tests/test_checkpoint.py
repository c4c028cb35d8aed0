"""Checkpoint layout: atomic folders, best/latest lookup, retention, weights round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures import run_state
from mllm.config import ModelConfig
from mllm.errors import MllmError
from mllm.model import GPT
from mllm.train import checkpoint as ckpt


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=50, context=16, d_model=16, layers=1, heads=2))


DATA = ckpt.DataIdentity(pack_id="p", tokenizer_sha256="t", vocab_size=50, dtype="uint16")


def state_for(model: GPT, step: int, tokens_seen: int = 0) -> ckpt.RunState:
    return run_state(model.config, DATA, step=step, tokens_seen=tokens_seen)


def test_write_then_load_gives_the_same_logits(tmp_path: Path) -> None:
    model = tiny_model()
    path = ckpt.write_checkpoint(tmp_path, model, state_for(model, 3), {"x": 1})
    assert path.name == "step_000003"
    assert not any(p.name.startswith(".tmp") for p in path.parent.iterdir())
    loaded = ckpt.load_checkpoint(path)
    idx = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(idx), model.eval()(idx))
    assert loaded.config == model.config


def test_best_else_latest_and_retention(tmp_path: Path) -> None:
    model = tiny_model()
    for step in (1, 2, 3, 4):
        path = ckpt.write_checkpoint(tmp_path, model, state_for(model, step))
        if step == 2:
            ckpt.mark_best(tmp_path, path, val_loss=1.0)
    assert ckpt.find_checkpoint(tmp_path).name == "step_000002"
    deleted = ckpt.prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in deleted) == ["step_000001", "step_000003"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000002", "step_000004"]
    (tmp_path / "checkpoints" / "best.json").unlink()
    assert ckpt.find_checkpoint(tmp_path).name == "step_000004"


def test_incomplete_folders_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "step_000009").mkdir(parents=True)  # no state.json: a crash
    (tmp_path / "checkpoints" / ".tmp-step_000010").mkdir()
    assert ckpt.list_checkpoints(tmp_path) == []
    with pytest.raises(MllmError, match="no checkpoint"):
        ckpt.find_checkpoint(tmp_path)


@pytest.mark.parametrize("fail_at", [1, 2])  # the first rename (old aside) or the second
def test_a_resave_cut_short_leaves_a_complete_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    model = tiny_model()
    ckpt.write_checkpoint(tmp_path, model, state_for(model, 5, tokens_seen=1))
    rename, calls = Path.rename, []

    def second_signal(self: Path, target: Path) -> Path:
        calls.append(self)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", second_signal)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(tmp_path, model, state_for(model, 5, tokens_seen=2))
    monkeypatch.undo()
    [found] = ckpt.list_checkpoints(tmp_path)
    assert ckpt.read_state(found).tokens_seen == 1  # the first save
    assert ckpt.load_checkpoint(found).state.step == 5
    # The next save of that step replaces it and tidies up.
    ckpt.write_checkpoint(tmp_path, model, state_for(model, 5, tokens_seen=3))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000005"]
    assert ckpt.read_state(ckpt.find_checkpoint(tmp_path)).tokens_seen == 3


def test_missing_run_dir_and_bad_checkpoint_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(MllmError, match="does not exist"):
        ckpt.find_checkpoint(tmp_path / "nope")
    with pytest.raises(MllmError, match="not a checkpoint"):
        ckpt.find_checkpoint(tmp_path, tmp_path)


def test_mismatched_weights_are_refused(tmp_path: Path) -> None:
    model = tiny_model()
    path = ckpt.write_checkpoint(tmp_path, model, state_for(model, 1))
    other = GPT(ModelConfig(vocab_size=50, context=16, d_model=16, layers=2, heads=2))
    with pytest.raises(MllmError, match="does not match"):
        ckpt.load_weights(path, other)


def test_a_damaged_weights_file_is_one_clear_error(tmp_path: Path) -> None:
    model = tiny_model()
    path = ckpt.write_checkpoint(tmp_path, model, state_for(model, 1))
    weights = path / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:40])  # truncated, e.g. a copy cut short
    with pytest.raises(MllmError, match="is damaged"):
        ckpt.load_checkpoint(path)
