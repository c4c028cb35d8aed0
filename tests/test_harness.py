"""`mllm eval --tasks`: lm-evaluation-harness tasks on a checkpoint, in-process, offline (a local
multiple-choice task over a local JSONL file, on the 0.1.0 run of tests/assets)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fixtures import one_error_line
from mllm.data.tokenizer import load_tokenizer
from mllm.train.checkpoint import load_checkpoint

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'mllm[eval]')")

LEGACY = Path(__file__).parent / "assets" / "legacy-0.1.0"
WORDS = ["dog", "cat", "park", "ball", "tree", "girl", "boy", "mom", "sun", "cake", "toy", "bird"]


def write_task(folder: Path, docs: int = 12) -> Path:
    """tiny_mc: 'Once upon a time ... play with the' + 4 one-word choices, as a task YAML."""
    rows = []
    for i in range(docs):
        choices = [f" {WORDS[(i * 5 + k * 3) % len(WORDS)]}" for k in range(4)]
        pet = WORDS[i % len(WORDS)]
        context = f"Once upon a time there was a little {pet}. It liked to play with the"
        rows.append({"context": context, "choices": choices, "answer": (i * 7) % 4})
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = folder / "tiny_mc.yaml"
    task.write_text(
        f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
    )
    return task


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("harness") / "legacy"
    shutil.copytree(LEGACY, folder)
    write_task(folder)
    return folder


def expected_accuracy(folder: Path, limit: int | None = None) -> float:
    """The task's accuracy computed here by hand: the choice whose tokens the fp32 model finds
    most likely after the context (context and choice encoded together, the window cut to the
    model's context from the left, as lm-eval does)."""
    loaded = load_checkpoint(folder / "run" / "checkpoints" / "step_000006")
    tokenizer = load_tokenizer(folder / "run" / "tokenizer.json")
    rows = [json.loads(line) for line in (folder / "tiny_mc.jsonl").open()][:limit]
    right = 0
    for row in rows:
        context_ids = tokenizer.encode(row["context"]).ids
        scores = []
        for choice in row["choices"]:
            whole = tokenizer.encode(row["context"] + choice).ids
            choice_ids = whole[len(context_ids) :]
            window = whole[-(loaded.config.context + 1) :]
            with torch.no_grad():
                logits = loaded.model(torch.tensor([window[:-1]]))[0, -len(choice_ids) :]
            logprobs = F.log_softmax(logits.float(), -1)
            scores.append(float(logprobs.gather(1, torch.tensor(choice_ids)[:, None]).sum()))
        right += int(max(range(4), key=scores.__getitem__) == row["answer"])
    return right / len(rows)


def eval_tasks(run_cli, folder: Path, *args: str):
    return run_cli(
        "eval", "--run-dir", "run", "--data-dir", "data", "--dtype", "fp32", *args, cwd=folder,
        env={"HF_DATASETS_OFFLINE": "1"},
    )  # fmt: skip


def test_a_local_task_scores_as_computed_by_hand(legacy: Path, run_cli) -> None:
    result = eval_tasks(run_cli, legacy, "--tasks", "tiny_mc.yaml", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    [line] = result.stdout.splitlines()
    metrics = json.loads(line)
    assert set(metrics) == {"tiny_mc"}
    assert set(metrics["tiny_mc"]) == {"acc,none", "acc_stderr,none"}
    assert metrics["tiny_mc"]["acc,none"] == pytest.approx(expected_accuracy(legacy))


def test_limit_and_the_table(legacy: Path, run_cli) -> None:
    result = eval_tasks(run_cli, legacy, "--tasks", "tiny_mc.yaml", "--limit", "5")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tiny_mc" in result.stdout and "acc,none" in result.stdout
    shown = next(line for line in result.stdout.splitlines() if "acc,none" in line)
    assert f"{expected_accuracy(legacy, limit=5):.4f}" in shown


def test_unknown_tasks_and_limit_without_tasks_are_usage_errors(legacy: Path, run_cli) -> None:
    result = eval_tasks(run_cli, legacy, "--tasks", "no_such_task_xyz")
    assert result.returncode == 2
    assert "not an lm-eval task: no_such_task_xyz" in one_error_line(result)
    result = eval_tasks(run_cli, legacy, "--tasks", "missing.yaml")
    assert result.returncode == 2 and "task file not found" in one_error_line(result)
    result = eval_tasks(run_cli, legacy, "--limit", "3")
    assert result.returncode == 2 and "--limit applies to --tasks" in one_error_line(result)


def test_broken_task_files_are_one_line(legacy: Path, run_cli) -> None:
    (legacy / "bad.yaml").write_text("task: [unclosed\n")
    result = eval_tasks(run_cli, legacy, "--tasks", "bad.yaml", "-q")
    assert result.returncode == 2
    assert "bad.yaml is not a task file lm-eval reads: line 2" in one_error_line(result)
    broken = (legacy / "tiny_mc.yaml").read_text().replace("{{context}}", "{{no_such_field}}")
    (legacy / "broken.yaml").write_text(broken.replace("task: tiny_mc", "task: broken_mc"))
    result = eval_tasks(run_cli, legacy, "--tasks", "broken.yaml", "-q")
    assert result.returncode == 1
    assert "lm-eval could not run it: UndefinedError" in one_error_line(result)
