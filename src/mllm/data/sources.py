"""Where corpus text comes from: the `--source` / `--ratio` flags, the hub, local files, and the
rules that turn each source's rows into documents.

Every source, hub or local, is read through `datasets.load_dataset(..., streaming=True)`, so a hub
dataset is never downloaded whole and local files go through the same code. What a *document*
is depends on the source:

- rows of a hub dataset or of .jsonl/.json/.parquet files: one row (column `text`) is a document;
- plain-text files (any other extension): documents end at a `<|endoftext|>` or NUL separator
  where the file uses them, else at blank lines, else at each line (see `sniff_text_layout`);
- WikiText (`wikitext_documents`): one article, from its ` = Title = ` line to the next, with
  headings dropped and WikiText's ` @-@ ` style artefacts and `<unk>` placeholders undone. It
  applies to the hub's Salesforce/wikitext and to local sources named wikitext*, in each file
  whose first 1,000 rows hold a ` = Title = ` line (else the rules above apply).

`<|endoftext|>` and NUL always end a document, whatever the source: the tokenizer would read the
literal string as its end-of-text token.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mllm.console import is_quiet, progress_enabled
from mllm.errors import MllmError, UsageError, first_line

END_OF_TEXT = "<|endoftext|>"
SEPARATOR_RE = re.compile(re.escape(END_OF_TEXT) + "|\x00")

DEFAULT_SPLIT = "train"


@dataclass(frozen=True)
class HubDataset:
    """A dataset on the Hugging Face Hub, read in streaming mode."""

    repo_id: str
    config: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}:{self.config}" if self.config else self.repo_id


# The default mixture: name -> hub dataset, and the weights of `--ratio 4:4:2` in this order.
DEFAULT_SOURCES: dict[str, HubDataset] = {
    "wikitext": HubDataset("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "fineweb": HubDataset("HuggingFaceFW/fineweb", "sample-10BT"),
    "tinystories": HubDataset("roneneldan/TinyStories"),
}
DEFAULT_WEIGHTS: dict[str, float] = {"wikitext": 4.0, "fineweb": 4.0, "tinystories": 2.0}

ROW_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TEXT_COLUMN = "text"
LOCAL_CHUNK_BYTES = 1 << 20
SKIPPED_IN_FOLDERS = ("readme*", "*.md", "*.markdown", "license*", "copying*")
GLOB_CHARS = re.compile(r"[*?\[]")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
DATA_SUFFIXES = {".txt", ".raw", ".tokens", *ROW_FORMATS}


@dataclass(frozen=True)
class SourceSpec:
    """One named source of the mixture: a hub dataset or a list of local files, and its weight."""

    name: str
    weight: float
    given_as: str  # the value as the user wrote it (or the default hub id), for messages
    hub: HubDataset | None = None
    files: tuple[Path, ...] = ()

    @property
    def is_hub(self) -> bool:
        return self.hub is not None

    @property
    def wikitext_like(self) -> bool:
        """WikiText rules may apply to a hub id naming WikiText, or to local files given under a
        name starting with "wikitext" (so `--source wikitext=DIR` keeps the rules of the source it
        replaces). A hub source is judged by its id alone: `wikitext=some/other-dataset` is not.
        They then apply to each stream (file) whose first rows hold a ` = Title = ` line."""
        if self.hub is not None:
            dataset_name = self.hub.repo_id.rsplit("/", 1)[-1].lower()
            return dataset_name == "wikitext"
        return self.name.lower().startswith("wikitext")

    def describe(self) -> dict[str, Any]:
        """What corpus.json records about where this source's text came from."""
        if self.hub is not None:
            where: dict[str, Any] = {
                "kind": "hub",
                "hub_id": self.hub.repo_id,
                "hub_config": self.hub.config,
                "split": DEFAULT_SPLIT,
            }
        else:
            where = {"kind": "local", "path": self.given_as, "files": [str(f) for f in self.files]}
        return {"name": self.name, "weight": self.weight, **where}


# --- the flags -------------------------------------------------------------------------------


def resolve_sources(source_flags: list[str], ratio_flags: list[str]) -> list[SourceSpec]:
    """The mixture the flags ask for: the defaults, with `--source` replacing or adding sources
    (in the order given) and `--ratio` setting weights. Any bad value is a one-line UsageError."""
    where: dict[str, HubDataset | tuple[str, tuple[Path, ...]]] = dict(DEFAULT_SOURCES)
    given_as = {name: str(hub) for name, hub in DEFAULT_SOURCES.items()}
    replaced: set[str] = set()
    for flag in source_flags:
        name, value = _split_name_value("--source", flag, "NAME=PATH or NAME=HUB_ID[:CONFIG]")
        if name in replaced:
            raise UsageError(f"--source {name}=...: given twice; give each source once")
        replaced.add(name)
        where[name] = _parse_source_value(name, value)
        given_as[name] = value
    weights = _parse_ratio(ratio_flags, list(where))
    specs = []
    for name, target in where.items():
        if weights[name] == 0:  # left out: its files are not read, its hub never asked
            continue
        if isinstance(target, HubDataset):
            specs.append(SourceSpec(name, weights[name], given_as[name], hub=target))
        else:
            specs.append(SourceSpec(name, weights[name], given_as[name], files=target[1]))
    return specs


def _split_name_value(flag: str, text: str, form: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name or not value:
        raise UsageError(f"{flag} {text!r}: expected {form}")
    if not NAME_RE.match(name):
        raise UsageError(
            f"{flag} {text!r}: source name {name!r} must be letters, digits, '_', '-' or '.'"
        )
    return name, value


def _parse_source_value(name: str, value: str) -> HubDataset | tuple[str, tuple[Path, ...]]:
    """A value is local when it names existing files, is a glob, or is written as a path
    (starts with /, ./, ../ or ~, or ends in a data file extension); else it must be a hub id."""
    expanded = os.path.expanduser(value)
    looks_like_path = (
        os.path.exists(expanded)
        or GLOB_CHARS.search(value) is not None
        or value.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or Path(value).suffix.lower() in DATA_SUFFIXES
    )
    if looks_like_path:
        return value, local_files(name, value)
    if HUB_ID_RE.match(value):
        repo_id, _, config = value.partition(":")
        return HubDataset(repo_id, config or None)
    raise UsageError(
        f"--source {name}={value}: no such file or folder, and not a hub id (OWNER/NAME[:CONFIG])"
    )


def _parse_ratio(ratio_flags: list[str], names: list[str]) -> dict[str, float]:
    """`--ratio W1:W2:...` gives every source's weight in order (default sources first, then
    added ones); `--ratio NAME=W` sets one source's weight, over the defaults or W1:W2:....
    A weight of 0 leaves a source out (e.g. a default source you have no local copy of)."""
    weights: dict[str, float | None] = {name: DEFAULT_WEIGHTS.get(name) for name in names}
    positional = [flag.strip() for flag in ratio_flags if "=" not in flag]
    by_name = [flag.strip() for flag in ratio_flags if "=" in flag]
    if len(positional) > 1:
        raise UsageError(f"--ratio {positional[1]}: W1:W2:... given twice; give it once")
    for text in positional:
        parts = text.split(":")
        if len(parts) != len(names):
            raise UsageError(
                f"--ratio {text}: {len(parts)} weight(s) for {len(names)} sources "
                f"({':'.join(names)}); give one per source, or NAME=W"
            )
        for name, part in zip(names, parts, strict=True):
            weights[name] = _parse_weight(part, f"--ratio {text}")
    for text in by_name:
        name, value = _split_name_value("--ratio", text, "NAME=W or W1:W2:...")
        if name not in weights:
            raise UsageError(
                f"--ratio {text}: no source named {name!r} (sources: {', '.join(names)}); "
                f"add it with --source {name}=PATH"
            )
        weights[name] = _parse_weight(value, f"--ratio {text}")
    missing = [name for name, weight in weights.items() if weight is None]
    if missing:
        raise UsageError(
            f"source {missing[0]!r} has no weight: add --ratio {missing[0]}=W "
            f"(or --ratio W1:W2:... for all {len(names)} sources)"
        )
    if not any(weights.values()):
        raise UsageError("--ratio: every source has weight 0; give at least one a positive weight")
    return {name: float(weight) for name, weight in weights.items() if weight is not None}


def _parse_weight(text: str, context: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise UsageError(f"{context}: weight {text!r} is not a number") from None
    if not weight >= 0 or weight == float("inf"):
        raise UsageError(f"{context}: weight {text!r} must be a number >= 0 (0 leaves it out)")
    return weight


# --- local files -----------------------------------------------------------------------------


def local_files(name: str, value: str) -> tuple[Path, ...]:
    """The files a local `--source` value names: a file as is; a folder's files recursively and a
    glob's matches, in sorted order, without hidden files, README/markdown or licence files."""
    expanded = os.path.expanduser(value)
    path = Path(expanded)
    if path.is_file():
        return (path,)
    if path.is_dir():
        candidates = _folder_files(path)
    elif GLOB_CHARS.search(expanded):
        matches = [Path(p) for p in glob.glob(expanded, recursive=True)]
        candidates = [f for m in matches for f in (_folder_files(m) if m.is_dir() else [m])]
    else:
        raise UsageError(f"--source {name}={value}: no such file or folder")
    files = sorted({p for p in candidates if p.is_file()})
    kept = [p for p in files if not _not_training_text(p)]
    if not kept:
        skipped = f" ({len(files)} README/markdown/licence file(s) skipped)" if files else ""
        raise UsageError(f"--source {name}={value}: matches no data files{skipped}")
    return tuple(kept)


def _folder_files(folder: Path) -> list[Path]:
    """Everything under `folder`, hidden files and folders (.git, .cache, ...) left out."""
    return [
        p
        for p in folder.rglob("*")
        if not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]


def _not_training_text(path: Path) -> bool:
    """README, markdown and licence files describe a dataset; they are not part of it."""
    lower = path.name.lower()
    return any(Path(lower).match(pattern) for pattern in SKIPPED_IN_FOLDERS)


# --- the hub ---------------------------------------------------------------------------------


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def check_hub_reachable(specs: list[SourceSpec], timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line saying what to do, when hub sources cannot be streamed:
    offline mode is on, or the endpoint does not answer (no network, closed port, bad DNS).
    `datasets` itself would retry for a minute before failing with a long traceback."""
    hub_specs = [s for s in specs if s.is_hub]
    if not hub_specs:
        return
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if _env_true(v)]
    if offline:
        _raise_unreachable(hub_specs, f"{offline[0]}=1 is set")
    endpoint = hub_endpoint()
    request = urllib.request.Request(endpoint + "/api/datasets?limit=1", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        pass  # the server answered: it is reachable (an error status is the dataset's business)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        _raise_unreachable(hub_specs, f"{endpoint} did not answer: {reason}")


def _raise_unreachable(hub_specs: list[SourceSpec], why: str) -> None:
    names = ", ".join(f"{s.name}={s.given_as}" for s in hub_specs)
    example = hub_specs[0].name
    # A --source value like data/wikitext reads as a hub id when no such folder exists here.
    typed = [s for s in hub_specs if s.given_as != str(DEFAULT_SOURCES.get(s.name, ""))]
    hint = (
        f" (if {typed[0].given_as} is a local path, it does not exist here: check it, or write "
        f"it as ./{typed[0].given_as})"
        if typed
        else ""
    )
    raise MllmError(
        f"cannot reach the Hugging Face Hub ({why}) to stream {names}{hint}; build from local "
        f"files instead with --source NAME=PATH for each of them (a file, folder or glob, e.g. "
        f"--source {example}=path/to/{example})"
    )


# --- reading: rows -> documents --------------------------------------------------------------


def read_documents(
    spec: SourceSpec, layouts: dict[str, str] | None = None, batch_size: int = 1000
) -> Iterator[str]:
    """The raw documents of one source, in file/stream order (not yet whitespace-normalised),
    each free of `<|endoftext|>` and NUL. `layouts`, when given, receives the document rule
    applied to each file (or hub dataset) read: e.g. "wikitext-articles", "rows", "text:line"."""
    layouts = {} if layouts is None else layouts
    if spec.hub is not None:
        documents = _hub_documents(spec, layouts, batch_size)
    else:
        documents = _local_documents(spec, layouts, batch_size)
    for document in documents:
        yield from split_at_separators(document)


def split_at_separators(text: str) -> list[str]:
    """`<|endoftext|>` and NUL end a document wherever they appear."""
    return SEPARATOR_RE.split(text) if ("\x00" in text or "<|" in text) else [text]


@contextlib.contextmanager
def _streaming_without_torch() -> Iterator[None]:
    """Build `datasets` streams without importing torch (2 s): an IterableDataset imports it only
    to share its epoch counter with DataLoader workers, and these streams never meet torch."""
    from datasets import config

    torch_available = config.TORCH_AVAILABLE
    config.TORCH_AVAILABLE = False
    try:
        yield
    finally:
        config.TORCH_AVAILABLE = torch_available


def _load_stream(path: str, **kwargs: Any) -> Any:
    """`datasets.load_dataset(path, streaming=True, ...)`: the one way every source is read."""
    import datasets

    if not progress_enabled():  # no tqdm bars ("Resolving data files") in logs or with --quiet
        datasets.disable_progress_bars()
    if is_quiet():
        datasets.logging.set_verbosity_error()
    with _streaming_without_torch():
        return datasets.load_dataset(path, streaming=True, **kwargs)


def _hub_documents(spec: SourceSpec, layouts: dict[str, str], batch_size: int) -> Iterator[str]:
    assert spec.hub is not None
    try:
        dataset = _load_stream(spec.hub.repo_id, name=spec.hub.config, split=DEFAULT_SPLIT)
        rows = _texts(dataset, batch_size, where=f"hub dataset {spec.hub}")
        yield from _documents(spec, rows, "rows", None, layouts, str(spec.hub))
    except MllmError:
        raise
    except Exception as e:  # datasets raises many types (connection, not found, bad config)
        raise MllmError(
            f"cannot stream hub dataset {spec.hub} for source {spec.name!r}: {first_line(e)}"
        ) from e


def _local_documents(spec: SourceSpec, layouts: dict[str, str], batch_size: int) -> Iterator[str]:
    produced = 0
    for path in spec.files:
        for document in _file_documents(spec, path, layouts, batch_size):
            produced += 1
            yield document
    if produced == 0:
        raise MllmError(
            f"--source {spec.name}={spec.given_as}: its {len(spec.files)} file(s) hold no text"
        )


def _file_documents(
    spec: SourceSpec, path: Path, layouts: dict[str, str], batch_size: int
) -> Iterator[str]:
    """One local file's documents, read through `datasets` like a hub dataset. Each file is its
    own stream, so no document runs from the end of one file into the next."""
    builder = ROW_FORMATS.get(path.suffix.lower(), "text")
    # text and json read 10 MB at a time by default: ~200 MB of Python strings per stream at
    # once; 1 MiB is as fast and keeps three sources well under 100 MB together
    read_size = {"chunksize": LOCAL_CHUNK_BYTES} if builder in ("text", "json") else {}
    try:
        dataset = _load_stream(builder, data_files=[str(path)], split="train", **read_size)
        rows = _texts(dataset, batch_size, where=f"file {path}")
        yield from _documents(spec, rows, builder, path, layouts, str(path))
    except MllmError:
        raise
    except UnicodeDecodeError:
        raise MllmError(
            f"--source {spec.name}: {path} is not UTF-8 text; convert it, or leave it out of "
            "the folder/glob"
        ) from None
    except Exception as e:  # pyarrow / json errors on a corrupt or mislabelled file
        raise MllmError(
            f"--source {spec.name}: cannot read {path} as {builder}: {first_line(e)}"
        ) from e


def _documents(
    spec: SourceSpec,
    rows: Iterator[str],
    builder: str,
    path: Path | None,
    layouts: dict[str, str],
    where: str,
) -> Iterator[str]:
    """Apply the document rule of one stream of rows (a hub dataset or one file)."""
    if spec.wikitext_like:
        head = list(itertools.islice(rows, WIKITEXT_SNIFF_ROWS))
        rows = itertools.chain(head, rows)
        if any(WIKITEXT_TITLE_RE.match(row.rstrip()) for row in head):
            layouts[where] = "wikitext-articles"
            yield from wikitext_documents(rows)
            return
    if builder == "text" and path is not None:
        layout = sniff_text_layout(path)
        layouts[where] = f"text:{layout}"
        yield from plain_text_documents(rows, layout)
    else:
        layouts[where] = "rows"
        yield from rows


def _texts(dataset: Any, batch_size: int, where: str) -> Iterator[str]:
    """The `text` column of a streamed dataset, row by row (None rows skipped)."""
    columns = dataset.column_names
    if columns is not None and TEXT_COLUMN not in columns:
        raise MllmError(
            f"{where} has no {TEXT_COLUMN!r} column (columns: {', '.join(columns)}); "
            "only a 'text' column is read"
        )
    if columns is not None and len(columns) > 1:
        with _streaming_without_torch():
            dataset = dataset.select_columns([TEXT_COLUMN])
    for batch in dataset.iter(batch_size=batch_size):
        if TEXT_COLUMN not in batch:
            raise MllmError(f"{where} has no {TEXT_COLUMN!r} column (columns: {', '.join(batch)})")
        for text in batch[TEXT_COLUMN]:
            if text is None:
                continue
            if not isinstance(text, str):
                raise MllmError(f"{where}: column 'text' holds {type(text).__name__}, not text")
            yield text


# --- plain-text layout -----------------------------------------------------------------------

TextLayout = Literal["separator", "paragraph", "line"]
SNIFF_BYTES = 1 << 20
BLANK_LINE_RE = re.compile(rb"\n[ \t\r\f\v]*\n")


def sniff_text_layout(path: Path) -> TextLayout:
    """How a plain-text file marks its documents, judged from its first MiB:

    - "separator": it uses `<|endoftext|>` or NUL (TinyStories' hub .txt files, NUL-separated
      dumps): only these end a document; blank lines inside are paragraph breaks;
    - "paragraph": it has blank lines: a blank line ends a document;
    - "line": neither: every line is a document (the common one-document-per-line layout).
    """
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if END_OF_TEXT.encode() in head or b"\x00" in head:
        return "separator"
    if BLANK_LINE_RE.search(head.replace(b"\r\n", b"\n")):
        return "paragraph"
    return "line"


def plain_text_documents(lines: Iterable[str], layout: TextLayout) -> Iterator[str]:
    """Group a plain-text file's lines into documents (joined by newlines) by its layout; a
    `<|endoftext|>` or NUL anywhere in a line ends the document there, in every layout."""
    current: list[str] = []
    for line in lines:
        pieces = split_at_separators(line)
        for index, piece in enumerate(pieces):
            blank = not piece.strip()
            if current and (index > 0 or (blank and layout == "paragraph")):
                yield "\n".join(current)
                current = []
            if not blank:
                current.append(piece)
        if current and layout == "line":
            yield "\n".join(current)
            current = []
    if current:
        yield "\n".join(current)


# --- WikiText --------------------------------------------------------------------------------

WIKITEXT_SNIFF_ROWS = 1000
WIKITEXT_TITLE_RE = re.compile(r"^ ?= (?!=)(.*[^=]) = ?$")  # " = Title = "
WIKITEXT_HEADING_RE = re.compile(r"^ ?(= ){2,}.*( =){2,} ?$")  # " = = Section = = "
WIKITEXT_ARTEFACTS = (
    (re.compile(r" @([-,.])@ "), r"\1"),  # "guest @-@ star", "1 @,@ 000", "3 @.@ 5"
    (re.compile(r" ?<unk> ?"), " "),  # tokenised WikiText's out-of-vocabulary placeholder
)


def wikitext_documents(lines: Iterable[str]) -> Iterator[str]:
    """WikiText lines -> one document per article.

    An article starts at a top-level ` = Title = ` line and runs to the next; its paragraph lines
    are joined by newlines. Headings (title and ` = = Section = = `) are dropped: joined into one
    line they would run into the text without punctuation, and each article's first sentence
    names its subject anyway. Blank lines are paragraph gaps. Lines before the first title (a file
    that starts mid-article) form a document of their own. ` @-@ `, ` @,@ `, ` @.@ ` become
    `-`, `,`, `.`; `<unk>` placeholders (tokenised WikiText) are removed.
    """
    paragraphs: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        stripped = line.strip()
        if not stripped:
            continue
        if WIKITEXT_TITLE_RE.match(line.rstrip()):
            if paragraphs:
                yield "\n".join(paragraphs)
                paragraphs = []
            continue
        if WIKITEXT_HEADING_RE.match(line.rstrip()):
            continue
        for pattern, replacement in WIKITEXT_ARTEFACTS:
            stripped = pattern.sub(replacement, stripped)
        if stripped.strip():
            paragraphs.append(stripped.strip())
    if paragraphs:
        yield "\n".join(paragraphs)
