"""symmetric_units: units with equal weights and equal gradients, and their twins."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from gradwatch import gradwatch
from gradwatch.detectors.unit_groups import group_layers, group_units


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits(return_X_y=True)
    return torch.tensor(images / 16.0, dtype=torch.float32), torch.tensor(labels)


def _directions(*widths: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    vectors = [torch.randn(w, generator=generator) for w in widths]
    total = torch.cat(vectors).norm()
    unit = [v / total for v in vectors]
    return unit, unit


def _train(model, digits, steps=8, lr=0.1, optimizer=None, **options):
    images, labels = digits
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=lr)
    with gradwatch(model, on_alert="ignore", **options) as gw:
        for step in range(steps):
            start = step * 64
            loss = F.cross_entropy(
                model(images[start : start + 64]), labels[start : start + 64]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return gw


def _found(gw, check="symmetric_units"):
    return [a for a in gw.alerts if a.check == check]


def _loud(gw):
    return [a for a in gw.alerts if a.severity in ("error", "warning")]


# Grouping


def test_groups_equal_rows_and_gradients():
    weights = torch.tensor([[1.0, 2.0], [3.0, 1.0], [1.0, 2.0], [1.0, 2.0]])
    grads = torch.tensor([[0.5, 0.1], [0.2, 0.2], [0.5, 0.1], [0.9, 0.1]])
    labels = group_units([weights], [grads], 1e-4, _directions(2))
    assert labels.tolist() == [0, 1, 0, 3]


def test_groups_within_relative_tolerance():
    weights = torch.tensor([[100.0, 0.0], [100.0 + 1e-3, 0.0], [100.1, 0.0]])
    grads = torch.ones(3, 2)
    labels = group_units([weights], [grads], 1e-4, _directions(2))
    assert labels.tolist() == [0, 0, 2]


def test_groups_across_pieces():
    weights = torch.zeros(3, 4)
    bias = torch.tensor([[1.0], [1.0], [2.0]])
    grads = [torch.ones(3, 4), torch.ones(3, 1)]
    labels = group_units([weights, bias], grads, 1e-4, _directions(4, 1))
    assert labels.tolist() == [0, 0, 2]


def test_groups_interleaved_groups():
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 16, generator=generator)
    weights = torch.stack([a, b, a, b, a, b])
    grads = torch.zeros(6, 16)
    labels = group_units([weights], [grads], 1e-4, _directions(16))
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]


def test_pruned_rows_are_not_a_group():
    weights = torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [2.0, 1.0]])
    grads = torch.tensor([[0.0, 0.0], [0.1, 0.2], [0.0, 0.0], [0.3, 0.1]])
    labels = group_units([weights], [grads], 1e-4, _directions(2))
    assert labels.tolist() == [0, 1, 2, 3]


def test_all_zero_layer_is_one_group():
    zeros = torch.zeros(5, 3)
    labels = group_units([zeros], [zeros], 1e-4, _directions(3))
    assert labels.tolist() == [0] * 5


def _near_twins(generator: torch.Generator, tol: float) -> torch.Tensor:
    """Rows 1, 3, 5, 7 are rows 0, 2, 4, 6 moved by 0.5, 0.99, 1.01, 2 ``tol``."""
    rows = torch.randn(12, 40, generator=generator)
    step = torch.randn(40, generator=generator)
    step = step / step.norm()
    for pair, factor in enumerate((0.5, 0.99, 1.01, 2.0)):
        source = rows[2 * pair]
        rows[2 * pair + 1] = source + factor * tol * source.norm() * step
    return rows


def test_pair_selection_matches_dense_comparison():
    generator = torch.Generator().manual_seed(5)
    tol = 1e-3
    layers_w, layers_g = [], []
    for _ in range(6):
        weights = _near_twins(generator, tol)
        grads = weights * 0.5
        layers_w.append([weights[:, :39], weights[:, 39:]])
        layers_g.append([grads[:, :39], grads[:, 39:]])
    layers_w[1][0][5:] = 0.0
    layers_g[1][0][5:] = 0.0
    layers_w[1][1][5:] = 0.0
    layers_g[1][1][5:] = 0.0
    layers_w[2][0][6, 3] = float("nan")
    layers_w[3][0][7, 2] = float("inf")
    layers_w[3][0][8, 2] = float("inf")
    layers_g[4][0][:] = 0.0
    layers_g[4][1][:] = 0.0
    directions = _directions(39, 1)
    sparse = group_layers(layers_w, layers_g, tol, directions, dense=False)
    dense = group_layers(layers_w, layers_g, tol, directions, dense=True)
    assert sparse.tolist() == dense.tolist()
    assert sparse[0, :8].tolist() == [0, 0, 2, 2, 4, 5, 6, 7]


def test_group_layers_matches_group_units():
    generator = torch.Generator().manual_seed(6)
    weights = [torch.randn(10, 8, generator=generator) for _ in range(3)]
    weights[1][4:] = weights[1][0]
    grads = [torch.ones(10, 8) for _ in range(3)]
    directions = _directions(8)
    together = group_layers(
        [[w] for w in weights], [[g] for g in grads], 1e-4, directions
    )
    for layer, (w, g) in enumerate(zip(weights, grads, strict=True)):
        alone = group_units([w], [g], 1e-4, directions)
        assert together[layer].tolist() == alone.tolist()
    assert together[1, 4:].tolist() == [0] * 6


@pytest.mark.parametrize("units", [8192])
def test_wide_layer_groups_fast(units):
    """8192 units of 1024 inputs: about 0.5 s measured on 2 shared CPU cores."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(units, 1024, generator=generator)
    weights[100:200] = weights[7]
    grads = torch.randn(units, 1024, generator=generator)
    grads[100:200] = grads[7]
    directions = _directions(1024)
    group_units([weights], [grads], 1e-4, directions)  # warm-up
    start = time.perf_counter()
    labels = group_units([weights], [grads], 1e-4, directions)
    elapsed = time.perf_counter() - start
    assert (labels[100:200] == 7).all()
    assert labels.unique().numel() == units - 100
    assert elapsed < 2.0, f"grouping {units} units took {elapsed:.2f} s"


# Faulty models


class SigmoidMLP(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sigmoid(self.fc1(x)))


def test_zero_init_hidden_layers_alert(digits):
    torch.manual_seed(0)
    model = SigmoidMLP()
    for layer in (model.fc1, model.fc2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    gw = _train(model, digits)
    found = _found(gw)
    assert [(a.param, a.module) for a in found] == [("fc1.weight", "fc1")]
    alert = found[0]
    assert alert.severity == "error"
    assert alert.step == 0
    assert alert.data["distinct_units"] == 1
    assert alert.data["largest_group"] == 16
    assert alert.data["group_members"] == list(range(8))
    assert alert.data["gradients_equal"] is True
    assert "1 distinct unit(s) out of 16" in alert.message
    assert "nn.init" in alert.message


def test_constant_init_alerts(digits):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)
    )
    for layer in (model[0], model[2], model[4]):
        nn.init.constant_(layer.weight, 0.05)
        nn.init.constant_(layer.bias, 0.1)
    gw = _train(model, digits)
    # The output layer's rows differ in gradient (one per class), so only the
    # hidden layers collapse.
    assert [a.param for a in _found(gw)] == ["0.weight", "2.weight"]


def test_default_init_is_silent(digits):
    torch.manual_seed(0)
    gw = _train(SigmoidMLP(), digits)
    assert _loud(gw) == []


def test_constant_conv_alerts_per_channel(digits):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(512, 10),
    )
    for layer in (model[1], model[3], model[6]):
        nn.init.constant_(layer.weight, 0.02)
        nn.init.zeros_(layer.bias)
    gw = _train(model, digits)
    found = _found(gw)
    assert [a.module for a in found] == ["1", "3"]
    assert found[1].data["units"] == 8
    assert found[1].data["distinct_units"] == 1
    assert "Conv2d" in found[1].message


def _same_width_mlp() -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(64, 32), nn.Tanh()]
    for _ in range(4):
        layers += [nn.Linear(32, 32), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(32, 10))


def _make_constant(*layers: nn.Linear) -> None:
    """Give ``layers`` constant weights; the first one's units then stay equal.

    The layer after it must be constant too, or its distinct columns would send
    each unit a different gradient.
    """
    for layer in layers:
        nn.init.constant_(layer.weight, 0.05)
        nn.init.constant_(layer.bias, 0.1)


def test_constant_layer_among_same_shapes_alerts(digits):
    torch.manual_seed(0)
    model = _same_width_mlp()
    _make_constant(model[4], model[6])
    gw = _train(model, digits, symmetry_every=1)
    assert [a.param for a in _found(gw)] == ["4.weight"]


def test_replaced_layer_is_checked(digits):
    """A layer swapped in during training is checked from the next step."""
    torch.manual_seed(0)
    model = _same_width_mlp()
    images, labels = digits
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch(model, on_alert="ignore", symmetry_every=1) as gw:
        for step in range(16):
            if step == 6:
                model[4] = nn.Linear(32, 32)
                model[6] = nn.Linear(32, 32)
                _make_constant(model[4], model[6])
                optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            batch = slice(step * 64, step * 64 + 64)
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    found = _found(gw)
    assert [a.param for a in found] == ["4.weight"]
    assert found[0].step == 6


def test_cnn_default_init_is_silent(digits):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Flatten(),
        nn.Linear(512, 10),
    )
    gw = _train(model, digits)
    assert _loud(gw) == []


# Healthy zero initialisations


class LoRALinear(nn.Module):
    """A frozen base layer plus a low-rank update whose B starts at zero."""

    def __init__(self, base: nn.Linear, rank: int = 4) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x))


def test_lora_zero_b_is_silent(digits):
    torch.manual_seed(0)
    model = nn.Sequential(
        LoRALinear(nn.Linear(64, 32)), nn.ReLU(), LoRALinear(nn.Linear(32, 10))
    )
    gw = _train(model, digits, lr=0.05)
    assert _loud(gw) == []


def test_zero_init_last_layer_is_silent(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    gw = _train(model, digits, optimizer=torch.optim.Adam(model.parameters()))
    assert _loud(gw) == []


def test_zero_init_head_with_absent_classes_is_silent(digits):
    """100 classes, 16 samples a batch: absent classes' rows stay equal a while."""
    torch.manual_seed(0)
    images, _ = digits
    labels = torch.randint(0, 100, (len(images),), generator=torch.Generator())
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 100))
    head = nn.Linear(32, 100)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model[2] = head
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch(model, on_alert="ignore", symmetry_every=1) as gw:
        for step in range(12):
            batch = slice(step * 16, step * 16 + 16)
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert _found(gw) == []


class ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(64, 32)
        self.branch = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 10)
        nn.init.zeros_(self.branch[2].weight)
        nn.init.zeros_(self.branch[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return self.head(h + self.branch(h))


def test_zero_init_residual_branch_is_silent(digits):
    torch.manual_seed(0)
    gw = _train(ResidualMLP(), digits, steps=30)

    assert _loud(gw) == []


def test_zero_embedding_is_not_units():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(32, 5))
    nn.init.zeros_(model[0].weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 50, (64, 4), generator=torch.Generator())
    targets = torch.randint(0, 5, (64,), generator=torch.Generator())
    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(5):
            loss = F.cross_entropy(model(tokens), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert _found(gw) == []


# Attention heads


class Attention(nn.Module):
    """Self-attention with separate q/k/v projections, then mean pooling."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        mixed = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(mixed.transpose(1, 2).reshape(b, t, d))


class TokenModel(nn.Module):
    """Digits as 8 tokens of 8 pixels, one attention layer, a linear head."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.attn = attention
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.view(-1, 8, 8))
        if isinstance(self.attn, nn.MultiheadAttention):
            h = h + self.attn(h, h, h, need_weights=False)[0]
        else:
            h = h + self.attn(h)
        return self.head(h.mean(dim=1))


def _copy_head_zero(weight: torch.Tensor, heads: int, rows: bool = True) -> None:
    """Copy head 0's rows (or input columns) into every other head, in place."""
    with torch.no_grad():
        size = weight.shape[0 if rows else 1] // heads
        for h in range(1, heads):
            if rows:
                weight[h * size : (h + 1) * size] = weight[:size]
            else:
                weight[:, h * size : (h + 1) * size] = weight[:, :size]


def test_copied_heads_alert_multihead_attention(digits):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(32, 4, batch_first=True)
    for part in attention.in_proj_weight.data.chunk(3):
        _copy_head_zero(part, 4)
    _copy_head_zero(attention.out_proj.weight.data, 4, rows=False)
    gw = _train(TokenModel(attention), digits, lr=0.05)
    found = [a for a in _found(gw) if a.module == "attn"]
    assert len(found) == 1
    assert found[0].param == "attn.in_proj_weight"
    assert found[0].data["unit"] == "head"
    assert found[0].data["distinct_units"] == 1


def test_copied_heads_alert_qkv_layout(digits):
    torch.manual_seed(0)
    attention = Attention()
    for layer in (attention.q_proj, attention.k_proj, attention.v_proj):
        _copy_head_zero(layer.weight.data, 4)
        _copy_head_zero(layer.bias.data, 4)
    _copy_head_zero(attention.out_proj.weight.data, 4, rows=False)
    gw = _train(TokenModel(attention), digits, lr=0.05)
    assert [(a.module, a.param) for a in _found(gw)] == [("attn", "attn.q_proj.weight")]
    assert "4 heads" in _found(gw)[0].message


def test_copied_qkv_with_distinct_output_is_silent(digits):
    """Heads equal in q/k/v but read by different output columns break apart."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(32, 4, batch_first=True)
    for part in attention.in_proj_weight.data.chunk(3):
        _copy_head_zero(part, 4)
    gw = _train(TokenModel(attention), digits, lr=0.05)
    assert _found(gw) == []


def test_attention_default_init_is_silent(digits):
    torch.manual_seed(0)
    for attention in (nn.MultiheadAttention(32, 4, batch_first=True), Attention()):
        gw = _train(TokenModel(attention), digits, lr=0.05)
        assert _loud(gw) == []


# Mixture of experts


class SoftMixture(nn.Module):
    """A dense mixture: every expert sees every sample, weighted by a router."""

    def __init__(self, experts: int = 4) -> None:
        super().__init__()
        self.stem = nn.Linear(64, 32)
        self.router = nn.Linear(32, experts)
        expert = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))
        self.experts = nn.ModuleList([copy.deepcopy(expert) for _ in range(experts)])
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        weights = self.router(h).softmax(dim=-1)
        outputs = torch.stack([e(h) for e in self.experts], dim=-1)
        return self.head((outputs * weights.unsqueeze(1)).sum(dim=-1))


def test_copied_experts_alert_with_unit_groups(digits):
    torch.manual_seed(0)
    model = SoftMixture()
    nn.init.zeros_(model.router.weight)
    nn.init.zeros_(model.router.bias)
    gw = _train(model, digits, unit_groups={"experts": "children"})
    found = [a for a in _found(gw) if a.module == "experts"]
    assert len(found) == 1
    assert found[0].param == "experts.0.0.weight"
    assert found[0].data["distinct_units"] == 1
    assert found[0].data["unit"] == "child"


def test_independent_experts_are_silent(digits):
    torch.manual_seed(0)
    model = SoftMixture()
    for expert in model.experts:
        for layer in (expert[0], expert[2]):
            layer.reset_parameters()
    gw = _train(model, digits, unit_groups={"experts": "children"})
    assert _loud(gw) == []


def test_invalid_unit_group_kind_raises():
    with pytest.raises(ValueError, match="must be one of 'children'"):
        gradwatch(nn.Linear(2, 2), unit_groups={"": "rows"})


# Observation only


def test_training_is_unchanged_and_hooks_removed(digits):
    def run(watched: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10)
        )
        nn.init.zeros_(model[0].weight)
        if watched:
            _train(model, digits, steps=12, symmetry_every=1)
        else:
            images, labels = digits
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            for step in range(12):
                batch = slice(step * 64, step * 64 + 64)
                loss = F.cross_entropy(model(images[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        hooks = sum(len(m._forward_hooks) for m in model.modules())
        assert hooks == 0
        return [p.detach().clone() for p in model.parameters()]

    for plain, watched in zip(run(False), run(True), strict=True):
        assert torch.equal(plain, watched)
