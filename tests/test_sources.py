"""Where corpus text comes from: the --source/--ratio flags, local files of each format, the
document rules (plain-text layouts, separators, WikiText articles) and the hub check."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm.data.sources import (
    END_OF_TEXT,
    HubDataset,
    SourceSpec,
    check_hub_reachable,
    local_files,
    plain_text_documents,
    read_documents,
    resolve_sources,
    sniff_text_layout,
    wikitext_documents,
)
from mllm.errors import MllmError, UsageError

# --- flags -----------------------------------------------------------------------------------


def test_defaults_are_the_three_hub_sources_at_4_4_2() -> None:
    specs = resolve_sources([], [])
    assert [(s.name, s.weight, s.hub) for s in specs] == [
        ("wikitext", 4.0, HubDataset("Salesforce/wikitext", "wikitext-103-raw-v1")),
        ("fineweb", 4.0, HubDataset("HuggingFaceFW/fineweb", "sample-10BT")),
        ("tinystories", 2.0, HubDataset("roneneldan/TinyStories", None)),
    ]
    assert [s.wikitext_like for s in specs] == [True, False, False]


def test_source_replaces_by_name_and_adds_new_names_in_order(tmp_path: Path) -> None:
    books = tmp_path / "books.txt"
    books.write_text("a book\n")
    specs = resolve_sources(
        [f"tinystories={books}", "code=bigcode/the-stack:python", f"books={books}"],
        ["1:2:3:4:5", "code=0.5"],
    )
    by_name = {s.name: s for s in specs}
    assert [s.name for s in specs] == ["wikitext", "fineweb", "tinystories", "code", "books"]
    assert by_name["tinystories"].files == (books,) and not by_name["tinystories"].is_hub
    assert by_name["code"].hub == HubDataset("bigcode/the-stack", "python")
    assert [s.weight for s in specs] == [1.0, 2.0, 3.0, 0.5, 5.0]  # NAME=W wins over W1:...


def test_ratio_by_name_keeps_the_other_defaults() -> None:
    specs = resolve_sources([], ["fineweb=1.5"])
    assert [s.weight for s in specs] == [4.0, 1.5, 2.0]


def test_weight_zero_leaves_a_source_out(tmp_path: Path) -> None:
    stories = tmp_path / "stories.txt"
    stories.write_text("a story\n")
    specs = resolve_sources([f"tinystories={stories}"], ["wikitext=0", "fineweb=0"])
    assert [(s.name, s.weight, s.is_hub) for s in specs] == [("tinystories", 2.0, False)]
    assert [s.name for s in resolve_sources([], ["4:0:2"])] == ["wikitext", "tinystories"]


def test_wikitext_rules_follow_the_hub_id_or_the_local_name(tmp_path: Path) -> None:
    (tmp_path / "w.raw").write_text(" = T = \n")
    specs = resolve_sources(
        [
            "wikitext=HuggingFaceFW/fineweb-edu",
            "fineweb=Salesforce/wikitext:wikitext-2-raw-v1",
            f"tinystories={tmp_path}",
            f"wikitext2={tmp_path}",
        ],
        ["wikitext2=1"],
    )
    assert [s.wikitext_like for s in specs] == [False, True, False, True]


@pytest.mark.parametrize(
    ("sources", "ratios", "expected"),
    [
        (["wikitext"], [], "expected NAME=PATH or NAME=HUB_ID"),
        (["=foo/bar"], [], "expected NAME=PATH"),
        (["wikitext="], [], "expected NAME=PATH"),
        (["bad name=foo/bar"], [], "source name 'bad name'"),
        (["wikitext=./no/such/dir"], [], "no such file or folder"),
        (["wikitext=/no/such/file.txt"], [], "no such file or folder"),
        (["wikitext=nothing/*.jsonl"], [], "matches no data files"),
        (["wikitext=not a hub id"], [], "not a hub id"),
        (["wikitext=a/b", "wikitext=c/d"], [], "given twice"),
        (["extra=a/b"], [], "source 'extra' has no weight: add --ratio extra=W"),
        ([], ["4:4"], "2 weight(s) for 3 sources"),
        ([], ["4:4:2:1"], "4 weight(s) for 3 sources"),
        ([], ["4:4:2", "1:1:1"], "given twice"),
        ([], ["4:-1:2"], "must be a number >= 0"),
        ([], ["fineweb=-2"], "must be a number >= 0"),
        ([], ["fineweb=nan"], "must be a number >= 0"),
        ([], ["fineweb=inf"], "must be a number >= 0"),
        ([], ["0:0:0"], "every source has weight 0"),
        ([], ["4:x:2"], "'x' is not a number"),
        ([], ["books=2"], "no source named 'books'"),
        ([], ["fineweb"], "1 weight(s) for 3 sources"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(
    sources: list[str], ratios: list[str], expected: str
) -> None:
    with pytest.raises(UsageError) as info:
        resolve_sources(sources, ratios)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_folder_skips_readme_markdown_licence_and_hidden_files(tmp_path: Path) -> None:
    for name in [
        "README.md",
        "README",
        "notes.md",
        "LICENSE",
        ".hidden.txt",
        ".git/HEAD",
        "a.txt",
        "sub/b.jsonl",
    ]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x\n")
    assert local_files("s", str(tmp_path)) == (tmp_path / "a.txt", tmp_path / "sub" / "b.jsonl")


def test_glob_matches_files_and_folders(tmp_path: Path) -> None:
    for name in ["d1/x.txt", "d1/README.md", "d2/y.txt", "z.parquet"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x\n")
    assert local_files("s", str(tmp_path / "d*")) == (tmp_path / "d1/x.txt", tmp_path / "d2/y.txt")
    assert local_files("s", str(tmp_path / "**/*.txt")) == (
        tmp_path / "d1/x.txt",
        tmp_path / "d2/y.txt",
    )
    with pytest.raises(UsageError, match=r"matches no data files \(1 README"):
        local_files("s", str(tmp_path / "d1/*.md"))


def test_a_folder_of_only_readmes_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("about\n")
    with pytest.raises(UsageError, match="matches no data files"):
        resolve_sources([f"wikitext={tmp_path}"], [])


# --- reading local files ---------------------------------------------------------------------


def _local(name: str, *files: Path) -> SourceSpec:
    return SourceSpec(name, 1.0, str(files[0]), files=tuple(files))


def test_jsonl_json_and_parquet_rows_are_documents(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps(r) for r in [{"text": "one", "id": 1}, {"text": None}, {"text": "2"}])
    )
    array = tmp_path / "b.json"
    array.write_text(json.dumps([{"text": "three\nlines\nhere"}, {"text": "four"}]))
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["five", f"six{END_OF_TEXT}seven"]}), parquet)
    docs = list(read_documents(_local("mixed", jsonl, array, parquet)))
    assert docs == ["one", "2", "three\nlines\nhere", "four", "five", "six", "seven"]


def test_missing_text_column_names_the_file_and_columns(tmp_path: Path) -> None:
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["x"]}), parquet)
    with pytest.raises(MllmError, match=r"c\.parquet has no 'text' column \(columns: body\)"):
        list(read_documents(_local("s", parquet)))


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(MllmError, match=r"latin1\.txt is not UTF-8 text"):
        list(read_documents(_local("s", bad)))


def test_files_with_no_text_are_an_error(tmp_path: Path) -> None:
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.txt"
    empty.write_text("")
    blank.write_text("\n  \n\n")
    with pytest.raises(MllmError, match=r"its 2 file\(s\) hold no text"):
        list(read_documents(_local("s", empty, blank)))


def test_crlf_text_reads_like_lf(tmp_path: Path) -> None:
    crlf, lf = tmp_path / "crlf.txt", tmp_path / "lf.txt"
    crlf.write_bytes(b"first line\r\nsecond line\r\n\r\nnext doc\r\n")
    lf.write_bytes(b"first line\nsecond line\n\nnext doc\n")
    assert list(read_documents(_local("s", crlf))) == list(read_documents(_local("s", lf)))
    assert list(read_documents(_local("s", crlf))) == ["first line\nsecond line", "next doc"]


def test_documents_never_run_across_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("end of a\n\nstill a")  # no final newline, no blank line at the end
    b.write_text("start of b\n\nmore b\n")
    docs = list(read_documents(_local("s", a, b)))
    assert docs == ["end of a", "still a", "start of b", "more b"]


# --- plain-text layouts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "layout"),
    [
        (b"story one\n\npara two\n<|endoftext|>\nstory two\n", "separator"),
        (b"\n\nstory one\npara\x00story two\n", "separator"),
        (b"para one\nstill one\n \npara two\n", "paragraph"),
        (b"para one\r\n\r\npara two\r\n", "paragraph"),
        (b"doc one\ndoc two\ndoc three\n", "line"),
    ],
)
def test_sniff_text_layout(tmp_path: Path, content: bytes, layout: str) -> None:
    path = tmp_path / "f.txt"
    path.write_bytes(content)
    assert sniff_text_layout(path) == layout


def test_separator_layout_does_not_split_at_blank_lines() -> None:
    lines = ["", "Once upon a time.", "", "The end.", END_OF_TEXT, "Another story.", "Bye."]
    assert list(plain_text_documents(lines, "separator")) == [
        "Once upon a time.\nThe end.",
        "Another story.\nBye.",
    ]


def test_separators_mid_line_split_in_every_layout() -> None:
    lines = [f"a{END_OF_TEXT}b", "c\x00d", "e"]
    assert list(plain_text_documents(lines, "separator")) == ["a", "b\nc", "d\ne"]
    assert list(plain_text_documents(lines, "paragraph")) == ["a", "b\nc", "d\ne"]
    assert list(plain_text_documents(lines, "line")) == ["a", "b", "c", "d", "e"]


def test_paragraph_and_line_layouts() -> None:
    lines = ["p1 a", "p1 b", " ", "", "p2", ""]
    assert list(plain_text_documents(lines, "paragraph")) == ["p1 a\np1 b", "p2"]
    assert list(plain_text_documents(lines, "line")) == ["p1 a", "p1 b", "p2"]


PIECES = st.sampled_from(["a", " ", "\x00", "\r", END_OF_TEXT, "<|", "endoftext", "|>"])


@given(st.lists(st.lists(PIECES).map("".join)))
def test_no_document_holds_a_separator(lines: list[str]) -> None:
    for layout in ("separator", "paragraph", "line"):
        for document in plain_text_documents(lines, layout):  # type: ignore[arg-type]
            assert END_OF_TEXT not in document and "\x00" not in document and document.strip()


def test_shared_tinystories_separators(shared_data_extra: Path) -> None:
    folder = shared_data_extra / "tinystories"
    nul = next(folder.glob("*NULsep*"))
    v2 = next(folder.glob("*V2*"))
    nul_docs = list(read_documents(_local("tinystories", nul)))
    v2_docs = list(read_documents(_local("tinystories", v2)))
    assert len(nul_docs) == 668  # 667 NULs between 668 stories
    assert len(v2_docs) == 1728  # 1,727 <|endoftext|> lines
    assert v2_docs[0].startswith("Once upon a time there was a little boy named Ben")
    for doc in nul_docs + v2_docs:
        assert END_OF_TEXT not in doc and "\x00" not in doc


# --- WikiText --------------------------------------------------------------------------------

WIKITEXT_SNIPPET = [
    " Orphan paragraph from a file cut mid-article . \n",
    " = Robert Boulter = \n",
    " \n",
    " Robert Boulter is an English film , television and theatre actor . \n",
    " = = Career = = \n",
    " = = = 2000 – 2005 = = = \n",
    " In 2000 Boulter had a guest @-@ starring role , worth 1 @,@ 000 or 3 @.@ 5 <unk> . \n",
    "",
    " = Du Fu = \n",
    " Du Fu was a prominent Chinese poet . \n",
    " = Empty Article = \n",
    " = Last = \n",
    " Text . ",
]


def test_wikitext_articles_become_documents() -> None:
    assert list(wikitext_documents(WIKITEXT_SNIPPET)) == [
        "Orphan paragraph from a file cut mid-article .",
        "Robert Boulter is an English film , television and theatre actor .\n"
        "In 2000 Boulter had a guest-starring role , worth 1,000 or 3.5 .",
        "Du Fu was a prominent Chinese poet .",
        "Text .",
    ]


def test_wikitext_named_rows_without_titles_stay_rows(tmp_path: Path) -> None:
    jsonl = tmp_path / "articles.jsonl"
    jsonl.write_text(json.dumps({"text": "article one"}) + "\n" + json.dumps({"text": "two"}))
    layouts: dict[str, str] = {}
    docs = list(read_documents(_local("wikitext", jsonl), layouts))
    assert docs == ["article one", "two"] and layouts == {str(jsonl): "rows"}


def test_wikitext_shared_file_crlf_no_blank_lines(shared_data: Path) -> None:
    path = shared_data / "wikitext" / "wiki.test.raw"
    layouts: dict[str, str] = {}
    docs = list(read_documents(SourceSpec("wikitext", 1.0, str(path), files=(path,)), layouts))
    assert layouts == {str(path): "wikitext-articles"}
    assert len(docs) == 62  # 62 top-level " = Title = " lines, the file starts with one
    assert docs[0].startswith("Robert Boulter is an English film , television and theatre actor")
    assert docs[-1].startswith("The Hustler is a 1961 American drama film")
    for doc in docs:
        assert "\r" not in doc and " = " not in doc.splitlines()[0][:3]
        assert "@-@" not in doc and "@,@" not in doc and "@.@" not in doc
        assert not any(re.match(r"^ ?= .* = ?$", line) for line in doc.splitlines())


def test_wikitext_tokenised_variant_loses_unk(shared_data_extra: Path) -> None:
    path = next((shared_data_extra / "wikitext").glob("*tokens*"))
    docs = list(read_documents(SourceSpec("wikitext", 1.0, str(path), files=(path,))))
    assert len(docs) >= 163 and not any("<unk>" in doc for doc in docs)


# --- the hub ---------------------------------------------------------------------------------


def test_offline_mode_fails_at_once_naming_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MllmError) as info:
        check_hub_reachable(resolve_sources([], []))
    message = str(info.value)
    assert "cannot reach the Hugging Face Hub (HF_HUB_OFFLINE=1 is set)" in message
    assert "--source NAME=PATH" in message and "\n" not in message


def test_closed_port_endpoint_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(MllmError, match=r"did not answer: .*--source NAME=PATH"):
        check_hub_reachable(resolve_sources([], []))


def test_all_local_sources_never_probe_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "a.txt").write_text("x\n")
    names = ["wikitext", "fineweb", "tinystories"]
    check_hub_reachable(resolve_sources([f"{n}={tmp_path}" for n in names], []))


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
