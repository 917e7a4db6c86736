"""Reported numeric faults, each with its fixed twin.

Each scenario is rebuilt here from the public report it comes from: the faulty
run must raise one of the expected checks on the expected target, and the
fixed twin must raise no error or warning at all.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

from gradwatch import gradwatch


def loud(gw):
    return [a for a in gw.alerts if a.severity in ("error", "warning")]


def digits():
    images, labels = load_digits(return_X_y=True)
    return torch.tensor(images / 16.0, dtype=torch.float32), torch.tensor(labels)


def run(model, step_fn, steps):
    with gradwatch(model, on_alert="ignore") as gw:
        for step in range(steps):
            step_fn(step)
    return gw


# sqrt through torch.where: the branch not taken still gets a gradient
# in autograd. s < 0 makes 0.5 / sqrt(s) NaN and 0 * NaN = NaN,
# while the forward stays finite.


class SqrtHead(nn.Module):
    def __init__(self, safe):
        super().__init__()
        self.safe = safe
        self.body = nn.Sequential(nn.Linear(64, 32), nn.Tanh())
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        s = self.head(self.body(x)).squeeze(-1)
        positive = s > 0
        if self.safe:
            inner = torch.where(positive, s, torch.ones_like(s))
            return torch.where(positive, torch.sqrt(inner), torch.zeros_like(s))
        return torch.where(positive, torch.sqrt(s), torch.zeros_like(s))


def where_sqrt_run(safe):
    torch.manual_seed(0)
    x, _ = digits()
    y = x.mean(dim=1).sqrt()
    model = SqrtHead(safe)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def step_fn(step):
        i = (step * 64) % (len(x) - 64)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x[i : i + 64]), y[i : i + 64]).backward()
        optimizer.step()

    return run(model, step_fn, steps=8)


def test_where_sqrt_nan_located_at_head():
    gw = where_sqrt_run(safe=False)

    alerts = [a for a in loud(gw) if a.check == "nonfinite_gradient"]
    assert alerts
    first = min(alerts, key=lambda a: a.step)
    assert first.step == 0
    assert first.severity == "error"
    assert first.module == "head"
    assert "NaN" in first.data["kinds"]
    assert {"head.weight", "body.0.weight"} <= set(first.data["params"])


def test_where_sqrt_double_where_is_silent():
    gw = where_sqrt_run(safe=True)

    assert loud(gw) == []


# Gradient clipping configured but never applied: a tanh RNN over 40 steps
# with SGD (lr 0.3, momentum 0.9) explodes.


class SeqRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(4, 32, batch_first=True)
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def rnn_run(clip):
    torch.manual_seed(0)
    model = SeqRegressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    generator = torch.Generator().manual_seed(0)

    def step_fn(step):
        x = torch.randn(32, 40, 4, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), 3 * x[:, 0, 0:1]).backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return run(model, step_fn, steps=30)


def test_unclipped_rnn_explodes():
    gw = rnn_run(clip=False)

    exploding = [a for a in loud(gw) if a.check == "exploding_gradient"]
    assert exploding
    first = min(exploding, key=lambda a: a.step)
    assert first.step <= 7
    assert first.param == "rnn.weight_hh_l0"
    assert first.data["ratio"] > 100
    nonfinite = [a for a in loud(gw) if a.check == "nonfinite_gradient"]
    assert nonfinite
    assert min(a.step for a in nonfinite) > first.step


def test_clipped_rnn_is_silent():
    gw = rnn_run(clip=True)

    assert loud(gw) == []


# Ten sigmoid layers with default initialisation: each sigmoid scales the
# backward signal by at most 0.25, so the first layers barely learn.


class DeepMLP(nn.Module):
    def __init__(self, relu):
        super().__init__()
        layers, width = [], 64
        for _ in range(10):
            linear = nn.Linear(width, 32)
            if relu:
                nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
                nn.init.zeros_(linear.bias)
            layers += [linear, nn.ReLU() if relu else nn.Sigmoid()]
            width = 32
        layers.append(nn.Linear(32, 10))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def deep_mlp_run(relu):
    torch.manual_seed(0)
    x, y = digits()
    model = DeepMLP(relu)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step_fn(step):
        i = (step * 64) % (len(x) - 64)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
        optimizer.step()

    return run(model, step_fn, steps=10)


def test_deep_sigmoid_first_layer_vanishes():
    gw = deep_mlp_run(relu=False)

    (alert,) = [a for a in loud(gw) if a.check == "vanishing_gradient"]
    assert alert.param == "net.0.weight"
    assert alert.step == 0
    assert alert.data["ratio"] < 1e-3
    assert "net.2.weight" in alert.data["params"]
    assert "net.20.weight" not in alert.data["params"]


def test_deep_relu_kaiming_is_silent():
    gw = deep_mlp_run(relu=True)

    assert loud(gw) == []
