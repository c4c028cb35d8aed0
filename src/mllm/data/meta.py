"""data.json: what a pair of packed token bins holds, so later steps can refuse a mismatch.

`mllm pack` writes it last, after the bins (and removes the old one first), so a data.json always
describes the bins beside it; `check_bins` verifies their sizes before anyone trusts them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mllm.data.datadir import DATA_JSON
from mllm.errors import MllmError
from mllm.fileio import read_json

FORMAT_VERSION = 1


class SplitMeta(BaseModel):
    """One packed split (train or val)."""

    model_config = ConfigDict(extra="allow")

    file: str = Field(description="Bin file name, relative to the data dir.")
    tokens: int = Field(ge=0, description="Tokens in the file (EOT separators included).")
    documents: int = Field(ge=0, description="Documents in the split.")


class DataMeta(BaseModel):
    """Contents of data.json (extra keys are kept: pack records its config and sources too)."""

    model_config = ConfigDict(extra="allow")

    format_version: int = FORMAT_VERSION
    tokenizer_sha256: str = Field(description="sha256 of tokenizer.json's bytes.")
    vocab_size: int = Field(ge=1)
    dtype: Literal["uint16", "uint32"]
    eot_id: int = Field(ge=0, description="Id of <|endoftext|>, written after every document.")
    train: SplitMeta
    val: SplitMeta
    pack_id: str = Field(description="Identity of (corpus, tokenizer, split); resume checks it.")

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype).newbyteorder("<")  # the bins are little-endian

    def split(self, name: str) -> SplitMeta:
        if name not in ("train", "val"):
            raise MllmError(f"unknown split {name!r}: use train or val")
        return self.train if name == "train" else self.val

    def bin_path(self, data_dir: str | Path, name: str) -> Path:
        """Where split `name`'s bin lies: the file data.json names, in `data_dir`."""
        return Path(data_dir) / self.split(name).file


def load_data_meta(data_dir: str | Path) -> DataMeta:
    """Read and check data_dir/data.json, or raise one clear MllmError saying to run `mllm pack`."""
    data_dir = Path(data_dir)
    path = data_dir / DATA_JSON
    if not path.exists():
        raise MllmError(f"{path} not found: run `mllm pack --data-dir {data_dir}` first")
    raw = read_json(path, DATA_JSON)
    try:
        meta = DataMeta.model_validate(raw)
    except Exception as e:
        raise MllmError(
            f"{path} is not a valid data.json ({e.__class__.__name__}): re-run mllm pack"
        ) from None
    if meta.format_version != FORMAT_VERSION:
        raise MllmError(
            f"{path} has format version {meta.format_version}, this mllm reads {FORMAT_VERSION}: "
            "re-run mllm pack"
        )
    return meta


def check_bins(data_dir: str | Path, meta: DataMeta) -> None:
    """Refuse bins whose sizes do not match data.json (a pack that was interrupted or mixed)."""
    for name in ("train", "val"):
        check_split_bin(data_dir, meta, name)


def check_split_bin(data_dir: str | Path, meta: DataMeta, name: str) -> Path:
    """The path of split `name`'s bin, refused unless it exists with the size data.json says."""
    data_dir = Path(data_dir)
    split = meta.split(name)
    path = meta.bin_path(data_dir, name)
    if not path.is_file():
        raise MllmError(f"{path} not found: re-run `mllm pack --data-dir {data_dir}`")
    expected = split.tokens * meta.np_dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise MllmError(
            f"{path} holds {actual} bytes but data.json says {expected}: the bins and "
            f"data.json do not belong together; re-run `mllm pack --data-dir {data_dir}`"
        )
    return path
