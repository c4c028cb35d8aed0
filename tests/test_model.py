"""The GPT: parameter count, causality, weight tying, KV-cache decoding equal to a full forward."""

from __future__ import annotations

import pytest
import torch

from mllm.config import ModelConfig
from mllm.model import GPT, KVCache


def tiny_config(**overrides) -> ModelConfig:
    values = {"vocab_size": 97, "context": 32, "d_model": 32, "layers": 2, "heads": 4}
    return ModelConfig(**{**values, **overrides})


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()


def test_default_config_has_about_220m_parameters() -> None:
    with torch.device("meta"):
        model = GPT(ModelConfig(vocab_size=16_000))
    count = model.num_parameters()
    assert 210e6 < count < 230e6, count


def test_swiglu_hidden_and_head_dim() -> None:
    config = ModelConfig(vocab_size=16_000, d_model=384, layers=6, heads=6, context=256)
    assert config.ffn_hidden == 1024 and config.head_dim == 64


def test_head_is_tied_to_token_embedding(model: GPT) -> None:
    assert model.head_weight.data_ptr() == model.token_embedding.weight.data_ptr()
    idx = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        model.token_embedding.weight[7].add_(1.0)
    logits = model(idx)
    expected = model.hidden_states(idx) @ model.token_embedding.weight.T
    torch.testing.assert_close(logits, expected)


def test_changing_a_future_token_changes_no_earlier_logit(model: GPT) -> None:
    idx = torch.randint(0, 97, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 97
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_residual_projections_have_scaled_init() -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config(d_model=256, heads=4, layers=8))
    proj_std = model.blocks[0].attn.proj.weight.std().item()
    qkv_std = model.blocks[0].attn.qkv.weight.std().item()
    assert qkv_std == pytest.approx(0.02, rel=0.05)
    assert proj_std == pytest.approx(0.02 / 4, rel=0.05)


def test_cached_decoding_equals_full_forward(model: GPT) -> None:
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config, batch_size=2)
        prefill = model(idx[:, :7], start_pos=0, cache=cache)
        steps = [prefill]
        # a chunk of several tokens at a non-zero start, then one token at a time
        steps.append(model(idx[:, 7:12], start_pos=7, cache=cache))
        for pos in range(12, 20):
            steps.append(model(idx[:, pos : pos + 1], start_pos=pos, cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_per_row_positions_decode_rows_of_different_lengths(model: GPT) -> None:
    a = torch.randint(0, 97, (1, 9))
    b = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        full_a, full_b = model(a), model(b)
        cache = KVCache(model.config, batch_size=2)
        # prefill each row separately into its own cache slot
        for row, seq in enumerate((a[:, :6], b[:, :2])):
            row_cache = KVCache(model.config, batch_size=1)
            model(seq, cache=row_cache)
            for layer in range(model.config.layers):
                cache.keys[layer][row] = row_cache.keys[layer][0]
                cache.values[layer][row] = row_cache.values[layer][0]
        starts = torch.tensor([6, 2])
        outs_a, outs_b = [], []
        for step in range(3):
            tokens = torch.stack([a[0, 6 + step], b[0, 2 + step]])[:, None]
            logits = model(tokens, start_pos=starts + step, cache=cache)
            outs_a.append(logits[0, 0])
            outs_b.append(logits[1, 0])
    torch.testing.assert_close(torch.stack(outs_a), full_a[0, 6:9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(outs_b), full_b[0, 2:5], atol=1e-5, rtol=1e-5)


def test_last_only_returns_the_last_position(model: GPT) -> None:
    idx = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, last_only=True), model(idx)[:, -1:])


def test_positions_beyond_context_are_refused(model: GPT) -> None:
    with pytest.raises(ValueError, match="beyond the context"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_loss_is_cross_entropy_and_decreases_on_a_tiny_run() -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 97, (4, 16))
    targets = torch.roll(idx, -1, dims=1)
    first = model.loss(idx, targets)
    assert first.item() == pytest.approx(torch.log(torch.tensor(97.0)).item(), rel=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = model.loss(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first.item() * 0.5


def test_loss_equals_cross_entropy_over_the_logits_in_value_and_gradients() -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config()).double()
    idx = torch.randint(0, 97, (3, 11))
    targets = torch.randint(0, 97, (3, 11))
    model.loss(idx, targets).backward()
    fused = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits = model(idx)
    reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    reference.backward()
    torch.testing.assert_close(model.loss(idx, targets), reference)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, msg=name)
