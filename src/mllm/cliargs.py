"""Turn a pydantic config class into a Typer command's flags, so each option is declared once.

Every field of a config (nested models flattened) becomes `--field-name`, with the field's
description as help and its default shown; booleans get `--x/--no-x`. Values come, in increasing
priority, from the field defaults, `--config FILE` (YAML or TOML), then the flags actually given.
The merged dict is validated by the config class; a validation error exits with code 2 and one
line naming the flag. Core functions then receive a checked config and never see the CLI.

`config_command` registers a command on the app; `parse_config` turns an argv list into the
config that command would build, through the same flags (tests use it instead of the CLI).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import sys
import traceback
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from rich.markup import escape

from mllm.console import error as console_error
from mllm.console import set_quiet
from mllm.errors import MllmError, UsageError, parse_error_line

ConfigT = TypeVar("ConfigT", bound=BaseModel)

# Flags every command has besides its config's (typer adds --help).
_BUILT_IN_FLAGS = ("--config", "--quiet", "-q", "--debug", "--help")
_BUILT_IN_PARAMS = ("config_file", "quiet", "debug")

# click's UsageError as the installed typer raises it, reached through the public
# typer.BadParameter (a UsageError subclass) rather than a private module: typer >= 0.22 vendors
# its own copy of click, older releases re-export the click package's classes; the two differ.
CLICK_USAGE_ERROR: type[Exception] = next(
    cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError"
)


@dataclass(frozen=True)
class FlagSpec:
    """One config field as a command-line flag."""

    path: tuple[str, ...]  # where the value goes in the config, e.g. ("model", "d_model")
    flag: str  # e.g. "--d-model"
    annotation: Any  # the field's Python type
    field: FieldInfo

    @property
    def param_name(self) -> str:
        return "_".join(self.path)


def _is_model(tp: Any) -> bool:
    return inspect.isclass(tp) and issubclass(tp, BaseModel)


def _extra(field: FieldInfo) -> dict[str, Any]:
    """The field's json_schema_extra: how its flag differs from the default (name, CLI type)."""
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def flag_specs(config_cls: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[FlagSpec]:
    """All leaf fields of a config class (nested models flattened) as flags."""
    specs: list[FlagSpec] = []
    for name, field in config_cls.model_fields.items():
        if _is_model(field.annotation):
            specs.extend(flag_specs(field.annotation, (*prefix, name)))
            continue
        flag = str(_extra(field).get("flag") or "--" + name.replace("_", "-"))
        specs.append(FlagSpec((*prefix, name), flag, field.annotation, field))
    return specs


def _strip_optional(tp: Any) -> Any:
    """`X | None` -> X (the CLI uses None for "flag not given")."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _help_with_default(field: FieldInfo) -> str:
    """The field's description plus its default, e.g. "... [default: 16000]" or "[default: on]"
    (typer cannot show it: every flag's CLI default is None, meaning "not given")."""
    help_text = field.description or ""
    if field.is_required():
        return help_text
    value = field.get_default(call_default_factory=True)
    if value is None or value == []:
        return help_text
    shown = ("on" if value else "off") if isinstance(value, bool) else str(value)
    return f"{help_text} {escape(f'[default: {shown}]')}"


def _typer_parameter(spec: FlagSpec, positional: bool) -> inspect.Parameter:
    tp = _strip_optional(spec.annotation)
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    help_text = _help_with_default(spec.field)
    kwargs: dict[str, Any] = {"help": help_text, "show_default": False}
    if get_origin(tp) is list:
        item = get_args(tp)[0]
        if get_origin(item) is Annotated:  # the item's constraints are pydantic's business
            item = get_args(item)[0]
        if get_origin(item) is Literal:  # typer takes no list of choices: pydantic checks them
            kwargs["metavar"] = "|".join(map(str, get_args(item)))
            item = str
        else:
            kwargs["metavar"] = "TEXT"
        cli_type: Any = list[item]
    elif _extra(spec.field).get("cli_type") == "text":  # e.g. a duration: pydantic parses it
        cli_type = str
    else:
        cli_type = tp  # Literal[...] becomes a choice; bool, Path, int, float, str as they are
    if positional:  # required on the command line (a prompt has no sensible default)
        info = typer.Argument(help=help_text, show_default=False, metavar=spec.path[-1].upper())
        annotation: Any = Annotated[cli_type, info]
        return inspect.Parameter(
            spec.param_name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation
        )
    if tp is bool:
        name = spec.flag.removeprefix("--")
        info = typer.Option(f"--{name}/--no-{name}", metavar="", **kwargs)
    else:
        info = typer.Option(spec.flag, **kwargs)
    return inspect.Parameter(
        spec.param_name,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=None,
        annotation=Annotated[typing.Optional[cli_type], info],  # noqa: UP045 - typer needs it
    )


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into a dict; JSON is YAML too."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        if path.suffix.lower() == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # the parsers raise their own error types
        raise UsageError(f"config file {path} does not parse: {parse_error_line(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of option names to values")
    return data


def _nest_file_values(config_cls: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """Accept kebab-case keys, and nested fields given flat (`d_model: 384` for model.d_model)."""
    specs = {spec.path[-1]: spec.path for spec in flag_specs(config_cls)}
    nested: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if key in config_cls.model_fields:
            field_type = config_cls.model_fields[key].annotation
            if _is_model(field_type) and isinstance(value, dict):
                value = _nest_file_values(field_type, value)
                nested.setdefault(key, {}).update(value)
            else:
                nested[key] = value
        elif key in specs:
            _set_path(nested, specs[key], value)
        else:
            nested[key] = value  # unknown: the config class rejects it with a clear message
    return nested


def _set_path(target: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


def _build_config(
    config_cls: type[ConfigT],
    flag_values: dict[tuple[str, ...], Any],
    config_file: Path | None = None,
    positional: tuple[str, ...] = (),
) -> ConfigT:
    """Merge defaults < config file < flags and validate; errors become one-line UsageErrors."""
    values = _nest_file_values(config_cls, load_config_file(config_file)) if config_file else {}
    for path, value in flag_values.items():
        _set_path(values, path, value)
    try:
        return config_cls.model_validate(values)
    except ValidationError as e:
        raise UsageError(describe_validation_error(config_cls, e, positional)) from None


def describe_validation_error(
    config_cls: type[BaseModel], error: ValidationError, positional: tuple[str, ...] = ()
) -> str:
    """The first problem of a ValidationError as one line naming the flag, e.g.
    `--top-p: Input should be less than or equal to 1 (got 1.5)`."""
    first = error.errors()[0]
    loc = tuple(str(part) for part in first["loc"] if not isinstance(part, int))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        known = [spec.path[-1] for spec in flag_specs(config_cls)]
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see --help for the options"
        return f"unknown option {'.'.join(loc)!r} ({hint})"
    flags = {spec.path: spec.flag for spec in flag_specs(config_cls)}
    flags.update({(name,): name.upper() for name in positional})
    flag = flags.get(loc, "")  # a whole-model check (loc () or ("model",)) names its fields itself
    got = first.get("input")
    shown = "" if isinstance(got, dict) or got is None or first["type"] == "missing" else got
    suffix = f" (got {shown!r})" if shown != "" else ""
    return f"{flag}: {message}{suffix}" if flag else message


def report_error_and_exit(error: BaseException, debug: bool) -> typing.NoReturn:
    """Print one clear line on stderr (a traceback with --debug) and exit with the right code."""
    if debug:
        traceback.print_exception(error)
    if isinstance(error, MllmError):
        console_error(str(error))
        raise typer.Exit(error.exit_code)
    if isinstance(error, KeyboardInterrupt):
        console_error("interrupted")
        raise typer.Exit(130)
    console_error(
        f"unexpected {type(error).__name__}: {error} (run again with --debug for the traceback)"
    )
    raise typer.Exit(1)


def _command_specs(config_cls: type[BaseModel], positional: tuple[str, ...]) -> list[FlagSpec]:
    """`flag_specs(config_cls)`, refusing two fields that would share a flag (or a parameter
    name), or a field whose flag is one every command already has."""
    flags: dict[str, str] = {flag: "the built-in option" for flag in _BUILT_IN_FLAGS}
    params: dict[str, str] = {name: "a built-in option" for name in _BUILT_IN_PARAMS}
    specs = flag_specs(config_cls)
    for spec in specs:
        field = ".".join(spec.path)
        names = [] if spec.path[-1] in positional else [spec.flag]  # an argument has no flag
        if names and _strip_optional(spec.annotation) is bool:
            names.append("--no-" + spec.flag.removeprefix("--"))
        for flag in names:
            if flag in flags:
                raise ValueError(
                    f"{config_cls.__name__}: flag {flag} of field {field} clashes with "
                    f"{flags[flag]}"
                )
            flags[flag] = f"field {field}"
        if spec.param_name in params:
            raise ValueError(
                f"{config_cls.__name__}: field {field} and {params[spec.param_name]} both take "
                f"the parameter name {spec.param_name!r}"
            )
        params[spec.param_name] = f"field {field}"
    return specs


def _command_parameters(specs: list[FlagSpec], positional: tuple[str, ...]) -> inspect.Signature:
    """The signature typer reads a command's options from: one parameter per field, then
    `--config FILE`, `--quiet/-q` and `--debug`."""
    params = [_typer_parameter(s, s.path[-1] in positional) for s in specs]
    params.sort(key=lambda p: 0 if p.name in positional else 1)
    params += [
        inspect.Parameter(
            "config_file",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                typing.Optional[Path],  # noqa: UP045
                typer.Option("--config", help="YAML or TOML file of options; flags win."),
            ],
        ),
        inspect.Parameter(
            "quiet",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[
                bool,
                typer.Option("--quiet", "-q", help="No progress bars or info lines.", metavar=""),
            ],
        ),
        inspect.Parameter(
            "debug",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[
                bool, typer.Option("--debug", help="Show tracebacks.", metavar="")
            ],
        ),
    ]
    return inspect.Signature(params)


def _add_command(
    app: typer.Typer,
    config_cls: type[ConfigT],
    *,
    name: str | None,
    positional: tuple[str, ...],
    help: str | None,
    run: Callable[[Callable[[], ConfigT], bool, bool], None],
    fn_name: str = "command",
) -> None:
    """Register on `app` a command with one flag per field of `config_cls` (refusing clashes);
    when invoked it calls `run(make_config, quiet, debug)`, where `make_config()` merges the
    defaults, the --config file and the flags given, and validates (or raises UsageError)."""
    specs = _command_specs(config_cls, positional)

    def command(**kwargs: Any) -> None:
        debug = bool(kwargs.pop("debug"))
        quiet = bool(kwargs.pop("quiet"))
        config_file = kwargs.pop("config_file")
        flag_values = {
            spec.path: kwargs[spec.param_name]
            for spec in specs
            if kwargs.get(spec.param_name) is not None
        }
        run(lambda: _build_config(config_cls, flag_values, config_file, positional), quiet, debug)

    command.__signature__ = _command_parameters(specs, positional)  # type: ignore[attr-defined]
    command.__name__ = fn_name
    command.__doc__ = help
    app.command(name=name)(command)


def config_command(
    app: typer.Typer,
    config_cls: type[ConfigT],
    *,
    name: str,
    positional: tuple[str, ...] = (),
    help: str | None = None,
) -> Callable[[Callable[[ConfigT], Any]], Callable[[ConfigT], Any]]:
    """Register `fn(config)` as command `name`, with one flag per field of `config_cls`.

    `positional` names fields taken as positional arguments (e.g. generate's prompt).
    Adds `--config FILE`, `--quiet/-q` and `--debug` to every command. Raises ValueError if two
    fields (nested models flattened) map to the same flag, or a field to a built-in one.
    """
    _command_specs(config_cls, positional)  # refuse clashes now, before any decorating

    def decorate(fn: Callable[[ConfigT], Any]) -> Callable[[ConfigT], Any]:
        def run(make_config: Callable[[], ConfigT], quiet: bool, debug: bool) -> None:
            set_quiet(quiet)
            try:
                fn(make_config())
            except (MllmError, KeyboardInterrupt) as e:
                report_error_and_exit(e, debug)
            except typer.Exit:
                raise
            except BrokenPipeError:  # e.g. `mllm generate ... | head`: the reader left, fine
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                raise typer.Exit(0) from None
            except Exception as e:
                report_error_and_exit(e, debug)

        _add_command(
            app,
            config_cls,
            name=name,
            positional=positional,
            help=help or fn.__doc__,
            run=run,
            fn_name=fn.__name__,
        )
        return functools.wraps(fn)(fn)

    return decorate


def parse_config(
    config_cls: type[ConfigT], argv: list[str], *, positional: tuple[str, ...] = ()
) -> ConfigT:
    """The config a command built by `config_command(app, config_cls, positional=...)` would get
    from `argv` (its arguments after the command name), e.g. `["--context", "16", "--no-compile"]`
    or `["--config", "train.yaml"]`: the same flags, parsing, merging and validation. Only the
    options given count as explicitly set. Any bad argument raises mllm's UsageError (one line);
    `--quiet` and `--debug` are accepted and ignored.
    """
    configs: list[ConfigT] = []
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    _add_command(
        app,
        config_cls,
        name=None,
        positional=positional,
        help=None,
        run=lambda make_config, quiet, debug: configs.append(make_config()),
    )
    try:
        app(list(argv), prog_name="mllm", standalone_mode=False)
    except CLICK_USAGE_ERROR as e:
        raise UsageError(e.format_message()) from None  # type: ignore[attr-defined]
    if not configs:  # e.g. --help, which prints the help and returns
        raise UsageError(f"no config was built from {argv!r}")
    return configs[0]
