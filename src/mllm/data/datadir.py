"""The data dir: its file names, defined once, as train/checkpoint.py defines the run dir's.

data/
  corpus.txt      one document per line (`mllm corpus`)
  corpus.json     its sidecar: sources, counts, filters, seed, config
  tokenizer.json  byte-level BPE (`mllm tokenize`), with tokenizer.meta.json beside it
  train.bin       token stream of the training documents (`mllm pack`)
  val.bin         token stream of the held-out documents
  data.json       what the bins hold (data.meta.DataMeta), written last
"""

from __future__ import annotations

from pathlib import Path

CORPUS = "corpus.txt"
TOKENIZER = "tokenizer.json"
DATA_JSON = "data.json"
BINS = {"train": "train.bin", "val": "val.bin"}


def corpus_path(data_dir: Path) -> Path:
    return Path(data_dir) / CORPUS


def corpus_sidecar(corpus: Path) -> Path:
    """corpus.json beside a corpus.txt (same stem, .json), wherever --output put it."""
    return Path(corpus).with_suffix(".json")


def tokenizer_path(data_dir: Path) -> Path:
    return Path(data_dir) / TOKENIZER


def data_json_path(data_dir: Path) -> Path:
    return Path(data_dir) / DATA_JSON
