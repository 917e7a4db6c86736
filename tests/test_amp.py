"""Mixed precision: torch.autocast (bfloat16 on CPU), GradScaler, half weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwatch import gradwatch
from gradwatch.stats import foreach_norms

STEPS = 12


class Mlp(nn.Module):
    def __init__(self, unused_head: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)
        self.head = nn.Linear(4, 4) if unused_head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _batches(steps: int = STEPS):
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(32, 16, generator=generator)
        y = torch.randint(0, 4, (32,), generator=generator)
        yield x, y


def _checks(gw) -> set[str]:
    return {alert.check for alert in gw.alerts if alert.severity != "info"}


def test_autocast_bf16_healthy_is_silent():
    torch.manual_seed(0)
    model = Mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch(model, on_alert="ignore") as gw:
        for x, y in _batches():
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
    assert gw.alerts == []


def test_autocast_bf16_unused_head_reported():
    torch.manual_seed(0)
    model = Mlp(unused_head=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch(model, on_alert="ignore") as gw:
        for x, y in _batches():
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
    unused = [a.param for a in gw.alerts if a.check == "unused_parameter"]
    assert sorted(unused) == ["head.bias", "head.weight"]
    assert _checks(gw) == {"unused_parameter"}


def _train_scaled(model, scaler, steps=STEPS, inf_steps=()):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch(model, on_alert="ignore") as gw:
        for index, (x, y) in enumerate(_batches(steps)):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            if index in inf_steps:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    return gw


def test_grad_scaler_growing_scale_is_silent():
    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    gw = _train_scaled(Mlp(), scaler)
    assert scaler.get_scale() > 2.0**10
    assert gw.alerts == []


def test_grad_scaler_skipped_steps_handled():
    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    gw = _train_scaled(Mlp(), scaler, inf_steps=(4, 5))
    assert scaler.get_scale() < 2.0**10
    assert "unused_parameter" not in _checks(gw)
    assert "gradient_stopped" not in _checks(gw)
    assert "nonfinite_gradient" not in _checks(gw)
    assert "exploding_gradient" not in _checks(gw)


def test_grad_scaler_skipped_steps_with_unused_head():
    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    gw = _train_scaled(Mlp(unused_head=True), scaler, inf_steps=(4,))
    unused = [a.param for a in gw.alerts if a.check == "unused_parameter"]
    assert sorted(unused) == ["head.bias", "head.weight"]


def test_half_weights_large_gradient_norm_is_finite():
    """A float16 gradient whose norm exceeds 65504 must not read as Inf."""
    torch.manual_seed(0)
    model = nn.Linear(256, 256).half()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(6):
            optimizer.zero_grad()
            out = model(torch.ones(1, 256, dtype=torch.float16))
            (out.float().sum() * 1.0).backward()
            model.weight.grad.fill_(300.0)
            optimizer.step()
    assert gw.alerts == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_norms_accumulate_in_float32(dtype):
    grad = torch.full((256, 256), 300.0, dtype=dtype)
    norms = foreach_norms([grad, torch.ones(4)])
    assert norms.dtype == torch.float32
    assert norms[0].item() == pytest.approx(300.0 * 256, rel=1e-3)
    assert norms[1].item() == pytest.approx(2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_unused_reported(dtype):
    torch.manual_seed(0)
    model = Mlp(unused_head=True).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch(model, on_alert="ignore") as gw:
        for x, y in _batches(6):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x.to(dtype)).float(), y)
            loss.backward()
            optimizer.step()
    unused = [a.param for a in gw.alerts if a.check == "unused_parameter"]
    assert sorted(unused) == ["head.bias", "head.weight"]
    assert _checks(gw) == {"unused_parameter"}
