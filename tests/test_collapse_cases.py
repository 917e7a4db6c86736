"""Reported collapse faults, each with its fixed twin, under the default settings.

Each scenario reproduces a fault users reported: a gate whose two layers are both
zero-initialised, a ReLU layer killed by a large learning rate on unscaled inputs,
and a fully zero-initialised MLP. The faulty run must raise the expected check
naming the expected layer; the fixed run must raise no error or warning.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from gradwatch import gradwatch

StepFn = Callable[[int], None]


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits(return_X_y=True)
    return torch.tensor(images, dtype=torch.float32), torch.tensor(labels)


def _step_fn(model, optimizer, images, labels, batch_size) -> StepFn:
    def step(index: int) -> None:
        start = (index * batch_size) % (len(images) - batch_size)
        batch = slice(start, start + batch_size)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images[batch]), labels[batch]).backward()
        optimizer.step()

    return step


def _run(model: nn.Module, step: StepFn, steps: int):
    with gradwatch(model, on_alert="ignore") as gw:
        for index in range(steps):
            step(index)
    return gw


def _loud(gw):
    return [a for a in gw.alerts if a.severity in ("error", "warning")]


# A residual gate, Linear -> ReLU -> Linear -> Tanh, with both layers zeroed:
# every gate gradient is zero and its 16 hidden units stay equal.


class GatedFusion(nn.Module):
    def __init__(self, zero_both: bool) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, 16), nn.ReLU())
        self.fusion = nn.Linear(16, 16)
        self.gate = nn.Sequential(
            nn.Linear(16, 16, bias=False),
            nn.ReLU(),
            nn.Linear(16, 16, bias=False),
            nn.Tanh(),
        )
        if zero_both:
            nn.init.zeros_(self.gate[0].weight)
        nn.init.zeros_(self.gate[2].weight)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x)
        r = self.fusion(h)
        return self.head(h + self.gate(r) * r)


def _gate_run(digits, healthy: bool):
    torch.manual_seed(0)
    images, labels = digits
    model = GatedFusion(zero_both=not healthy)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return _run(model, _step_fn(model, optimizer, images / 16.0, labels, 64), 15)


def test_zero_init_gate_both_layers(digits):
    gw = _gate_run(digits, healthy=False)
    found = {a.param: a for a in gw.alerts if a.check == "symmetric_units"}
    assert sorted(found) == ["gate.0.weight", "gate.2.weight"]
    assert found["gate.0.weight"].module == "gate.0"
    assert found["gate.0.weight"].step == 0
    assert found["gate.0.weight"].data["distinct_units"] == 1


def test_zero_init_gate_output_only_is_silent(digits):
    assert _loud(_gate_run(digits, healthy=True)) == []


# Unscaled pixels (0..16) and SGD at lr 0.5: most of fc1's ReLU units die in the
# first steps and never recover. At lr 0.01 the layer stays alive.


class ReluMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _relu_run(digits, healthy: bool):
    torch.manual_seed(0)
    images, labels = digits
    model = ReluMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01 if healthy else 0.5)
    return _run(model, _step_fn(model, optimizer, images, labels, 128), 20)


def test_dead_relu_high_learning_rate(digits):
    gw = _relu_run(digits, healthy=False)
    found = [a for a in gw.alerts if a.check == "dead_units"]
    assert [a.module for a in found] == ["act"]
    assert found[0].data["layer"] == "fc1"
    assert found[0].data["fraction"] >= 0.5
    assert found[0].step <= 4


def test_relu_low_learning_rate_is_silent(digits):
    assert _loud(_relu_run(digits, healthy=True)) == []


# Every weight and bias of a sigmoid MLP set to zero: the 16 hidden units stay
# identical and the loss stays at chance level.


class SigmoidMLP(nn.Module):
    def __init__(self, zero_init: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 10)
        if zero_init:
            for layer in (self.fc1, self.fc2):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sigmoid(self.fc1(x)))


def _sigmoid_run(digits, healthy: bool):
    torch.manual_seed(0)
    images, labels = digits
    model = SigmoidMLP(zero_init=not healthy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return _run(model, _step_fn(model, optimizer, images / 16.0, labels, 64), 20)


def test_zero_init_symmetric_units(digits):
    gw = _sigmoid_run(digits, healthy=False)
    found = [a for a in gw.alerts if a.check == "symmetric_units"]
    assert [(a.param, a.module) for a in found] == [("fc1.weight", "fc1")]
    assert found[0].step == 0
    assert found[0].data["largest_group"] == 16


def test_default_init_sigmoid_mlp_is_silent(digits):
    assert _loud(_sigmoid_run(digits, healthy=True)) == []
