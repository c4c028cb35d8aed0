"""`mllm export`: a transformers folder that loads offline and computes what mllm computes.

One exported folder (module scope) of a tiny random GPT with large weights (so greedy decoding
does not repeat one token) is shared by the checks; the command and its errors run through the
real CLI, transformers in-process.
"""

from __future__ import annotations

import ast
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the export checks load it with transformers ([hf])")

from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline
from transformers.cache_utils import Cache

from fixtures import (
    one_error_line,
    tiny_model,
    train_tiny_tokenizer,
    write_data_dir,
    write_run,
)
from mllm.cliargs import parse_config
from mllm.config import ExportConfig
from mllm.data.tokenizer import EOT, load_tokenizer
from mllm.errors import MllmError
from mllm.evaluate import open_tokens, window_plan
from mllm.export import export_run
from mllm.export import folder as export_folder
from mllm.fileio import atomic_write_json
from mllm.train.checkpoint import load_checkpoint, read_state

CONTEXT = 32
PROMPT = "Once upon a time"
FILES = {
    "config.json",
    "configuration_mllm.py",
    "modeling_mllm.py",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
}
SOURCE = Path(export_folder.__file__).parent


@dataclass(frozen=True)
class Export:
    run: Path
    checkpoint: Path
    data: Path
    out: Path


def export(run: Path, out: Path) -> Path:
    """`mllm export --run-dir RUN --out OUT`, in-process (the CLI's own flag parsing)."""
    return export_run(parse_config(ExportConfig, ["--run-dir", str(run), "--out", str(out)]))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Export:
    root = tmp_path_factory.mktemp("export")
    tokenizer_path = train_tiny_tokenizer(root / "tokenizer.json")
    model = tiny_model(load_tokenizer(tokenizer_path).get_vocab_size(), context=CONTEXT, seed=1)
    with torch.no_grad():  # large weights: greedy decoding does not repeat one token
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(25)
    checkpoint = write_run(root / "run", model, tokenizer_path, step=7)
    state = read_state(checkpoint).model_copy(
        update={"tokens_seen": 1792, "val_loss": 3.25, "best_val_loss": 3.0}
    )
    atomic_write_json(checkpoint / "state.json", state.model_dump(mode="json"))
    write_data_dir(root / "data", tokenizer_path)  # val.bin: the fixture texts, same tokenizer
    out = export(root / "run", root / "missing" / "parents" / "hf")
    return Export(root / "run", checkpoint, root / "data", out)


@pytest.fixture(scope="module")
def hf_model(exported: Export) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(exported.out, trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def gpt(exported: Export) -> torch.nn.Module:
    return load_checkpoint(exported.checkpoint).model


@pytest.fixture(scope="module")
def hf_tokenizer(exported: Export):
    return AutoTokenizer.from_pretrained(exported.out, trust_remote_code=True)


# --- the folder ------------------------------------------------------------------------------


def test_folder_holds_config_code_weights_tokenizer_and_card(exported: Export) -> None:
    out = exported.out
    assert {path.name for path in out.iterdir()} == FILES
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mllm.MllmForCausalLM"
    assert config["model_type"] == "mllm"
    assert {key: config[key] for key in ("vocab_size", "hidden_size", "num_hidden_layers")} == {
        "vocab_size": 300,
        "hidden_size": 32,
        "num_hidden_layers": 2,
    }
    assert config["num_attention_heads"] == 4
    assert config["intermediate_size"] == 128  # 4·32·2/3, rounded up to a multiple of 64
    assert config["max_position_embeddings"] == CONTEXT
    assert config["tie_word_embeddings"] is True
    assert config["mllm_export"]["step"] == 7

    eot_id = load_tokenizer(exported.run / "tokenizer.json").token_to_id(EOT)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eot_id
    assert (out / "tokenizer.json").read_bytes() == (exported.run / "tokenizer.json").read_bytes()
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == EOT
    assert tokenizer_config["model_max_length"] == CONTEXT
    assert tokenizer_config["clean_up_tokenization_spaces"] is False

    card = (out / "README.md").read_text()
    for fact in ("pack `pack-a`", "1,792 tokens seen", "3.2500 nats/token", "mllm 0.1.0"):
        assert fact in card

    loaded = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert (loaded.hidden_size, loaded.max_position_embeddings) == (32, CONTEXT)


def test_code_is_copied_as_is_and_imports_only_torch_and_transformers(exported: Export) -> None:
    for name in ("configuration_mllm.py", "modeling_mllm.py"):
        text = (exported.out / name).read_text()
        assert text == (SOURCE / name).read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:  # a relative import (the configuration file beside it) is fine
                continue
            assert all(m.split(".")[0] in {"torch", "transformers"} for m in modules), modules


def test_weights_are_split_under_conventional_names(exported: Export, gpt) -> None:
    weights = load_file(exported.out / "model.safetensors")
    mllm = gpt.state_dict()
    d, hidden = 32, 128
    for n in range(2):
        layer = f"model.layers.{n}"
        q, k, v = (weights[f"{layer}.self_attn.{p}_proj.weight"] for p in "qkv")
        assert torch.equal(torch.cat([q, k, v]), mllm[f"blocks.{n}.attn.qkv.weight"])
        assert q.shape == (d, d)
        gate, up = (weights[f"{layer}.mlp.{p}_proj.weight"] for p in ("gate", "up"))
        assert torch.equal(torch.cat([gate, up]), mllm[f"blocks.{n}.ffn.gate_up.weight"])
        assert gate.shape == (hidden, d)
        assert torch.equal(
            weights[f"{layer}.mlp.down_proj.weight"], mllm[f"blocks.{n}.ffn.down.weight"]
        )
        assert f"{layer}.input_layernorm.bias" in weights
    assert torch.equal(weights["model.embed_tokens.weight"], mllm["token_embedding.weight"])
    assert torch.equal(weights["model.embed_positions.weight"], mllm["position_embedding.weight"])
    assert "lm_head.weight" not in weights  # tied
    assert len(weights) == len(mllm) + 2 * 3  # qkv -> 3 and gate_up -> 2, per layer


# --- the model in transformers ---------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_fp32_logits_match_mllm(exported: Export, gpt, hf_model, attention: str) -> None:
    model = hf_model
    if attention != hf_model.config._attn_implementation:
        model = AutoModelForCausalLM.from_pretrained(
            exported.out, trust_remote_code=True, attn_implementation=attention
        ).eval()
    ids = torch.randint(0, 300, (3, CONTEXT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (model(ids).logits - gpt(ids)).abs().max().item()
    assert difference <= 1e-4


def test_kv_cache_steps_give_the_full_forward_logits(hf_model) -> None:
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = hf_model(ids).logits
        step = hf_model(ids[:, :12], use_cache=True)
        cache, logits = step.cache, [step.logits]
        assert isinstance(cache, Cache)
        for t in range(12, 20):
            step = hf_model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = step.cache
            logits.append(step.logits)
    assert cache.get_seq_length() == 20
    assert (torch.cat(logits, dim=1) - full).abs().max().item() <= 1e-4


def test_input_beyond_the_context_is_a_clear_error(hf_model) -> None:
    with pytest.raises(ValueError, match="context of 32"):
        hf_model(torch.zeros((1, CONTEXT + 1), dtype=torch.long))


def test_loss_over_val_windows_equals_mllm_eval(exported: Export, hf_model, run_cli) -> None:
    result = run_cli(
        "eval", "--run-dir", exported.run, "--data-dir", exported.data,
        "--dtype", "fp32", "--device", "cpu", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = json.loads(result.stdout)

    tokens = torch.from_numpy(
        open_tokens(exported.data / "val.bin", np.dtype("uint16")).astype(np.int64)
    )
    full, rest = window_plan(len(tokens), CONTEXT)  # as evaluate.py plans them
    windows = [(k * CONTEXT, CONTEXT) for k in range(full)] + (
        [(full * CONTEXT, rest)] if rest else []
    )
    total, count = 0.0, 0
    with torch.no_grad():
        for start, length in windows:
            x, y = tokens[start : start + length], tokens[start + 1 : start + length + 1]
            logits = hf_model(x[None]).logits[0]
            nll = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            total, count = total + nll.double().item(), count + length
    assert count == expected["tokens"]
    assert math.isclose(total / count, expected["loss"], rel_tol=1e-6)


def greedy_hf(model, tokenizer, prompt: str, new_tokens: int, **options) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, **options)
    return output[0, ids.input_ids.shape[1] :].tolist()


def test_greedy_generate_matches_mllm_generate(exported: Export, hf_model, hf_tokenizer, run_cli):
    new_tokens = 20
    result = run_cli(
        "generate", PROMPT, "--run-dir", exported.run, "--temperature", "0",
        "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", new_tokens,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cached = greedy_hf(hf_model, hf_tokenizer, PROMPT, new_tokens)
    assert len(set(cached)) > 5, cached  # a real check: greedy does not repeat one token
    assert greedy_hf(hf_model, hf_tokenizer, PROMPT, new_tokens, use_cache=False) == cached
    text = hf_tokenizer.decode(cached, skip_special_tokens=True)
    assert result.stdout == PROMPT + text + "\n"


def test_left_padded_batch_generates_what_each_prompt_does_alone(hf_model, hf_tokenizer) -> None:
    prompts = [PROMPT, "The fox"]
    batch = hf_tokenizer(prompts, return_tensors="pt", padding=True)
    assert hf_tokenizer.padding_side == "left"
    with torch.no_grad():
        output = hf_model.generate(**batch, max_new_tokens=8, do_sample=False)
    width = batch.input_ids.shape[1]
    for row, prompt in enumerate(prompts):
        alone = greedy_hf(hf_model, hf_tokenizer, prompt, 8)
        assert output[row, width : width + len(alone)].tolist() == alone


def test_pipeline_generates(exported: Export, hf_model, hf_tokenizer) -> None:
    generator = pipeline("text-generation", model=str(exported.out), trust_remote_code=True)
    text = generator(PROMPT, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    greedy = greedy_hf(hf_model, hf_tokenizer, PROMPT, 8)
    assert text == PROMPT + hf_tokenizer.decode(greedy, skip_special_tokens=True)


# --- the tokenizer ---------------------------------------------------------------------------

TEXTS = [
    "Once upon a time there was a little fox.",
    "  two spaces, a tab\there, a newline\nand \u00e9, 你好, 🙂",
    f"a literal {EOT} inside the text",
    "",
]


def test_tokenizer_encodes_and_decodes_as_mllm_does(exported: Export, hf_tokenizer) -> None:
    mllm = load_tokenizer(exported.run / "tokenizer.json")
    eot_id = mllm.token_to_id(EOT)
    for text in TEXTS:
        ids = mllm.encode(text).ids
        assert hf_tokenizer(text).input_ids == ids, text  # the literal <|endoftext|> is text
        assert hf_tokenizer.decode(ids) == mllm.decode(ids) == text
    assert eot_id not in hf_tokenizer(TEXTS[2]).input_ids
    ids = [*mllm.encode(TEXTS[0]).ids, eot_id, *mllm.encode(TEXTS[1]).ids]
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == mllm.decode(ids)
    assert hf_tokenizer.decode(ids) == TEXTS[0] + EOT + TEXTS[1]
    assert (hf_tokenizer.eos_token, hf_tokenizer.eos_token_id) == (EOT, eot_id)
    assert hf_tokenizer.model_max_length == CONTEXT


def test_auto_tokenizer_loads_without_trust_remote_code(exported: Export, monkeypatch) -> None:
    # transformers loads config.json first and asks about its custom code on stdin; unanswered,
    # it reads the plain config and loads the tokenizer all the same
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    tokenizer = AutoTokenizer.from_pretrained(exported.out)
    assert (
        tokenizer("Once upon").input_ids
        == load_tokenizer(exported.out / "tokenizer.json").encode("Once upon").ids
    )


# --- the command ----------------------------------------------------------------------------


def test_cli_replaces_an_earlier_export(exported: Export, run_cli, tmp_path: Path) -> None:
    out = export(exported.run, tmp_path / "hf")  # (missing parents: see the module's export)
    (out / "stale.txt").write_text("from before")
    result = run_cli(
        "export", "--run-dir", exported.run, "--checkpoint", exported.checkpoint, "--out", out
    )
    assert result.returncode == 0, result.stderr
    assert {path.name for path in out.iterdir()} == FILES  # replaced, not merged
    weights = (exported.out / "model.safetensors").read_bytes()
    assert (out / "model.safetensors").read_bytes() == weights
    assert [path.name for path in tmp_path.iterdir()] == ["hf"]  # no temporary folder left


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("no checkpoint", 1, "no checkpoint in"),
        ("out is not an export", 2, "is not an mllm export"),
        ("out under a file", 1, "cannot create folder"),
    ],
)
def test_errors_are_one_line(
    exported: Export, run_cli, tmp_path: Path, case: str, code: int, message: str
) -> None:
    run, out = exported.run, tmp_path / "hf"
    if case == "no checkpoint":
        run = tmp_path / "empty-run"
        run.mkdir()
    elif case == "out is not an export":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "hf"
    result = run_cli("export", "--run-dir", run, "--out", out)
    assert result.returncode == code, result.stderr
    assert message in one_error_line(result)
    if case == "out is not an export":
        assert [path.name for path in out.iterdir()] == ["notes.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only folder")
def test_an_unwritable_folder_is_one_line(exported: Export, run_cli, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = run_cli("export", "--run-dir", exported.run, "--out", locked / "hf")
    finally:
        locked.chmod(0o700)
    assert result.returncode == 1
    assert "not writable" in one_error_line(result)


def test_a_failed_export_leaves_the_earlier_folder_and_no_half_written_one(
    exported: Export, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = export(exported.run, tmp_path / "hf")
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    def disk_full(*args: object) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_folder, "model_card", disk_full)  # the last file written
    with pytest.raises(MllmError, match="No space left"):
        export(exported.run, out)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    with pytest.raises(MllmError, match="No space left"):
        export(exported.run, tmp_path / "new")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hf"]
