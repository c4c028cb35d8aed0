"""Sampling: greedy, top-k, top-p and per-row parameters and seeds."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mllm.sampling import SamplingParams, filter_logits, sample_next


def test_temperature_zero_is_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    out = sample_next(logits, [SamplingParams(temperature=0)] * 2)
    assert out.tolist() == [1, 0]


def test_top_k_keeps_only_k_tokens() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    kept = filter_logits(logits, [SamplingParams(top_k=2)])
    assert torch.isfinite(kept).tolist() == [[False, True, True, False]]


def test_top_p_keeps_smallest_prefix_reaching_mass() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_logits(probs.log(), [SamplingParams(top_p=0.8)])
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    kept = filter_logits(probs.log(), [SamplingParams(top_p=0.81)])
    assert torch.isfinite(kept).tolist() == [[True, True, True, False]]


def test_a_row_without_top_p_keeps_its_tail_beside_a_row_with_it() -> None:
    logits = torch.randn(2, 320, generator=torch.Generator().manual_seed(0)) * 8
    alone = filter_logits(logits[:1], [SamplingParams()])
    together = filter_logits(logits, [SamplingParams(), SamplingParams(top_p=0.9)])
    assert torch.isfinite(alone).all()
    assert torch.equal(together[0], alone[0])


def test_rows_keep_their_own_parameters_and_seeds() -> None:
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(top_p=0.9)]

    def draw() -> list[int]:
        gens = [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
        return sample_next(logits, params, gens).tolist()

    first = draw()
    assert first == draw()
    assert first[0] == logits[0].argmax().item()
    assert first[1] == logits[1].argmax().item()  # top-k 1 is greedy too


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-20, 20), min_size=2, max_size=30),
    st.integers(0, 40),
    st.one_of(st.floats(0.01, 1.0), st.floats(1e-300, 1e-3)),
    st.one_of(st.floats(0.05, 3.0), st.floats(1e-300, 1e-3), st.floats(3.0, 1e300)),
)
def test_sampled_token_is_always_allowed(values, top_k, top_p, temperature) -> None:
    logits = torch.tensor([values])
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)]
    allowed = torch.isfinite(filter_logits(logits, params))[0]
    assert allowed.any()
    token = sample_next(logits, params, [torch.Generator().manual_seed(0)]).item()
    assert allowed[token]
