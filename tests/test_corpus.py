"""`mllm corpus`: normalisation, dedup, quotas, interleaving, determinism, shortfall, the files it
writes and the errors it gives, mostly through the real CLI on tiny local sources."""

from __future__ import annotations

import http.server
import itertools
import json
import random
import re
import socket
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm.cliargs import parse_config
from mllm.config import CorpusConfig
from mllm.data.corpus import (
    SeenHashes,
    buffered_shuffle,
    build_corpus,
    normalise_whitespace,
    split_quota,
)
from mllm.data.sources import END_OF_TEXT
from mllm.errors import UsageError

DEFAULT_NAMES = ("wikitext", "fineweb", "tinystories")

# --- the pieces ------------------------------------------------------------------------------

REFERENCE_WHITESPACE = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u200b\u2060\ufeff]+")


WHITESPACE_PIECES = st.sampled_from(
    [
        *("a", "é", "z", " ", "  ", "\n", "\r\n", "\t", "\x00", "\x07", "\x1f", "\x7f"),
        *("\x85", "\x9c", "\xa0", "\xad", "\u2028", "\u200b", "\u200d", "\u3000", "\ufeff"),
    ]
)


@given(st.lists(WHITESPACE_PIECES).map("".join))
def test_normalise_whitespace_matches_its_definition(text: str) -> None:
    normalised = normalise_whitespace(text)
    assert normalised == REFERENCE_WHITESPACE.sub(" ", text).strip()
    assert "\n" not in normalised and "\x00" not in normalised and "  " not in normalised


def test_normalise_whitespace_examples() -> None:
    assert normalise_whitespace("  a\r\n\tb \x00 c\u200bd\ufeff ") == "a b c d"
    assert normalise_whitespace("plain text") == "plain text"
    assert normalise_whitespace("zwj\u200dkept") == "zwj\u200dkept"  # joins emoji; not a space


@given(st.lists(st.binary(max_size=6), max_size=400), st.integers(1, 50))
def test_seen_hashes_agree_with_a_set(items: list[bytes], expected: int) -> None:
    seen, reference = SeenHashes(expected), set()  # small `expected`: the table must grow
    for item in items:
        assert seen.add(item) == (item not in reference)
        reference.add(item)
    assert len(seen) == len(reference)


@given(st.integers(0, 10**7), st.lists(st.floats(0.01, 100), min_size=1, max_size=8))
def test_split_quota_sums_and_follows_the_weights(total: int, weights: list[float]) -> None:
    quotas = split_quota(total, weights)
    assert sum(quotas) == total
    for quota, weight in zip(quotas, weights, strict=True):
        assert abs(quota - total * weight / sum(weights)) < 1


def test_buffered_shuffle_is_a_seeded_permutation() -> None:
    items = [str(i) for i in range(1000)]
    first = list(buffered_shuffle(items, 64, random.Random(1)))
    assert sorted(first) == sorted(items) and first != items
    assert first == list(buffered_shuffle(items, 64, random.Random(1)))
    assert first != list(buffered_shuffle(items, 64, random.Random(2)))


# --- fixtures: three local sources of distinct, tagged documents -----------------------------


def _doc(tag: str, i: int) -> str:
    return f"{tag} document {i:04d}: some words so that it is long enough to keep, {tag}."


@pytest.fixture
def three_sources(tmp_path: Path) -> list[str]:
    """NAME=PATH for the default names, one file format each: jsonl, parquet, plain text."""
    folder = tmp_path / "src"
    folder.mkdir()
    jsonl = folder / "alpha.jsonl"
    jsonl.write_text("".join(json.dumps({"text": _doc("alpha", i)}) + "\n" for i in range(400)))
    parquet = folder / "beta.parquet"
    pq.write_table(pa.table({"text": [_doc("beta", i) for i in range(400)]}), parquet)
    text = folder / "gamma.txt"
    text.write_text("".join(_doc("gamma", i) + "\n" for i in range(400)))
    return [f"wikitext={jsonl}", f"fineweb={parquet}", f"tinystories={text}"]


def _flags(sources: list[str]) -> list[str]:
    return [f"--source={source}" for source in sources]


def _build(tmp_path: Path, sources: list[str], **options: Any) -> dict[str, Any]:
    """build_corpus in this process (for what the CLI adds nothing to); returns corpus.json."""
    config = CorpusConfig(source=sources, output=tmp_path / "data" / "corpus.txt", **options)
    return build_corpus(config)


def _lines(path: Path) -> list[str]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return data.decode("utf-8").split("\n")[:-1]


def _tags(lines: list[str]) -> list[str]:
    return [line.split(" ", 1)[0] for line in lines]


# --- building, in process --------------------------------------------------------------------


def test_dedup_min_chars_and_separators(tmp_path: Path) -> None:
    long = "a sentence long enough to pass the minimum length of sixty-four characters"
    text = tmp_path / "dups.txt"  # one document per line
    text.write_text(
        f"{long} one\n"
        f"{long}   one\n"  # a duplicate once whitespace is normalised
        f"\t{long} one \n"  # and again
        "short line\n"
        f"{long} \x07two\n"
        f"{long} one\n"
    )
    jsonl = tmp_path / "rows.jsonl"
    rows = [f"{long}\r\none", f"{long} three{END_OF_TEXT}{long} four\x00{long} five", "tiny"]
    jsonl.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": [f"{long} six", f"{long} six"]}), parquet)
    sources = [f"wikitext={text}", f"fineweb={jsonl}", f"tinystories={parquet}"]
    meta = _build(tmp_path, sources, max_lines=300, ratio=["1:1:1"])
    lines = _lines(tmp_path / "data" / "corpus.txt")
    words = ["one", "two", "three", "four", "five", "six"]
    assert sorted(lines) == sorted(f"{long} {word}" for word in words)
    by_name = {s["name"]: s for s in meta["sources"]}
    assert by_name["wikitext"]["too_short"] == 1 and by_name["fineweb"]["too_short"] == 1
    assert by_name["wikitext"]["duplicates"] + by_name["fineweb"]["duplicates"] == 4
    assert by_name["tinystories"]["duplicates"] == 1
    assert all(s["shortfall"] == s["requested"] - s["written"] for s in by_name.values())


def test_min_chars_zero_keeps_short_documents(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("a\nbb\nccc\n")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(json.dumps({"text": " \n "}) + "\n" + json.dumps({"text": "d"}) + "\n")
    sources = [f"{name}={jsonl if name == 'fineweb' else text}" for name in DEFAULT_NAMES]
    meta = _build(tmp_path, sources, min_chars=0, max_lines=9, ratio=["1:1:1"])
    assert sorted(_lines(tmp_path / "data" / "corpus.txt")) == ["a", "bb", "ccc", "d"]
    fineweb = meta["sources"][1]
    assert (fineweb["written"], fineweb["too_short"]) == (1, 1)  # an empty document never counts


def test_folder_sources_skip_readme_and_mix_formats(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    (folder / "nested").mkdir(parents=True)
    (folder / "README.md").write_text(f"# About this data, {_doc('readme', 0)}\n")
    (folder / "notes.md").write_text(_doc("markdown", 0) + "\n")
    (folder / "a.txt").write_bytes(f"{_doc('crlf', 1)}\r\n\r\n{_doc('crlf', 2)}\r\n".encode())
    (folder / "nested" / "b.jsonl").write_text(json.dumps({"text": _doc("json", 1)}) + "\n")
    pq.write_table(pa.table({"text": [_doc("parquet", 1)]}), folder / "nested" / "c.parquet")
    sources = [f"wikitext={folder}", f"fineweb={folder}", f"tinystories={folder}/**/*.jsonl"]
    _build(tmp_path, sources, max_lines=100)
    lines = _lines(tmp_path / "data" / "corpus.txt")
    assert sorted(lines) == sorted(
        [_doc("crlf", 1), _doc("crlf", 2), _doc("json", 1), _doc("parquet", 1)]
    )


def test_added_source_with_a_named_weight(tmp_path: Path, three_sources: list[str]) -> None:
    extra = tmp_path / "extra.txt"
    extra.write_text("".join(_doc("delta", i) + "\n" for i in range(100)))
    _build(tmp_path, [*three_sources, f"books={extra}"], ratio=["books=2"], max_lines=120)
    tags = _tags(_lines(tmp_path / "data" / "corpus.txt"))
    assert [tags.count(t) for t in ("alpha", "beta", "gamma", "delta")] == [40, 40, 20, 20]


def test_ratio_from_a_config_file(tmp_path: Path, three_sources: list[str]) -> None:
    config_file = tmp_path / "corpus.yaml"
    config_file.write_text('ratio: "1:1:8"\nmax-lines: 100\n')
    sources = [word for source in three_sources for word in ("--source", source)]
    config = parse_config(CorpusConfig, [*sources, "--config", str(config_file)])
    build_corpus(config.model_copy(update={"data_dir": tmp_path / "data"}))
    tags = _tags(_lines(tmp_path / "data" / "corpus.txt"))
    assert (tags.count("alpha"), tags.count("beta"), tags.count("gamma")) == (10, 10, 80)
    config_file.write_text("ratio: 1:1:8\n")  # YAML 1.1 reads this as a base-60 number
    with pytest.raises(
        UsageError, match=re.escape('--ratio: give it as a quoted string, e.g. ratio: "4:4:2"')
    ):
        parse_config(CorpusConfig, ["--config", str(config_file)])


def test_shared_data_extra_corpus(tmp_path: Path, shared_data_extra: Path) -> None:
    sources = [f"{name}={shared_data_extra / name}" for name in DEFAULT_NAMES]
    meta = _build(tmp_path, sources, max_lines=20000)
    data = (tmp_path / "data" / "corpus.txt").read_bytes()
    assert END_OF_TEXT.encode() not in data and b"\x00" not in data and b"<unk>" not in data
    assert b"@-@" not in data and b"\r" not in data
    layouts = {Path(k).name: v for s in meta["sources"] for k, v in s["layouts"].items()}
    assert layouts["tinystories_all_data_stories_first512000bytes_NULsep.txt"] == "text:separator"
    assert layouts["tinystoriesV2_gpt4_train_first10000lines.txt"] == "text:separator"
    assert layouts["fineweb_edu_sample10BT_first1Mchars.txt"] == "text:line"
    assert layouts["wikitext2_raw_wiki.valid.raw"] == "wikitext-articles"
    assert not any("README" in name for name in layouts)


# --- through the CLI -------------------------------------------------------------------------


def test_mix_follows_the_ratio_interleaved_and_seeded(
    run_cli, tmp_path: Path, three_sources: list[str]
) -> None:
    args = ["corpus", *_flags(three_sources), "--ratio=5:3:2", "--max-lines=300", "--seed=7"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    lines = _lines(tmp_path / "data" / "corpus.txt")
    tags = _tags(lines)
    assert (tags.count("alpha"), tags.count("beta"), tags.count("gamma")) == (150, 90, 60)
    assert len(set(lines)) == 300
    # interleaved: each source shows up all along, not one after another
    for third in (tags[:100], tags[100:200], tags[200:]):
        assert {"alpha", "beta", "gamma"} <= set(third)
    switches = sum(a != b for a, b in itertools.pairwise(tags))
    assert switches > 100
    # shuffled within a source (buffered shuffle), not file order
    alpha_numbers = [int(line.split()[2].rstrip(":")) for line in lines if line.startswith("alpha")]
    assert alpha_numbers != sorted(alpha_numbers)

    meta = json.loads((tmp_path / "data" / "corpus.json").read_text())
    assert meta["documents"] == 300 and meta["seed"] == 7
    assert [s["written"] for s in meta["sources"]] == [150, 90, 60]
    assert [s["requested"] for s in meta["sources"]] == [150, 90, 60]
    assert meta["sources"][1]["layouts"] == {meta["sources"][1]["files"][0]: "rows"}
    assert meta["sources"][2]["layouts"] == {meta["sources"][2]["files"][0]: "text:line"}
    assert meta["config"]["ratio"] == ["5:3:2"] and meta["config"]["max_lines"] == 300

    again = run_cli(*args, "--output", "again/corpus.txt", "-q")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / "corpus.txt").read_bytes() == (
        tmp_path / "data" / "corpus.txt"
    ).read_bytes()
    other = run_cli(*args[:-1], "--seed=8", "--output", "other/corpus.txt", "-q")
    assert other.returncode == 0, other.stderr
    other_lines = _lines(tmp_path / "other" / "corpus.txt")
    assert other_lines != lines and _tags(other_lines).count("alpha") == 150


def test_shortfall_is_reported_and_the_corpus_still_written(
    run_cli, tmp_path: Path, three_sources: list[str]
) -> None:
    result = run_cli("corpus", *_flags(three_sources), "--max-lines=2000")  # 800:800:400
    assert result.returncode == 0, result.stderr
    stderr = " ".join(result.stderr.split())
    assert "source wikitext ran out: 400 of 800 documents written (shortfall 400)" in stderr
    assert "source tinystories ran out" not in stderr
    assert re.search(
        r"wikitext 800 400 0 0 400 fineweb 800 400 0 0 400 tinystories 400 400", stderr
    )
    assert "wrote 1,200 documents" in stderr and result.stdout == ""
    assert len(_lines(tmp_path / "data" / "corpus.txt")) == 1200
    meta = json.loads((tmp_path / "data" / "corpus.json").read_text())
    assert [(s["written"], s["shortfall"]) for s in meta["sources"]] == [
        (400, 400),
        (400, 400),
        (400, 0),
    ]


def test_quiet_prints_nothing_without_shortfall(
    run_cli, tmp_path: Path, three_sources: list[str]
) -> None:
    result = run_cli("corpus", *_flags(three_sources), "--max-lines=30", "--output=x/c.txt", "-q")
    assert result.returncode == 0 and result.stderr == "" and result.stdout == ""
    assert len(_lines(tmp_path / "x" / "c.txt")) == 30 and (tmp_path / "x" / "c.json").is_file()


def test_shared_data_corpus(run_cli, tmp_path: Path, shared_data: Path) -> None:
    sources = [f"{name}={shared_data / name}" for name in DEFAULT_NAMES]
    result = run_cli("corpus", *_flags(sources), "--max-lines=5000", "-q")
    assert result.returncode == 0, result.stderr
    data = (tmp_path / "data" / "corpus.txt").read_bytes()
    assert END_OF_TEXT.encode() not in data and b"\x00" not in data and b"\r" not in data
    lines = data.decode("utf-8").split("\n")[:-1]
    assert all(len(line) >= 64 and line == line.strip() for line in lines)
    meta = json.loads((tmp_path / "data" / "corpus.json").read_text())
    by_name = {s["name"]: s for s in meta["sources"]}
    assert by_name["wikitext"]["written"] == 62  # every article of wiki.test.raw
    assert by_name["tinystories"]["written"] == 1000  # 4:4:2 of 5,000
    assert by_name["fineweb"]["written"] == 1  # the one document there is
    assert not any(s["kind"] == "hub" for s in meta["sources"])
    assert meta["sha256"] and meta["bytes"] == len(data) and meta["documents"] == len(lines)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--source", "wikitext"], "expected NAME=PATH or NAME=HUB_ID"),
        (["--ratio", "books=1"], "no source named 'books'"),
        (["--ratio", "4:-1:2"], "must be a number >= 0"),
        (["--ratio", "4:4"], "2 weight(s) for 3 sources"),
        (["--source", "wikitext=./missing/*.txt"], "matches no data files"),
        (["--max-lines", "0"], "--max-lines"),
    ],
)
def test_bad_flags_exit_2_with_one_line(run_cli, args: list[str], expected: str) -> None:
    result = run_cli("corpus", *args)
    assert result.returncode == 2, result.stderr
    assert expected in " ".join(result.stderr.split())
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr


def test_a_source_with_no_usable_text_is_an_error(
    run_cli, tmp_path: Path, three_sources: list[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n\n   \n")
    (empty / "README.md").write_text("# nothing here\n")
    flags = [*_flags(three_sources), f"--source=books={empty}", "--ratio=books=1"]
    result = run_cli("corpus", *flags)
    assert result.returncode == 1
    assert f"--source books={empty}: its 1 file(s) hold no text" in " ".join(result.stderr.split())
    assert not (tmp_path / "data" / "corpus.txt").exists()


def test_a_failing_run_leaves_the_old_corpus_alone(
    run_cli, tmp_path: Path, three_sources: list[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.txt").write_text("old corpus\n")
    (data / "corpus.json").write_text("{}\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_text("".join(_doc("fine", i) + "\n" for i in range(50)))
    (bad / "b.txt").write_bytes(b"\xff\xfe not utf-8\n")
    flags = [*_flags(three_sources[:2]), f"--source=tinystories={bad}", "--max-lines=1000"]
    result = run_cli("corpus", *flags)
    assert result.returncode == 1
    assert "b.txt is not UTF-8 text" in " ".join(result.stderr.split())
    assert (data / "corpus.txt").read_text() == "old corpus\n"
    assert (data / "corpus.json").read_text() == "{}\n"
    assert sorted(p.name for p in data.iterdir()) == ["corpus.json", "corpus.txt"]


def test_hub_offline_fails_at_once_with_the_fix(run_cli) -> None:
    result = run_cli("corpus", timeout=60)
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "cannot reach the Hugging Face Hub (HF_HUB_OFFLINE=1 is set)" in message
    assert "--source NAME=PATH" in message and result.stderr.count("error:") == 1


def test_a_mistyped_local_path_read_as_a_hub_id_gets_a_hint(run_cli) -> None:
    result = run_cli("corpus", "--source", "wikitext=mydata/wikitext", "--ratio", "4:0:0")
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "if mydata/wikitext is a local path, it does not exist here" in message


def _online_env(endpoint: str) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": endpoint}


def test_hub_endpoint_on_a_closed_port_fails(run_cli, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = tmp_path / "t.txt"
    text.write_text(_doc("local", 0) + "\n")
    # one hub source is enough to need the hub; a timeout well under datasets' minute of retries
    flags = _flags([f"wikitext={text}", f"fineweb={text}"])
    result = run_cli("corpus", *flags, env=_online_env(f"http://127.0.0.1:{port}"), timeout=30)
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert f"http://127.0.0.1:{port} did not answer" in message
    assert "tinystories=roneneldan/TinyStories" in message and "fineweb=" not in message
    assert not (tmp_path / "data" / "corpus.txt").exists()


def test_hub_errors_after_the_probe_are_one_clear_line(run_cli, tmp_path: Path) -> None:
    """A hub that answers but has no such dataset: the datasets error, cut to one line."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    text = tmp_path / "t.txt"
    text.write_text(_doc("local", 0) + "\n")
    flags = _flags([f"wikitext={text}", f"fineweb={text}"])
    endpoint = f"http://127.0.0.1:{server.server_port}"
    try:
        result = run_cli("corpus", *flags, env=_online_env(endpoint), timeout=60)
    finally:
        server.shutdown()
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    expected = "error: cannot stream hub dataset roneneldan/TinyStories for source 'tinystories'"
    assert expected in message
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "corpus.txt").exists()


def test_an_all_local_corpus_with_default_sources_left_out_works_offline(run_cli, tmp_path):
    stories = tmp_path / "stories.txt"
    line = "Story number {} is about a cat, a dog and the long walk they took to the sea.\n"
    stories.write_text("".join(line.format(i) for i in range(50)))
    result = run_cli(
        "corpus",
        "--data-dir",
        tmp_path / "d",
        "--source",
        f"tinystories={stories}",
        "--ratio",
        "wikitext=0",
        "--ratio",
        "fineweb=0",
        "--max-lines",
        "20",
    )
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "d" / "corpus.txt").read_text().splitlines()) == 20
