"""The `mllm` command line: parses flags into configs, calls one core function each, prints.

No logic lives here: each command hands its validated config to a function in the core, whose
module is imported only when the command runs (so `mllm --help` does not pay for importing torch).
"""

from __future__ import annotations

import sys

import typer

from mllm import __version__
from mllm.cliargs import CLICK_USAGE_ERROR, config_command
from mllm.config import (
    CorpusConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    PackConfig,
    ServeConfig,
    TokenizeConfig,
    TrainConfig,
)

app = typer.Typer(
    name="mllm",
    help="Minimal LLM: corpus -> tokenize -> pack -> train -> eval / generate / serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mllm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Minimal LLM: from raw public text to a trained GPT you can evaluate, sample and serve."""


@config_command(app, CorpusConfig, name="corpus")
def corpus(config: CorpusConfig) -> None:
    """Build corpus.txt (one document per line) from streamed Hugging Face datasets or local
    files (--source NAME=PATH)."""
    from mllm.data.corpus import build_corpus

    build_corpus(config)


@config_command(app, TokenizeConfig, name="tokenize")
def tokenize(config: TokenizeConfig) -> None:
    """Train a byte-level BPE tokenizer on corpus.txt and write tokenizer.json."""
    from mllm.data.tokenizer import train_tokenizer

    train_tokenizer(config)


@config_command(app, PackConfig, name="pack")
def pack(config: PackConfig) -> None:
    """Encode corpus.txt into train.bin / val.bin token streams and data.json."""
    from mllm.data.pack import pack_corpus

    pack_corpus(config)


@config_command(app, TrainConfig, name="train")
def train(config: TrainConfig) -> None:
    """Train the GPT on train.bin (single device, or many through torchrun)."""
    from mllm.train import train as run_training

    result = run_training(config)
    if result.exit_code:  # stopped by SIGINT / SIGTERM after saving a checkpoint: 130 / 143
        raise typer.Exit(result.exit_code)


@config_command(app, EvalConfig, name="eval")
def evaluate(config: EvalConfig) -> None:
    """Loss, perplexity and bits per byte of a checkpoint on a packed split."""
    from mllm.evaluate import run_eval

    run_eval(config)


@config_command(app, GenerateConfig, name="generate", positional=("prompt",))
def generate(config: GenerateConfig) -> None:
    """Stream a continuation of PROMPT from a trained checkpoint."""
    from mllm.generate import run_generate

    run_generate(config)


@config_command(app, ExportConfig, name="export")
def export(config: ExportConfig) -> None:
    """Write a Hugging Face transformers model folder (weights, config, modelling code,
    tokenizer) from a checkpoint."""
    from mllm.export import export_run

    export_run(config)


@config_command(app, ServeConfig, name="serve")
def serve(config: ServeConfig) -> None:
    """Serve a checkpoint over an OpenAI-compatible completions API."""
    from mllm.serve import run_server

    run_server(config)


def main() -> None:
    """Console-script entry point: a usage error is one line on stderr and exit code 2."""
    try:
        code = app(standalone_mode=False)
    except CLICK_USAGE_ERROR as e:  # click's UsageError, vendored by typer or not
        ctx: typer.Context | None = getattr(e, "ctx", None)
        if any(cls.__name__ == "NoArgsIsHelpError" for cls in type(e).__mro__):  # click >= 8.2
            typer.echo(ctx.get_help() if ctx else str(e), err=True)
        else:
            hint = f" (see '{ctx.command_path} --help')" if ctx else ""
            typer.echo(f"error: {e.format_message()}{hint}", err=True)  # type: ignore[attr-defined]
        code = 2
    except typer.Abort:
        typer.echo("interrupted", err=True)
        code = 130
    sys.exit(code or 0)
