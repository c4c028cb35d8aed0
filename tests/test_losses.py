"""The fused, chunked head + cross-entropy equals plain cross-entropy over full logits, in value
and in both gradients, for any chunking, with and without autocast and torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mllm.losses import linear_cross_entropy, rows_per_chunk


def plain_loss_and_grads(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: full logits, F.cross_entropy in fp32 (fp64 stays fp64, for exact checks)."""
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten())
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def chunked_loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def random_problem(
    rows: int, width: int, vocab: int, dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=generator, dtype=dtype)
    weight = torch.randn(vocab, width, generator=generator, dtype=dtype) * 0.5
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    return hidden, weight, targets


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 70),
    width=st.integers(1, 24),
    vocab=st.integers(2, 90),
    chunk_rows=st.integers(1, 80),
    scale=st.floats(0.1, 10.0),
)
def test_value_and_gradients_equal_plain_cross_entropy(
    rows: int, width: int, vocab: int, chunk_rows: int, scale: float
) -> None:
    hidden, weight, targets = random_problem(rows, width, vocab)
    expected = plain_loss_and_grads(hidden, weight, targets, scale)
    actual = chunked_loss_and_grads(hidden, weight, targets, chunk_rows, scale)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_batched_hidden_states_and_default_chunking() -> None:
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 37, 16, generator=generator, dtype=torch.float64)
    weight = torch.randn(101, 16, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 101, (3, 37), generator=generator)
    expected = plain_loss_and_grads(hidden, weight, targets)
    actual = chunked_loss_and_grads(hidden, weight, targets)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_bf16_autocast_matches_plain_cross_entropy_under_the_same_autocast() -> None:
    hidden, weight, targets = random_problem(300, 64, 1000, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain_loss_and_grads(hidden, weight, targets)
        actual = chunked_loss_and_grads(hidden, weight, targets, chunk_rows=128)
    assert actual[0].dtype == torch.float32
    assert actual[1].dtype == hidden.dtype and actual[2].dtype == weight.dtype
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-4, atol=1e-4)
    for got, want in zip(actual[1:], expected[1:], strict=True):
        # both round their matmul operands to bf16: equal to bf16 precision
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_without_gradients_only_the_value_is_computed() -> None:
    hidden, weight, targets = random_problem(50, 8, 30)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=7)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, plain_loss_and_grads(hidden, weight, targets)[0])


def test_gradient_reaches_only_the_inputs_that_want_it() -> None:
    hidden, weight, targets = random_problem(20, 8, 30)
    _, expected_hidden_grad, _ = plain_loss_and_grads(hidden, weight, targets)
    hidden = hidden.clone().requires_grad_()
    linear_cross_entropy(hidden, weight, targets, chunk_rows=6).backward()
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad, expected_hidden_grad)


def test_compiled_loss_equals_eager() -> None:
    hidden, weight, targets = random_problem(45, 16, 77, dtype=torch.float32)
    compiled = torch.compile(linear_cross_entropy)
    expected = chunked_loss_and_grads(hidden, weight, targets, chunk_rows=20)
    hidden_c = hidden.clone().requires_grad_()
    weight_c = weight.clone().requires_grad_()
    loss = compiled(hidden_c, weight_c, targets, chunk_rows=20)
    (loss * 2.0).backward()
    torch.testing.assert_close(loss.detach(), expected[0])
    torch.testing.assert_close(hidden_c.grad, expected[1] * 2.0)
    torch.testing.assert_close(weight_c.grad, expected[2] * 2.0)


def test_chunk_rows_must_be_positive() -> None:
    hidden, weight, targets = random_problem(4, 4, 5)
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(hidden, weight, targets, chunk_rows=0)


def test_rows_per_chunk_bounds_the_chunk_size() -> None:
    assert rows_per_chunk(16_000) == 1024
    assert rows_per_chunk(10**7) == 64  # never fewer than 64 rows
    assert rows_per_chunk(50_257) * 50_257 <= 1024 * 16_000


def test_fp16_keeps_small_gradients_of_a_mean_over_many_rows() -> None:
    # The gradient of a mean over 16,384 rows, per logit, is p / 16,384: for probabilities p
    # ~1/2,000 that is ~3e-8, below fp16's smallest value. Scaled by 1/rows before the fp16
    # matmuls it flushes to zero (the hidden-state gradient was then 14% off); the mean's 1/rows
    # belongs after them, in fp32.
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(16_384, 8, generator=generator)
    weight = torch.randn(2_000, 8, generator=generator) * 0.5 + 1.0
    targets = torch.randint(0, 2_000, (16_384,), generator=generator)
    _, expected_hidden, expected_weight = plain_loss_and_grads(
        hidden.double(), weight.double(), targets
    )
    with torch.autocast("cpu", dtype=torch.float16):
        _, hidden_grad, weight_grad = chunked_loss_and_grads(hidden, weight, targets)
    for got, want in ((hidden_grad, expected_hidden), (weight_grad, expected_weight)):
        error = (got.double() - want).abs().max() / want.abs().max()
        assert error < 5e-3, error.item()
