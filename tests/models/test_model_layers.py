"""Layer contracts: padding never matters, SimTier counts exactly, SA-TA reduces to plain TA."""
from __future__ import annotations

import math

import pytest
import torch

from recsys.models.layers import (
    MLP,
    Dice,
    DinAttention,
    SemanticTargetAttention,
    SimTier,
    masked_mean,
    masked_softmax,
)

R, L, D = 5, 7, 6


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _mask() -> torch.Tensor:
    """Left-aligned padding of varied lengths, with one all-padding row and one full row."""
    lengths = torch.tensor([0, 1, 3, L, 4])
    return torch.arange(L)[None, :] < lengths[:, None]


def _scramble_padding(x: torch.Tensor, mask: torch.Tensor, gen: torch.Generator, fill: float | None = None) -> torch.Tensor:
    """Same tensor with arbitrary values (large, or `fill`) where the mask is False."""
    noise = torch.randn(x.shape, generator=gen) * 1e3 if fill is None else torch.full(x.shape, fill)
    m = mask if x.dim() == mask.dim() else mask.unsqueeze(-1)
    return torch.where(m, x, noise)


def test_masked_softmax_zero_on_padding_and_finite_on_empty_rows(gen):
    mask = _mask()
    logits = torch.randn(R, L, generator=gen, requires_grad=True)
    w = masked_softmax(logits, mask)
    assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
    assert torch.allclose(w[1:].sum(-1), torch.ones(R - 1))
    assert torch.equal(w[0], torch.zeros(L))
    w.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_masked_mean_ignores_padding(gen):
    mask = _mask()
    x = torch.randn(R, L, D, generator=gen)
    out = masked_mean(x, mask)
    assert torch.equal(out[0], torch.zeros(D))
    assert torch.allclose(out[2], x[2, :3].mean(0))
    assert torch.equal(out, masked_mean(_scramble_padding(x, mask, gen), mask))


@pytest.mark.parametrize("activation", ["prelu", "dice", "relu"])
def test_din_attention_padding_content_changes_nothing(gen, activation):
    torch.manual_seed(0)
    layer = DinAttention(D, hidden=(8, 4), activation=activation)
    mask = _mask()
    q = torch.randn(R, D, generator=gen)
    keys = torch.randn(R, L, D, generator=gen, requires_grad=True)
    out = layer(q, keys, mask)
    assert out.shape == (R, D)
    # Train mode too: padding must not reach Dice's batch statistics.
    assert torch.allclose(out, layer(q, _scramble_padding(keys.detach(), mask, gen), mask), atol=1e-6)
    assert torch.equal(out[0], torch.zeros(D))
    out.sum().backward()
    assert torch.isfinite(keys.grad).all()
    assert torch.equal(keys.grad[~mask], torch.zeros(int((~mask).sum()), D))


def _din_by_concatenation(layer: DinAttention, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DIN attention written out: the scorer on [q, k, q - k, q * k] of every real pair."""
    rows, length, dim = keys.shape
    real = mask.reshape(-1)
    qs = q.unsqueeze(1).expand(rows, length, dim).reshape(-1, dim)[real]
    ks = keys.reshape(-1, dim)[real]
    scores = layer.out(layer.scorer(torch.cat([qs, ks, qs - ks, qs * ks], dim=-1))).squeeze(-1)
    logits = torch.zeros(rows * length).masked_scatter(real, scores).reshape(rows, length)
    return torch.bmm(masked_softmax(logits, mask).unsqueeze(1), keys).squeeze(1)


@pytest.mark.parametrize("hidden", [(8, 4), ()])
@pytest.mark.parametrize("full", [False, True])
def test_din_attention_equals_its_scorer_on_the_concatenated_pair(gen, hidden, full):
    # The first layer is computed in parts (the query's once per row): the same function, to
    # float32 rounding, in values and in gradients, with padding and without.
    torch.manual_seed(1)
    layer = DinAttention(D, hidden=hidden, activation="dice")
    mask = torch.ones(R, L, dtype=torch.bool) if full else _mask()
    q = torch.randn(R, D, generator=gen, requires_grad=True)
    keys = torch.randn(R, L, D, generator=gen, requires_grad=True)
    out = layer(q, keys, mask)
    expected = _din_by_concatenation(layer, q, keys, mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [q, keys, *layer.parameters()])
    expected_grads = torch.autograd.grad(expected.square().sum(), [q, keys, *layer.parameters()])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("train", [True, False])
def test_dice_is_the_din_formula(gen, train):
    # p x + (1 - p) alpha x with p = sigmoid(BN(x)): values and gradients, batch or running statistics
    dice = Dice(D).train(train)
    with torch.no_grad():
        dice.alpha.uniform_(-0.5, 0.5, generator=gen)
    x = torch.randn(R * L, D, generator=gen, requires_grad=True)
    out = dice(x)
    p = torch.sigmoid(dice.norm(x))
    expected = p * x + (1.0 - p) * dice.alpha * x
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), [x, dice.alpha])
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), [x, dice.alpha])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_simtier_exact_histogram_with_boundaries():
    tier = SimTier(num_tiers=20)
    sims = torch.tensor([[-1.0, 0.0, 1.0, 0.05, -0.05, 0.95, 0.5, 0.0]])
    mask = torch.tensor([[True, True, True, True, True, True, True, False]])
    counts = tier.counts(sims, mask)[0]
    expected = torch.zeros(20)
    expected[0] = 1  # -1 opens the first tier
    expected[10] = 2  # 0 and 0.05 in [0, 0.1)
    expected[19] = 2  # 1 closes the last tier; 0.95 in [0.9, 1]
    expected[9] = 1  # -0.05 in [-0.1, 0)
    expected[15] = 1  # 0.5 in [0.5, 0.6)
    assert torch.equal(counts, expected)
    out = tier(sims, mask)
    assert torch.allclose(out[0], torch.log1p(expected))


def test_simtier_padding_not_counted_whatever_its_value():
    tier = SimTier(num_tiers=8, low=-1.0, high=1.0)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    a = torch.tensor([[0.3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    b = torch.tensor([[0.3, float("nan"), 5.0], [-7.0, float("inf"), 0.0]])
    assert torch.equal(tier.counts(a, mask), tier.counts(b, mask))
    assert tier.counts(a, mask)[0].sum() == 1
    assert torch.equal(tier(b, mask)[1], torch.zeros(8))


def test_simtier_learns_per_tier_weights():
    tier = SimTier(num_tiers=4)
    sims = torch.tensor([[0.1, 0.2, -0.9]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    tier(sims, mask).sum().backward()
    assert torch.allclose(tier.weight.grad, torch.tensor([math.log(2), 0.0, math.log(3), 0.0]))


@pytest.mark.parametrize("bad", [dict(num_tiers=0), dict(low=1.0, high=1.0)])
def test_simtier_rejects_bad_config(bad):
    with pytest.raises(ValueError, match="SimTier"):
        SimTier(**bad)


def _plain_attention_reference(layer: SemanticTargetAttention, q, keys, mask):
    """softmax((K W_k)(q W_q)^T / sqrt(d)) over real behaviours, written out by hand."""
    outs = []
    for r in range(q.shape[0]):
        n = int(mask[r].sum())
        if n == 0:
            outs.append(torch.zeros(layer.out_dim))
            continue
        k = keys[r, :n] @ layer.w_k.weight.T
        v = keys[r, :n] @ layer.w_v.weight.T
        a = (k @ (layer.w_q.weight @ q[r])) / math.sqrt(layer.out_dim)
        outs.append(torch.softmax(a, 0) @ v)
    return torch.stack(outs)


def test_sata_reduces_to_plain_attention_when_multimodal_gates_are_zero(gen):
    torch.manual_seed(0)
    fused = SemanticTargetAttention(D, D, attention_dim=4, fuse=True)
    plain = SemanticTargetAttention(D, D, attention_dim=4, fuse=False)
    plain.load_state_dict({k: v for k, v in fused.state_dict().items() if k.startswith("w_")})
    with torch.no_grad():
        fused.gates.copy_(torch.tensor([1.0, 0.0, 0.0]))
    mask = _mask()
    q, keys = torch.randn(R, D, generator=gen), torch.randn(R, L, D, generator=gen)
    rel = torch.rand(R, L, generator=gen) * 2 - 1
    expected = _plain_attention_reference(plain, q, keys, mask)
    assert torch.allclose(plain(q, keys, mask), expected, atol=1e-6)
    assert torch.allclose(fused(q, keys, mask, rel), expected, atol=1e-6)


def test_sata_fused_logits_formula(gen):
    layer = SemanticTargetAttention(D, D, attention_dim=4, fuse=True, temperature=0.1)
    with torch.no_grad():
        layer.gates.copy_(torch.tensor([0.5, 2.0, -1.5]))
    mask = torch.ones(R, L, dtype=torch.bool)
    q, keys = torch.randn(R, D, generator=gen), torch.randn(R, L, D, generator=gen)
    rel = torch.rand(R, L, generator=gen)
    a_id = torch.einsum("rld,rd->rl", layer.w_k(keys), layer.w_q(q)) / 2.0
    expected = 0.5 * a_id + 2.0 * rel / 0.1 - 1.5 * a_id * rel
    assert torch.allclose(layer.logits(q, keys, mask, rel), expected, atol=1e-5)
    assert torch.allclose(layer.temperature, torch.tensor(0.1))


def test_sata_padding_and_empty_rows(gen):
    layer = SemanticTargetAttention(D, D, attention_dim=3, fuse=True)
    mask = _mask()
    q = torch.randn(R, D, generator=gen)
    keys = torch.randn(R, L, D, generator=gen, requires_grad=True)
    rel = torch.rand(R, L, generator=gen)
    out = layer(q, keys, mask, rel)
    scrambled = layer(q, _scramble_padding(keys.detach(), mask, gen), mask, _scramble_padding(rel, mask, gen, float("nan")))
    assert torch.allclose(out, scrambled, atol=1e-6)
    assert torch.equal(out[0], torch.zeros(3))
    out.sum().backward()
    for p in [keys, *layer.parameters()]:
        assert torch.isfinite(p.grad).all()
    assert layer.gates.grad.abs().sum() > 0 and layer.log_temperature.grad != 0


def test_sata_fused_needs_relevance(gen):
    layer = SemanticTargetAttention(D, D, attention_dim=3, fuse=True)
    with pytest.raises(ValueError, match="relevance"):
        layer(torch.randn(1, D), torch.randn(1, 2, D), torch.ones(1, 2, dtype=torch.bool))


def test_mlp_widths_follow_config():
    mlp = MLP(10, (7, 5, 3), activation="dice")
    assert mlp.out_dim == 3
    widths = [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [7, 5, 3]
    assert mlp(torch.randn(4, 10)).shape == (4, 3)
    with pytest.raises(ValueError, match="activation"):
        MLP(3, (2,), activation="swish")
