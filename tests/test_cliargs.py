"""The config -> flags machinery every command uses: merging, validation, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from pydantic import BaseModel, Field

from mllm.cliargs import config_command, flag_specs, parse_config
from mllm.config import GenerateConfig, ModelConfig, TrainConfig
from mllm.errors import UsageError


def test_nested_model_fields_become_flat_flags() -> None:
    flags = {spec.flag: spec.path for spec in flag_specs(TrainConfig)}
    assert flags["--d-model"] == ("model", "d_model")
    assert flags["--batch-size"] == ("batch_size",)
    assert "--model" not in flags


def test_flags_override_config_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("d-model: 128\nheads: 4\nlr: 0.001\nmodel:\n  layers: 3\n")
    cfg = parse_config(TrainConfig, ["--lr", "0.002", "--config", str(cfg_file)])
    assert cfg.model.d_model == 128 and cfg.model.heads == 4 and cfg.model.layers == 3
    assert cfg.lr == 0.002


def test_toml_config_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('prompt = "from the file"\ntop_k = 5\n')
    cfg = parse_config(GenerateConfig, ["hi", "--config", str(cfg_file)], positional=("prompt",))
    assert cfg.prompt == "hi" and cfg.top_k == 5


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--d-model", "100", "--heads", "3"], "divisible by --heads"),
        (["--lr", "-1.0"], "--lr:"),
        (["--min-lr", "1.0", "--lr", "0.1"], "--min-lr (1.0) must not exceed --lr"),
        (["--lr", "abc"], "'--lr'"),
        (["--bogus"], "--bogus"),  # click words it "No such option: --bogus" or "... '--bogus'."
        (["--context"], "'--context' requires an argument"),
    ],
)
def test_bad_values_are_one_line_usage_errors(flags: list[str], expected: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_config(TrainConfig, flags)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_unknown_key_in_config_file_is_named(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("bogus: 1\n")
    with pytest.raises(UsageError, match="bogus"):
        parse_config(TrainConfig, ["--config", str(cfg_file)])


def test_missing_and_unparsable_config_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        parse_config(TrainConfig, ["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    with pytest.raises(UsageError, match="does not parse"):
        parse_config(TrainConfig, ["--config", str(bad)])


def test_ffn_hidden_is_two_thirds_of_four_d_rounded_to_64() -> None:
    assert ModelConfig(d_model=384, heads=6).ffn_hidden == 1024
    assert ModelConfig(d_model=1024, heads=16).ffn_hidden == 2752


def test_cli_bad_flag_exits_2_with_one_line(run_cli) -> None:
    result = run_cli("train", "--d-model", "100", "--heads", "3")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "divisible" in result.stderr
    result = run_cli("train", "--lr", "abc")
    assert result.returncode == 2 and "--lr" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_cli_help_lists_commands(run_cli) -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("corpus", "tokenize", "pack", "train", "eval", "generate", "serve"):
        assert command in result.stdout


def test_a_misspelt_key_gets_a_suggestion_and_a_yaml_error_its_line(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("contxt: 5\n")
    with pytest.raises(UsageError, match="did you mean 'context'"):
        parse_config(TrainConfig, ["--config", str(cfg_file)])
    cfg_file.write_text("lr: 0.1\nbatch: [1, 2\nlayers: 3\n")
    with pytest.raises(UsageError, match=r"line 3"):
        parse_config(TrainConfig, ["--config", str(cfg_file)])


def test_parse_config_reads_an_argv_like_the_cli() -> None:
    cfg = parse_config(TrainConfig, ["--context", "16", "--no-compile", "-q", "--lr=0.01"])
    assert cfg.model.context == 16 and cfg.compile is False and cfg.lr == 0.01
    assert cfg.model_fields_set == {"model", "compile", "lr"}  # only what was given
    assert cfg.model.model_fields_set == {"context"}
    assert parse_config(TrainConfig, []) == TrainConfig()


class _Inner(BaseModel):
    size: int = 1


class _NestedClash(BaseModel):
    inner: _Inner = _Inner()
    size: int = 2


class _BuiltInClash(BaseModel):
    debug: bool = False


class _CustomFlagClash(BaseModel):
    path: str = Field("x", json_schema_extra={"flag": "--config"})


class _ParameterClash(BaseModel):
    config_file: str = ""  # --config-file is free, but the command's parameter is taken


class _NegationClash(BaseModel):
    fast: bool = True
    no_fast: int = 0


@pytest.mark.parametrize(
    ("config_cls", "message"),
    [
        (_NestedClash, "_NestedClash: flag --size of field size clashes with field inner.size"),
        (_BuiltInClash, "flag --debug of field debug clashes with the built-in option"),
        (_CustomFlagClash, "flag --config of field path clashes with the built-in option"),
        (_NegationClash, "flag --no-fast of field no_fast clashes with field fast"),
        (_ParameterClash, "field config_file and a built-in option both take the parameter name"),
    ],
)
def test_clashing_flags_are_refused_when_the_app_is_built(
    config_cls: type[BaseModel], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        config_command(typer.Typer(), config_cls, name="x")
    with pytest.raises(ValueError, match=message):
        parse_config(config_cls, [])
