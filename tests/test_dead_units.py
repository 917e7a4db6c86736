"""dead_units: units whose gradient or activation stays zero or constant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from gradwatch import gradwatch
from gradwatch.detectors.dead_units import rows_with_nonzero


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits(return_X_y=True)
    return torch.tensor(images / 16.0, dtype=torch.float32), torch.tensor(labels)


class ReluMLP(nn.Module):
    def __init__(self, bias: float | None = None, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.fc1 = nn.Linear(64, 32)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(0.1)
        self.fc2 = nn.Linear(32, 10)
        if bias is not None:
            nn.init.constant_(self.fc1.bias, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.relu(h) if self.functional else self.act(h)
        return self.fc2(self.dropout(h))


def _train(model, digits, steps=8, loss_fn=None, **options):
    images, labels = digits
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch(model, on_alert="ignore", **options) as gw:
        for step in range(steps):
            batch = slice(step * 64, step * 64 + 64)
            output = model(images[batch])
            if loss_fn is None:
                loss = F.cross_entropy(output, labels[batch])
            else:
                loss = loss_fn(output, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return gw


def _dead(gw):
    return [a for a in gw.alerts if a.check == "dead_units"]


def _loud(gw):
    return [a for a in gw.alerts if a.severity in ("error", "warning")]


def test_negative_bias_kills_relu_module(digits):
    torch.manual_seed(0)
    gw = _train(ReluMLP(bias=-50.0), digits)
    found = _dead(gw)
    assert [(a.module, a.param) for a in found] == [("act", None)]
    alert = found[0]
    assert alert.severity == "warning"
    assert alert.step == 0
    assert alert.data["fraction"] == 1.0
    assert alert.data["layer"] == "fc1"
    assert alert.data["signal"] == "activation"
    assert "32 of 32 units of activation `act` (the output of `fc1`)" in alert.message
    assert "Every unit is dead" in alert.message


def test_negative_bias_found_by_gradient(digits):
    torch.manual_seed(0)
    gw = _train(ReluMLP(bias=-50.0, functional=True), digits)
    found = _dead(gw)
    assert [(a.module, a.param) for a in found] == [("fc1", "fc1.weight")]
    assert found[0].data["signal"] == "gradient"
    assert found[0].data["dead_units"] == 32


def test_gradient_signal_without_activation_hooks(digits):
    torch.manual_seed(0)
    gw = _train(ReluMLP(bias=-50.0), digits, activations=False)
    assert [a.param for a in _dead(gw)] == ["fc1.weight"]


def _deep_relu_mlp() -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(64, 32), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(32, 10))


@pytest.mark.parametrize("activations", [True, False])
def test_dead_layer_among_same_shapes(digits, activations):
    torch.manual_seed(0)
    model = _deep_relu_mlp()
    with torch.no_grad():
        model[4].bias[:20] = -50.0
    gw = _train(model, digits, symmetry_every=1, activations=activations)
    found = _dead(gw)
    # Fewer live inputs then kill most units of the next layer as well.
    if activations:
        expected = [("5", None), ("7", None)]
    else:
        expected = [("4", "4.weight"), ("6", "6.weight")]
    assert [(a.module, a.param) for a in found] == expected
    assert found[0].data["dead_units"] >= 20


def test_rows_with_nonzero_flags():
    first = torch.zeros(4, 20)
    first[0, 3] = 1e-40
    first[1, 19] = float("nan")
    first[2, 0] = -0.0
    second = torch.zeros(4, 20)
    second[3, 7] = -2.0
    bias = torch.tensor([[0.0], [0.0], [0.0], [0.5]])
    empty = torch.zeros(4, 0)
    flags = rows_with_nonzero([[first, bias, empty], [second, bias * 0, empty]])
    assert flags.tolist() == [[True, True, False, True], [False, False, False, True]]


def test_partly_dead_layer_below_fraction_is_silent(digits):
    torch.manual_seed(0)
    model = ReluMLP()
    with torch.no_grad():
        model.fc1.bias[:8] = -50.0
    gw = _train(model, digits)
    assert _dead(gw) == []
    gw = _train(model, digits, dead_fraction=0.2)
    found = _dead(gw)
    assert [a.module for a in found] == ["act"]
    assert found[0].data["dead_units"] >= 8


def test_relu_on_regression_output_kills_layer(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 1), nn.ReLU())
    nn.init.constant_(model[2].bias, -20.0)

    def regression(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output.squeeze(1), labels.float())

    gw = _train(model, digits, loss_fn=regression, activations=False)
    found = {a.param: a for a in _dead(gw)}
    # Nothing upstream of the dead output receives a gradient either.
    assert sorted(found) == ["0.weight", "2.weight"]
    assert "Every unit of the layer is dead" in found["2.weight"].message


def test_healthy_relu_network_is_silent(digits):
    torch.manual_seed(0)
    gw = _train(ReluMLP(), digits)
    assert _loud(gw) == []


def test_healthy_batchnorm_network_is_silent(digits):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(512, 10),
    )
    gw = _train(model, digits)
    assert _loud(gw) == []


def test_pruned_rows_are_not_dead(digits):
    """Momentum moves pruned rows inside step(); the mask zeroes them after it."""
    torch.manual_seed(0)
    images, labels = digits
    model = ReluMLP()
    keep = torch.ones(32, dtype=torch.bool)
    keep[:24] = False
    model.fc1.weight.register_hook(lambda grad: grad * keep.unsqueeze(1))
    model.fc1.bias.register_hook(lambda grad: grad * keep)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def apply_mask() -> None:
        with torch.no_grad():
            model.fc1.weight.mul_(keep.unsqueeze(1))
            model.fc1.bias.mul_(keep)

    apply_mask()
    with gradwatch(model, on_alert="ignore", activations=False) as gw:
        for step in range(8):
            batch = slice(step * 64, step * 64 + 64)
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            apply_mask()
    assert _dead(gw) == []


def test_dead_fraction_written_to_tensorboard(digits, tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    torch.manual_seed(0)
    _train(ReluMLP(bias=-50.0), digits, steps=4, logdir=tmp_path)
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "gradwatch/dead_units/act/fraction" in tags
    assert "gradwatch/symmetry/fc1/distinct_units" in tags
    fractions = [e.value for e in events.Scalars("gradwatch/dead_units/act/fraction")]
    assert fractions == [1.0] * 4
    distinct = events.Scalars("gradwatch/symmetry/fc1/distinct_units")
    assert [e.value for e in distinct] == [32.0] * 4


def test_invalid_dead_fraction_raises():
    with pytest.raises(ValueError, match=r"dead_fraction must be a float in \(0, 1\]"):
        gradwatch(nn.Linear(2, 2), dead_fraction=0.0)
