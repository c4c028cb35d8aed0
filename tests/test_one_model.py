"""The network's maths lives in model.py alone: generate, the serve engine and eval all run it.

A change to a block (here: patching the feed-forward's maths) must show in every path that uses
the model, and each path must still agree with a full forward of the changed model.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mllm
from mllm.config import ModelConfig
from mllm.data.loader import TokenWindows
from mllm.decode import Decoder
from mllm.generate import generate_ids
from mllm.model import GPT, SwiGLU
from mllm.sampling import SamplingParams
from mllm.scoring import sum_nll
from mllm.serve.engine import Completion, Engine, Event, Failed, Finished, TextDelta

GREEDY = SamplingParams(temperature=0.0)
VOCAB = 61
SRC = Path(mllm.__file__).parent


def tiny_model() -> GPT:
    """A random model with large weights, so greedy decoding does not repeat one token."""
    torch.manual_seed(3)
    config = ModelConfig(vocab_size=VOCAB, context=24, d_model=32, layers=2, heads=4)
    model = GPT(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(25)
    return model


def full_forward_greedy(model: GPT, prompt: list[int], new_tokens: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt) :]


def generate_greedy(model: GPT, prompt: list[int], new_tokens: int) -> list[int]:
    return list(generate_ids(Decoder(model), prompt, GREEDY, new_tokens))


def serve_greedy(model: GPT, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy tokens of each prompt, decoded together by the serve engine (each token id is
    sent as its own text, `<id>`, so the ids can be read back)."""
    table = [f"<{i}>".encode() for i in range(VOCAB)]
    engine = Engine(model, table, eot_id=None, max_batch_size=len(prompts))
    texts = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def emit(index: int):
        def record(event: Event) -> None:
            if isinstance(event, TextDelta):
                texts[index].append(event.text)
            elif isinstance(event, Failed):
                raise AssertionError(event.message)
            elif isinstance(event, Finished):
                done[index].set()

        return record

    engine.submit([Completion(p, new_tokens, GREEDY, emit(i)) for i, p in enumerate(prompts)])
    engine.start()
    try:
        for event in done:
            assert event.wait(30)
    finally:
        engine.stop()
    return [[int(t) for t in re.findall(r"<(\d+)>", "".join(text))] for text in texts]


def eval_nll(model: GPT, tmp_path: Path) -> float:
    tokens = np.random.default_rng(0).integers(0, VOCAB, 200).astype(np.uint16)
    path = tmp_path / "val.bin"
    tokens.tofile(path)
    windows = TokenWindows(path, "uint16", model.config.context)
    starts = windows.strided_starts(0, 6)
    nats, count = sum_nll(model, windows, starts, 3, torch.device("cpu"), torch.float32)
    return nats / count


def reference_nll(model: GPT, tmp_path: Path) -> float:
    """The same windows scored by a full forward and F.cross_entropy."""
    tokens = torch.from_numpy(np.fromfile(tmp_path / "val.bin", dtype=np.uint16).astype(np.int64))
    context = model.config.context
    with torch.no_grad():
        losses = []
        for start in range(0, 6 * context, context):
            x, y = tokens[start : start + context], tokens[start + 1 : start + context + 1]
            losses.append(F.cross_entropy(model(x[None])[0], y, reduction="sum"))
    return float(sum(losses)) / (6 * context)


def test_a_patched_block_shows_in_generate_serve_and_eval(tmp_path: Path, monkeypatch) -> None:
    prompts = [[1, 2, 3, 4], [7, 8]]
    before = {
        "generate": generate_greedy(tiny_model(), prompts[0], 12),
        "serve": serve_greedy(tiny_model(), prompts, 12),
        "eval": eval_nll(tiny_model(), tmp_path),
    }
    original = SwiGLU.forward
    monkeypatch.setattr(
        SwiGLU, "forward", lambda self, x, linear=F.linear: -original(self, x, linear)
    )
    model = tiny_model()
    after = {
        "generate": generate_greedy(tiny_model(), prompts[0], 12),
        "serve": serve_greedy(tiny_model(), prompts, 12),
        "eval": eval_nll(tiny_model(), tmp_path),
    }
    for path in before:
        assert after[path] != before[path], f"{path} did not see the patched block"
    # ... and each path runs exactly the patched model's maths
    assert after["generate"] == full_forward_greedy(model, prompts[0], 12)
    assert after["serve"] == [full_forward_greedy(model, p, 12) for p in prompts]
    assert after["eval"] == pytest.approx(reference_nll(model, tmp_path), rel=1e-5)


def test_no_module_but_model_py_writes_attention_or_the_ffn() -> None:
    """scaled_dot_product_attention and silu are called in model.py only, and in the training
    attention kernel model.py calls (attention.py). A modelling file that a Hugging Face export
    copies, named *modeling*, is the one stated exception."""
    offenders = [
        f"{path.relative_to(SRC)}:{number}"
        for path in SRC.rglob("*.py")
        if path.name not in ("model.py", "attention.py") and "modeling" not in path.name
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\b(scaled_dot_product_attention|silu)\b", line)
    ]
    assert offenders == []


def test_serve_at_one_client_decodes_as_generate_does() -> None:
    """One client: the engine passes one int position, generate's exact path, so greedy tokens
    are the same as `mllm generate`'s (bf16 too)."""
    for dtype in (torch.float32, torch.bfloat16):
        prompt = [5, 9, 2]
        expected = generate_greedy(tiny_model().to(dtype), prompt, 15)
        assert serve_greedy(tiny_model().to(dtype), [prompt], 15) == [expected]
