"""The docs tell the truth about the CLI: every `mllm ...` command shown in README.md and
docs/*.md names a real subcommand and only flags it accepts, every `make X` names a Makefile
target, and every relative link points at a file that exists.

Commands are read from fenced code blocks: lines that start with `mllm ` (after an optional
`$ ` prompt and `VAR=value` prefixes), `python -m mllm ...` and `torchrun ... -m mllm ...`,
with trailing backslashes joined, `&&` / `||` / `;` / `|` chains split and `# comments`
dropped; `docker run ... mllm-train ARGS` and `mllm-serve ARGS` too (the images' entrypoints
are `mllm` and `mllm serve`). The flags each subcommand accepts come from the app itself.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import typer

from mllm.cli import app

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SUBCOMMANDS = ("corpus", "tokenize", "pack", "train", "eval", "generate", "serve", "export")

# Shell words that end one command: chains, pipes and redirections.
COMMAND_SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTIONS = {">", ">>", "<", "2>", "2>>", "&>", ">&"}
# Images whose entrypoint runs mllm: the arguments after the image name go to this argv.
DOCKER_IMAGES = {"mllm-train": [], "mllm-serve": ["serve"]}
PYTHONS = re.compile(r"^(.*/)?(python[\d.]*|torchrun)$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class CodeLine:
    """One logical line of a fenced code block: continuation lines joined."""

    path: Path
    lineno: int  # where it starts
    text: str

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.lineno}"


@dataclass(frozen=True)
class Invocation:
    """One `mllm` command found in the docs: its arguments after `mllm`."""

    line: CodeLine
    argv: list[str]


def code_lines(path: Path, text: str | None = None) -> list[CodeLine]:
    """The logical lines inside the fenced code blocks of a markdown file."""
    lines = (path.read_text() if text is None else text).splitlines()
    result: list[CodeLine] = []
    fence: str | None = None
    pending: tuple[int, str] | None = None
    for lineno, line in enumerate(lines, start=1):
        stripped = line.strip()
        marker = re.match(r"^(`{3,}|~{3,})", stripped)
        if fence is None:
            if marker:
                fence = marker.group(1)
            continue
        if stripped.startswith(fence) and not stripped[len(fence) :].strip():
            fence = None
            if pending:  # a backslash on a block's last line: keep what there is
                result.append(CodeLine(path, *pending))
                pending = None
            continue
        start, sofar = pending if pending else (lineno, "")
        if stripped.endswith("\\"):
            pending = (start, sofar + stripped[:-1].rstrip() + " ")
        else:
            pending = None
            result.append(CodeLine(path, start, sofar + stripped))
    return result


def shell_words(text: str) -> list[str]:
    """Shell words of one line, operators apart, comments dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def simple_commands(words: list[str]) -> list[list[str]]:
    """Words split at `&&`, `|`, ...; redirections and their targets left out."""
    commands: list[list[str]] = [[]]
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
        elif word in COMMAND_SEPARATORS:
            commands.append([])
        elif word in REDIRECTIONS:
            skip_next = True
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def mllm_argv(words: list[str]) -> list[str] | None:
    """The arguments after `mllm` if this simple command runs mllm, else None."""
    if words and words[0] == "$":
        words = words[1:]
    while words and (ENV_ASSIGNMENT.match(words[0]) or words[0] in {"time", "exec"}):
        words = words[1:]
    if not words:
        return None
    if words[0] == "mllm":
        return words[1:]
    if PYTHONS.match(words[0]):
        for i in range(1, len(words) - 1):
            if words[i] == "-m" and words[i + 1] == "mllm":
                return words[i + 2 :]
        return None
    if words[:2] == ["docker", "run"]:
        for i, word in enumerate(words):
            if word in DOCKER_IMAGES:
                return DOCKER_IMAGES[word] + words[i + 1 :]
    return None


def invocations(lines: list[CodeLine]) -> list[Invocation]:
    found = []
    for line in lines:
        text = line.text[2:] if line.text.startswith("$ ") else line.text
        try:
            words = shell_words(text)
        except ValueError:  # unbalanced quotes: prose or output in a code block, not a command
            if re.match(r"^(mllm|python[\d.]* -m mllm)\b", text):
                found.append(Invocation(line, ["<unparsable: unbalanced quotes>"]))
            continue
        for command in simple_commands(words):
            argv = mllm_argv(command)
            if argv is not None:
                found.append(Invocation(line, argv))
    return found


def _cli():
    return typer.main.get_command(app)


def check_invocation(invocation: Invocation) -> list[str]:
    """What is wrong with one command, as messages naming the file, line and word."""
    root = _cli()
    where = f"{invocation.line.where()}: `{invocation.line.text}`"
    argv = [word for word in invocation.argv if word != "..."]  # "..." stands for elided flags
    if not argv:
        return [f"{where}: `mllm` with no subcommand"]
    root_flags = {opt for p in root.params for opt in p.opts + p.secondary_opts}
    root_flags |= set(root.get_help_option_names(root.context_class(root)))
    if argv[0].startswith("-"):
        bad = [word for word in argv if word.startswith("-") and word not in root_flags]
        return [f"{where}: `mllm` does not accept {word}" for word in bad]
    name, args = argv[0], argv[1:]
    if name not in root.commands:
        return [f"{where}: no subcommand `mllm {name}` (there are: {', '.join(root.commands)})"]
    command = root.commands[name]
    takes_value: set[str] = set()
    flags = set(command.get_help_option_names(command.context_class(command)))
    for param in command.params:
        if param.param_type_name != "option":
            continue
        flags.update(param.opts + param.secondary_opts)
        if not getattr(param, "is_flag", False) and not getattr(param, "count", False):
            takes_value.update(param.opts)
    positional_slots = sum(1 for p in command.params if p.param_type_name == "argument")
    problems, positionals, i = [], 0, 0
    while i < len(args):
        word = args[i]
        if word == "--":
            positionals += len(args) - i - 1
            break
        if word.startswith("-") and len(word) > 1 and not re.match(r"^-\d", word):
            flag, has_value = word.split("=", 1)[0], "=" in word
            if flag not in flags:
                problems.append(
                    f"{where}: `mllm {name}` has no flag {flag} "
                    f"(it accepts: {', '.join(sorted(flags))})"
                )
                if not has_value and i + 1 < len(args) and not args[i + 1].startswith("-"):
                    i += 1  # its value, most likely: not a positional argument
            elif flag in takes_value and not has_value:
                if i + 1 >= len(args):
                    problems.append(f"{where}: {flag} of `mllm {name}` needs a value")
                i += 1
        else:
            positionals += 1
        i += 1
    if positionals > positional_slots:
        problems.append(
            f"{where}: `mllm {name}` takes {positional_slots} positional argument(s), "
            f"the docs give it {positionals}"
        )
    return problems


def all_invocations() -> list[Invocation]:
    return [inv for path in DOC_FILES for inv in invocations(code_lines(path))]


# --- the checker itself ---------------------------------------------------------------------


def test_the_checker_finds_commands_in_every_form_it_promises() -> None:
    doc = "\n".join(
        [
            "Prose that says mllm train --nonsense is not read.",
            "```bash",
            "$ mllm train --layers 4 \\",
            "    --heads 4   # a comment --ignored",
            "mllm corpus && mllm tokenize | tee log",
            "HF_HUB_OFFLINE=1 python -m mllm eval --json > out.json",
            "torchrun --standalone --nproc-per-node 8 -m mllm train --d-model 64",
            'docker run --rm -v "$PWD/runs:/w/runs:ro" mllm-serve --port 8080',
            "echo mllm pack --not-a-command",
            "```",
        ]
    )
    found = invocations(code_lines(REPO / "README.md", doc))
    assert [(inv.line.lineno, inv.argv) for inv in found] == [
        (3, ["train", "--layers", "4", "--heads", "4"]),
        (5, ["corpus"]),
        (5, ["tokenize"]),
        (6, ["eval", "--json"]),
        (7, ["train", "--d-model", "64"]),
        (8, ["serve", "--port", "8080"]),
    ]
    assert all(check_invocation(inv) == [] for inv in found)


def test_the_checker_names_file_line_and_bad_flag() -> None:
    doc = "```\nmllm generate 'Hi' --top-k 5\nmllm train --layers 4 \\\n  --no-such-flag 3\n```\n"
    messages = [
        m for inv in invocations(code_lines(REPO / "README.md", doc)) for m in check_invocation(inv)
    ]
    assert len(messages) == 1
    assert messages[0].startswith("README.md:3: ")
    assert "`mllm train` has no flag --no-such-flag" in messages[0]

    for text, expected in [
        ("mllm trian --layers 4", "no subcommand `mllm trian`"),
        ("mllm generate hi there", "takes 1 positional argument(s), the docs give it 2"),
        ("mllm eval --split", "--split of `mllm eval` needs a value"),
        ("mllm serve --port=80 --hosst 0.0.0.0", "has no flag --hosst"),
    ]:
        lines = code_lines(REPO / "docs" / "x.md", f"```\n{text}\n```\n")
        (message,) = [m for inv in invocations(lines) for m in check_invocation(inv)]
        assert message.startswith("docs/x.md:2: ") and expected in message, message


# --- the docs -------------------------------------------------------------------------------


def test_every_mllm_command_in_the_docs_exists_with_its_flags() -> None:
    found = all_invocations()
    problems = [message for inv in found for message in check_invocation(inv)]
    assert not problems, "\n".join(problems)
    # The docs show every subcommand at least once, so none of them goes unchecked.
    shown = {inv.argv[0] for inv in found if inv.argv}
    assert set(SUBCOMMANDS) <= shown, f"no example of: {sorted(set(SUBCOMMANDS) - shown)}"
    assert set(_cli().commands) == set(SUBCOMMANDS)


def test_every_command_page_exists_and_shows_its_command() -> None:
    for name in SUBCOMMANDS:
        page = REPO / "docs" / f"{name}.md"
        assert page.is_file(), f"docs/{name}.md is missing"
        shown = {inv.argv[0] for inv in invocations(code_lines(page)) if inv.argv}
        assert name in shown, f"docs/{name}.md shows no `mllm {name}` example in a code block"


def make_targets() -> set[str]:
    targets = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+(?:\s+[A-Za-z0-9_.-]+)*)\s*:(?!=)", line)
        if match:
            targets.update(t for t in match.group(1).split() if not t.startswith("."))
    return targets


def make_mentions(path: Path) -> list[tuple[int, str]]:
    """(line, target) for every `make X` in the file's code: fenced blocks and `code` spans."""
    text = path.read_text()
    spans: list[tuple[int, str]] = [(line.lineno, line.text) for line in code_lines(path)]
    in_fence = False
    for lineno, line in enumerate(text.splitlines(), start=1):
        if re.match(r"^\s*(`{3,}|~{3,})", line):
            in_fence = not in_fence
        elif not in_fence:
            spans += [(lineno, span) for span in re.findall(r"`([^`]+)`", line)]
    mentions = []
    for lineno, code in spans:
        try:
            words = shell_words(code)
        except ValueError:
            continue
        for command in simple_commands(words):
            while command and (ENV_ASSIGNMENT.match(command[0]) or command[0] == "time"):
                command = command[1:]
            if command[:1] == ["make"]:
                targets = [w for w in command[1:] if not w.startswith("-") and "=" not in w]
                mentions += [(lineno, t) for t in targets]
    return mentions


def test_every_make_target_in_the_docs_exists() -> None:
    targets = make_targets()
    assert {"setup", "demo", "test"} <= targets
    readme_mentions = make_mentions(REPO / "README.md")
    assert {"setup", "demo", "test"} <= {t for _, t in readme_mentions}
    problems = [
        f"{path.relative_to(REPO)}:{lineno}: `make {target}`: no such target in the Makefile "
        f"(there are: {', '.join(sorted(targets))})"
        for path in DOC_FILES
        for lineno, target in make_mentions(path)
        if target not in targets
    ]
    assert not problems, "\n".join(problems)


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line, target) for every markdown link outside code that is not a URL or an anchor."""
    links = []
    in_fence = False
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if re.match(r"^\s*(`{3,}|~{3,})", line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        prose = re.sub(r"`[^`]*`", "", line)
        targets = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
        targets += re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", prose)
        for target in targets:
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            links.append((lineno, target))
    return links


def test_every_relative_link_in_the_docs_points_to_a_file() -> None:
    problems = []
    checked = 0
    for path in DOC_FILES:
        for lineno, target in relative_links(path):
            checked += 1
            file_part = target.split("#", 1)[0]
            if not (path.parent / file_part).exists():
                problems.append(
                    f"{path.relative_to(REPO)}:{lineno}: link to {target}: no such file"
                )
    assert not problems, "\n".join(problems)
    assert checked > len(SUBCOMMANDS)  # README links every command page at least
