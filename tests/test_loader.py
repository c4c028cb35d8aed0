"""TokenWindows: shapes, the x/y shift, random and strided starts, wraparound, pickling, errors;
and data.json's checks (load_data_meta, check_bins)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mllm.data.loader import TokenWindows
from mllm.data.meta import DataMeta, check_bins, load_data_meta
from mllm.errors import MllmError


def write_tokens(path: Path, tokens: np.ndarray) -> Path:
    tokens.tofile(path)
    return path


@pytest.fixture
def ramp(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """1,000 uint16 tokens 0, 7, 14, ... (mod 65,536): every window is recognisable."""
    tokens = (np.arange(1000, dtype=np.int64) * 7 % 65_536).astype(np.uint16)
    return write_tokens(tmp_path / "train.bin", tokens), tokens


def test_gather_shapes_shift_and_dtype(ramp) -> None:
    path, tokens = ramp
    windows = TokenWindows(path, "uint16", context=16)
    assert windows.n_tokens == 1000 and windows.max_start == 1000 - 17
    starts = np.array([0, 5, 983])
    x, y = windows.gather(starts)
    assert x.shape == y.shape == (3, 16)
    assert x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    for row, start in enumerate(starts):
        assert x[row].tolist() == tokens[start : start + 16].tolist()
        assert y[row].tolist() == tokens[start + 1 : start + 17].tolist()
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert y.view(-1).shape == (48,)  # contiguous: view works as training code expects
    empty_x, _ = windows.gather(np.array([], dtype=np.int64))
    assert empty_x.shape == (0, 16)


def test_gather_accepts_lists_and_refuses_out_of_range(ramp) -> None:
    path, tokens = ramp
    windows = TokenWindows(path, "uint16", context=8)
    x, _ = windows.gather([3])
    assert x[0].tolist() == tokens[3:11].tolist()
    for bad in ([-1], [windows.max_start + 1]):
        with pytest.raises(IndexError):
            windows.gather(bad)


def test_random_starts_reproducible_and_in_range(ramp) -> None:
    path, _ = ramp
    windows = TokenWindows(path, "uint16", context=32)
    a = windows.random_starts(np.random.default_rng(3), 10_000)
    b = windows.random_starts(np.random.default_rng(3), 10_000)
    assert np.array_equal(a, b) and a.dtype == np.int64
    assert a.min() >= 0 and a.max() <= windows.max_start
    assert a.max() == windows.max_start and a.min() == 0  # both ends reachable
    rng = np.random.default_rng(3)
    windows.random_starts(rng, 5)
    assert not np.array_equal(windows.random_starts(rng, 10), a[:10])  # the rng advanced


def test_strided_windows_default_non_overlapping(ramp) -> None:
    path, _ = ramp
    windows = TokenWindows(path, "uint16", context=100)
    # starts 0, 100, ..., 800 fit (800 + 101 <= 1000); 900 would need token 1000
    assert windows.num_windows() == 9
    starts = windows.strided_starts(0, 9)
    assert starts.tolist() == list(range(0, 900, 100))
    x, y = windows.gather(starts)
    assert torch.equal(x[1:, 0], y[:-1, -1])  # non-overlapping: each window starts where the
    # previous one's targets end


def test_strided_windows_overlap_and_wrap(ramp) -> None:
    path, _ = ramp
    windows = TokenWindows(path, "uint16", context=100)
    count = windows.num_windows(stride=50)
    assert count == (1000 - 101) // 50 + 1 == 18
    assert windows.strided_starts(0, 3, stride=50).tolist() == [0, 50, 100]
    # wraparound: continuing past the last window starts again at the first
    assert windows.strided_starts(count - 2, 4, stride=50).tolist() == [800, 850, 0, 50]
    assert windows.strided_starts(count * 3 + 1, 1, stride=50).tolist() == [50]


@settings(max_examples=100, deadline=None)
@given(
    n_tokens=st.integers(2, 400),
    context=st.integers(1, 50),
    stride=st.integers(1, 60),
    first=st.integers(0, 10_000),
)
def test_strided_starts_are_valid_windows(
    tmp_path_factory, n_tokens: int, context: int, stride: int, first: int
) -> None:
    assume(n_tokens >= context + 1)
    tokens = np.arange(n_tokens, dtype=np.uint32)
    path = write_tokens(tmp_path_factory.mktemp("w") / "t.bin", tokens)
    windows = TokenWindows(path, np.uint32, context)
    count = windows.num_windows(stride)
    starts = windows.strided_starts(first, 2 * count + 1, stride)
    assert starts.min() >= 0 and starts.max() <= windows.max_start
    assert sorted(set(starts.tolist())) == list(range(0, count * stride, stride))
    x, y = windows.gather(starts)
    assert torch.equal(x + 1, y)  # tokens are 0, 1, 2, ...: y is x shifted by one


def test_memmap_opened_once_and_reopened_after_pickling(ramp) -> None:
    path, tokens = ramp
    windows = TokenWindows(path, "uint16", context=8)
    windows.gather(np.array([0]))
    opened = windows.tokens
    windows.gather(np.array([1, 2]))
    assert windows.tokens is opened  # not reopened per batch
    state = pickle.dumps(windows)
    assert len(state) < 1000  # the tokens themselves are not pickled
    clone = pickle.loads(state)
    assert clone._tokens is None  # reopened lazily in the receiving process
    x, _ = clone.gather(np.array([10]))
    assert x[0].tolist() == tokens[10:18].tolist()
    assert clone.tokens is not opened


def test_uint32_tokens(tmp_path: Path) -> None:
    tokens = np.array([70_000, 1, 2**32 - 1, 5], dtype=np.uint32)
    windows = TokenWindows(write_tokens(tmp_path / "t.bin", tokens), "uint32", context=2)
    x, y = windows.gather(np.array([1]))
    assert x.tolist() == [[1, 2**32 - 1]] and y.tolist() == [[2**32 - 1, 5]]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(MllmError, match="not found"):
        TokenWindows(tmp_path / "missing.bin", "uint16", 4)
    short = write_tokens(tmp_path / "short.bin", np.arange(4, dtype=np.uint16))
    with pytest.raises(MllmError, match="fewer than one window"):
        TokenWindows(short, "uint16", 4)
    TokenWindows(short, "uint16", 3)  # exactly one window fits
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 7)
    with pytest.raises(MllmError, match="whole number"):
        TokenWindows(odd, "uint16", 1)
    with pytest.raises(MllmError, match="context"):
        TokenWindows(short, "uint16", 0)


def data_json(**changes) -> dict:
    meta = {
        "format_version": 1,
        "tokenizer_sha256": "ab" * 32,
        "vocab_size": 500,
        "dtype": "uint16",
        "eot_id": 0,
        "train": {"file": "train.bin", "tokens": 10, "documents": 2},
        "val": {"file": "val.bin", "tokens": 4, "documents": 1},
        "pack_id": "0123456789abcdef",
    }
    meta.update(changes)
    return meta


def test_load_data_meta_and_check_bins(tmp_path: Path) -> None:
    with pytest.raises(MllmError, match="run `mllm pack"):
        load_data_meta(tmp_path)
    (tmp_path / "data.json").write_text("{oops")
    with pytest.raises(MllmError, match="not valid JSON"):
        load_data_meta(tmp_path)
    (tmp_path / "data.json").write_text(json.dumps(data_json(dtype="int8")))
    with pytest.raises(MllmError, match=r"not a valid data\.json"):
        load_data_meta(tmp_path)
    (tmp_path / "data.json").write_text(json.dumps(data_json(format_version=99)))
    with pytest.raises(MllmError, match="format version"):
        load_data_meta(tmp_path)

    (tmp_path / "data.json").write_text(json.dumps(data_json(extra_key={"kept": True})))
    meta = load_data_meta(tmp_path)
    assert isinstance(meta, DataMeta) and meta.model_dump()["extra_key"] == {"kept": True}
    with pytest.raises(MllmError, match="not found"):
        check_bins(tmp_path, meta)
    write_tokens(tmp_path / "train.bin", np.zeros(10, dtype=np.uint16))
    write_tokens(tmp_path / "val.bin", np.zeros(5, dtype=np.uint16))
    with pytest.raises(MllmError, match="do not belong together"):
        check_bins(tmp_path, meta)
    write_tokens(tmp_path / "val.bin", np.zeros(4, dtype=np.uint16))
    check_bins(tmp_path, meta)
