"""`mllm serve` through the real CLI: clear one-line errors before the server starts, options,
and a clean exit on SIGTERM."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from fixtures import ServerProcess, one_error_line, train_tiny_tokenizer, write_tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = Path(tmp_path_factory.mktemp("cli")) / "run"
    write_tiny_run(run, context=64, heads=2, weights="never_eot")
    return run


WIDE = {"COLUMNS": "500"}  # rich wraps long lines at 80 columns off a terminal


def assert_one_line_error(result, code: int, words: str) -> None:
    assert result.returncode == code, result.stderr
    line = one_error_line(result)
    assert words in line, line


def test_missing_run_dir(run_cli, tmp_path: Path) -> None:
    result = run_cli("serve", "--run-dir", tmp_path / "nope", "--port", "0", env=WIDE)
    assert_one_line_error(result, 1, "does not exist")


def test_run_dir_without_checkpoints(run_cli, tmp_path: Path) -> None:
    (tmp_path / "empty-run").mkdir()
    result = run_cli("serve", "--run-dir", tmp_path / "empty-run", "--port", "0", env=WIDE)
    assert_one_line_error(result, 1, "no checkpoint")


def test_checkpoint_that_is_not_one(run_cli, tmp_path: Path) -> None:
    result = run_cli("serve", "--checkpoint", tmp_path, "--port", "0", env=WIDE)
    assert_one_line_error(result, 1, "not a checkpoint folder")


def test_tokenizer_mismatch(run_cli, run_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    train_tiny_tokenizer(other, texts=["A completely different text for another tokenizer."] * 3)
    result = run_cli("serve", "--run-dir", run_dir, "--tokenizer", other, "--port", "0", env=WIDE)
    assert_one_line_error(result, 1, "is not the one this model was trained with")


def test_port_in_use(run_cli, run_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--run-dir", run_dir, "--port", str(port), env=WIDE)
    assert_one_line_error(result, 1, f"port {port} on 127.0.0.1 is already in use")


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--port", "70000"), ("--max-batch-size", "0"), ("--max-request-bytes", "10")],
)
def test_bad_option_values_exit_2(run_cli, run_dir: Path, flag: str, value: str) -> None:
    result = run_cli("serve", "--run-dir", run_dir, flag, value, env=WIDE)
    assert_one_line_error(result, 2, flag)


def test_model_name_checkpoint_and_clean_exit_on_sigterm(run_dir: Path, tmp_path: Path) -> None:
    [checkpoint] = (run_dir / "checkpoints").glob("step_*")
    server = ServerProcess(
        run_dir,
        "--checkpoint",
        str(checkpoint),
        "--model-name",
        "my-model",
        "--threads",
        "1",
        log_path=tmp_path / "serve.log",
    )
    try:
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"] == "my-model"
        response = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "my-model", "prompt": "The fox", "max_tokens": 3},
        )
        assert response.status_code == 200
    finally:
        server.stop()
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status says why it ended
    assert server.process.returncode in (0, -15), server.log()
    assert "Finished server process" in server.log()
    assert "Traceback" not in server.log()


def test_quiet_still_says_where_it_listens(run_dir: Path, tmp_path: Path) -> None:
    """With --port 0 the address line is the only way to find the port, so --quiet keeps it."""
    server = ServerProcess(run_dir, "--quiet", "--threads", "1", log_path=tmp_path / "q.log")
    try:
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.stop()
    lines = server.log().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("serving model"), lines
