"""The optimizers and schedules: which tensor gets which optimizer, Muon's update, wsd's shape."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mllm.cliargs import parse_config
from mllm.config import ModelConfig, TrainConfig
from mllm.model import GPT
from mllm.train.muon import Muon, orthogonalise
from mllm.train.optim import CombinedOptimizer, build_optimizer, parameter_groups
from mllm.train.schedule import lr_factor, wsd_decay_start

TINY = ModelConfig(vocab_size=64, context=16, d_model=32, layers=2, heads=2)


def names_by_group(model: GPT, optimizer: str) -> dict[str, set[str]]:
    ids = {id(p): n for n, p in model.named_parameters()}
    groups = parameter_groups(model, optimizer)
    return {key: {ids[id(p)] for p in params} for key, params in groups.items()}


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest() -> None:
    model = GPT(TINY)
    groups = names_by_group(model, "muon")
    layers = range(TINY.layers)
    assert groups["muon_3"] == {f"blocks.{i}.attn.qkv.weight" for i in layers}
    assert groups["muon_2"] == {f"blocks.{i}.ffn.gate_up.weight" for i in layers}
    assert groups["muon_1"] == {
        f"blocks.{i}.{name}" for i in layers for name in ("attn.proj.weight", "ffn.down.weight")
    }
    assert groups["decay"] == {"token_embedding.weight", "position_embedding.weight"}
    assert groups["no_decay"] == {n for n, p in model.named_parameters() if p.dim() == 1}
    assert set().union(*groups.values()) == {n for n, _ in model.named_parameters()}


def test_adamw_decays_every_matrix() -> None:
    model = GPT(TINY)
    groups = names_by_group(model, "adamw")
    assert set(groups) == {"decay", "no_decay"}
    assert groups["decay"] == {n for n, p in model.named_parameters() if p.dim() == 2}


def test_each_group_has_its_own_learning_rate() -> None:
    config = parse_config(TrainConfig, ["--lr", "0.003", "--min-lr", "0", "--muon-lr", "0.05"])
    optimizer = build_optimizer(GPT(TINY), config, torch.device("cpu"))
    assert isinstance(optimizer, CombinedOptimizer)
    peaks = {g["name"]: g["peak_lr"] for g in optimizer.param_groups}
    assert peaks == {
        "muon_1": 0.05,
        "muon_2": 0.05,
        "muon_3": 0.05,
        "decay": 0.003,
        "no_decay": 0.003,
    }


def test_muon_equals_torch_muon_on_a_plain_matrix() -> None:
    torch_muon = getattr(torch.optim, "Muon", None)
    if torch_muon is None:
        pytest.skip("torch.optim.Muon needs torch 2.9 or later")
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(48, 16))
    theirs = torch.nn.Parameter(ours.detach().clone())
    mine = Muon([{"params": [ours]}], lr=0.02, weight_decay=0.1)
    reference = torch_muon([theirs], lr=0.02, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(48, 16)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        mine.step()
        reference.step()
    assert torch.equal(ours, theirs)


def test_muon_ns_steps_sets_the_iterations_of_each_update(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--muon-ns-steps reaches every Muon group, and each update runs that many iterations."""
    import mllm.train.muon as muon_module

    config = TrainConfig(model=TINY, optimizer="muon", muon_ns_steps=3)
    model = GPT(TINY)
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    muon_groups = [g for g in optimizer.param_groups if g["name"].startswith("muon_")]
    assert muon_groups and {g["ns_steps"] for g in muon_groups} == {3}
    calls: list[int] = []
    original = muon_module.orthogonalise

    def recording(updates: torch.Tensor, steps: int) -> torch.Tensor:
        calls.append(steps)
        return original(updates, steps)

    monkeypatch.setattr(muon_module, "orthogonalise", recording)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert calls and set(calls) == {3}
    # fewer iterations: a different (less orthogonal) update than the default 5
    updates = torch.randn(2, 8, 8)
    assert not torch.equal(original(updates, 3), original(updates))


def test_a_fused_matrix_is_orthogonalised_as_its_parts() -> None:
    torch.manual_seed(0)
    fused = torch.nn.Parameter(torch.randn(3 * 16, 16))
    parts = [torch.nn.Parameter(p.detach().clone()) for p in fused.detach().chunk(3)]
    as_one = torch.nn.Parameter(fused.detach().clone())
    split = Muon([{"params": [fused], "parts": 3}], lr=0.02)
    separate = Muon([{"params": parts}], lr=0.02)
    one_matrix = Muon([{"params": [as_one]}], lr=0.02)
    for _ in range(2):
        grad = torch.randn(3 * 16, 16)
        fused.grad, as_one.grad = grad.clone(), grad.clone()
        for p, g in zip(parts, grad.chunk(3), strict=True):
            p.grad = g.clone()
        for optimizer in (split, separate, one_matrix):
            optimizer.step()
    assert torch.allclose(fused, torch.cat(list(parts)), atol=1e-6)
    assert not torch.allclose(fused, as_one, atol=1e-3)  # the stack's update differs


def test_orthogonalise_flattens_the_spectrum() -> None:
    torch.manual_seed(0)
    matrix = torch.randn(1, 64, 32) @ torch.diag(torch.logspace(-1, 0, 32))
    singular = torch.linalg.svdvals(orthogonalise(matrix)[0].float())
    assert singular.min() > 0.5 and singular.max() < 1.3


def test_muon_refuses_what_it_cannot_split() -> None:
    with pytest.raises(ValueError, match="2-D parameters whose rows split into 3"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(10, 4))], "parts": 3}])


def schedule_config(schedule: str, **flags: object) -> TrainConfig:
    argv = ["--schedule", schedule, "--lr", "1e-3", "--min-lr", "1e-4"]
    for name, value in flags.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return parse_config(TrainConfig, argv)


def test_wsd_warms_up_holds_then_decays_linearly_to_min_lr() -> None:
    config = schedule_config("wsd", warmup_steps=10, decay_fraction=0.25)
    total = 100
    factors = [lr_factor(s, config, total) for s in range(total)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    start = wsd_decay_start(config, total)
    assert start == 75
    assert factors[10:start] == [1.0] * (start - 10)
    decay = factors[start:]
    assert all(a > b for a, b in itertools.pairwise(decay))
    steps = [b - a for a, b in itertools.pairwise(decay)]
    assert max(steps) - min(steps) < 1e-12  # linear
    assert factors[-1] == pytest.approx(0.1)  # --min-lr / --lr at the last step


@settings(max_examples=60, deadline=None)
@given(
    schedule=st.sampled_from(["wsd", "cosine"]),
    warmup=st.integers(0, 50),
    total=st.integers(1, 400),
    fraction=st.floats(0.01, 1.0),
)
def test_every_schedule_ends_at_min_lr_and_stays_in_range(
    schedule: str, warmup: int, total: int, fraction: float
) -> None:
    config = schedule_config(schedule, warmup_steps=warmup, decay_fraction=fraction)
    factors = [lr_factor(s, config, total) for s in range(total)]
    assert all(0.0 < f <= 1.0 + 1e-12 for f in factors)
    if total > warmup:
        assert factors[-1] == pytest.approx(0.1)


def test_the_combined_optimizer_works_with_the_gradient_scaler() -> None:
    """fp16 training unscales and steps through GradScaler, which sees one optimizer."""
    config = parse_config(TrainConfig, [])
    model = GPT(TINY)
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.context))
    scaler.scale(model.loss(idx, idx)).backward()
    scaler.unscale_(optimizer)
    assert all(  # unscaled in place: the gradients are the loss's own again
        p.grad.abs().max() < 100 for p in model.parameters() if p.grad is not None
    )
    scaler.step(optimizer)
    scaler.update()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "blocks.0.attn.qkv.weight" in moved and "token_embedding.weight" in moved
