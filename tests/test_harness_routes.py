"""One local task, three routes to the same accuracy: `mllm eval --tasks` in-process,
`lm_eval --model hf` on `mllm export`'s folder, and `lm_eval --model local-completions` against a
running `mllm serve` (over loopback HTTP), all in fp32."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import CLI_ENV, ServerProcess
from test_harness import LEGACY, write_task

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'mllm[eval]')")
pytest.importorskip("transformers", reason="transformers is not installed (pip install 'mllm[hf]')")

CONTEXT = 64  # every item of the task fits: no route cuts a window
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **CLI_ENV, **OFFLINE}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (command, result.stderr[-3000:])
    return result


def mllm(*args: str) -> list[str]:
    return [sys.executable, "-m", "mllm", *args]


def lm_eval_accuracy(folder: Path, model: str, model_args: str, out: str) -> dict[str, float]:
    """`lm_eval run` on the task; its tiny_mc metrics from the results file it writes."""
    lm_eval = Path(sys.executable).parent / "lm_eval"
    run(
        [str(lm_eval), "run", "--model", model, "--model_args", model_args,
         "--tasks", "tiny_mc.yaml", "--output_path", out, "--batch_size", "1"],
        folder,
    )  # fmt: skip
    [results] = (folder / out).rglob("results*.json")
    return metrics_of(json.loads(results.read_text())["results"]["tiny_mc"])


def metrics_of(task: dict) -> dict[str, float]:
    return {key: value for key, value in task.items() if key in ("acc,none", "acc_stderr,none")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 0.1.0 asset's data, a 30-step run of context 64 on it, the task and an export."""
    folder = tmp_path_factory.mktemp("routes")
    shutil.copytree(LEGACY / "data", folder / "data")
    run(
        mllm("train", "--run-dir", "run", "--context", str(CONTEXT), "--d-model", "32",
             "--layers", "2", "--heads", "2", "--batch-size", "8", "--max-steps", "30",
             "--warmup-steps", "5", "--lr", "3e-3", "--no-compile", "-q"),
        folder,
    )  # fmt: skip
    write_task(folder)
    run(mllm("export", "--run-dir", "run", "--out", "hf", "-q"), folder)
    return folder


def test_in_process_hf_and_served_routes_agree(trained: Path) -> None:
    in_process = run(
        mllm("eval", "--run-dir", "run", "--tasks", "tiny_mc.yaml", "--json", "--dtype", "fp32"),
        trained,
    )
    expected = metrics_of(json.loads(in_process.stdout)["tiny_mc"])
    hf = lm_eval_accuracy(
        trained, "hf", "pretrained=hf,trust_remote_code=True,dtype=float32", "out-hf"
    )
    with ServerProcess(trained / "run", "--dtype", "fp32") as server:
        served = lm_eval_accuracy(
            trained,
            "local-completions",
            f"model=run,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer=hf,max_length={CONTEXT},num_concurrent=1,max_retries=1",
            "out-served",
        )
    assert hf == pytest.approx(expected) and served == pytest.approx(expected), (
        expected,
        hf,
        served,
    )
