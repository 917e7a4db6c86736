"""Sessions on compiled models: whole-model ``torch.compile`` and compiled submodules.

The inductor backend builds C++ kernels with the machine's compiler, which takes
seconds per model, so these tests are marked slow (CI runs them).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from gradwatch import gradwatch

pytestmark = pytest.mark.slow

STEPS = 30


class Mlp(nn.Module):
    """Two hidden layers; ``equal_init`` makes ``fc1``'s units equal for good.

    With every row of ``fc1`` equal and every column of ``fc2`` equal, the units
    of ``fc1`` get equal outputs and equal gradients, so they never separate.
    """

    def __init__(self, equal_init: bool = False, unused_head: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act1 = nn.Tanh()
        self.fc2 = nn.Linear(16, 16)
        self.act2 = nn.Tanh()
        self.out = nn.Linear(16, 3)
        self.head = nn.Linear(3, 3) if unused_head else None
        if equal_init:
            nn.init.constant_(self.fc1.weight, 0.1)
            nn.init.zeros_(self.fc1.bias)
            nn.init.constant_(self.fc2.weight, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.fc1(x))
        h = self.act2(self.fc2(h))
        return self.out(h)


def _compiled(model: nn.Module, how: str) -> nn.Module:
    if how == "whole":
        return torch.compile(model, backend="inductor")
    model.fc2.compile(backend="inductor")
    return model


def _train(model: nn.Module, runner: nn.Module, steps: int = STEPS, **options):
    """Train for ``steps`` steps; return the session and the frames compiled.

    ``counters["frames"]["total"]`` counts every frame TorchDynamo compiles,
    recompilations included, so it stays constant once nothing recompiles.
    """
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    frames = []
    with gradwatch(runner, on_alert="ignore", **options) as gw:
        for _ in range(steps):
            x = torch.randn(16, 8, generator=generator)
            y = torch.randint(0, 3, (16,), generator=generator)
            optimizer.zero_grad()
            nn.functional.cross_entropy(runner(x), y).backward()
            optimizer.step()
            frames.append(counters["frames"]["total"])
    return gw, frames


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("how", ["whole", "submodule"])
def test_compiled_healthy_run_is_silent(how):
    torch.manual_seed(0)
    model = Mlp()
    gw, frames = _train(model, _compiled(model, how))
    assert gw.alerts == []
    assert frames[-1] == frames[0]


@pytest.mark.parametrize("how", ["whole", "submodule"])
def test_compiled_unused_head_reported(how):
    torch.manual_seed(0)
    model = Mlp(unused_head=True)
    gw, frames = _train(model, _compiled(model, how))
    unused = sorted(a.param for a in gw.alerts if a.check == "unused_parameter")
    assert unused == ["head.bias", "head.weight"]
    assert frames[-1] == frames[0]


@pytest.mark.parametrize("how", ["whole", "submodule"])
def test_compiled_symmetric_units_reported(how):
    torch.manual_seed(0)
    model = Mlp(equal_init=True)
    gw, _ = _train(model, _compiled(model, how))
    symmetric = [a.param for a in gw.alerts if a.check == "symmetric_units"]
    assert symmetric == ["fc1.weight"]


@pytest.mark.parametrize("how", ["whole", "submodule"])
def test_compiled_mask_leak_reported(how):
    torch.manual_seed(0)
    model = Mlp()
    keep = torch.rand(16, 16, generator=torch.Generator().manual_seed(1)) > 0.5
    with torch.no_grad():
        model.fc2.weight.mul_(keep)
    runner = _compiled(model, how)
    gw, _ = _train(model, runner, masks={"fc2.weight": keep})
    leaks = [a.param for a in gw.alerts if a.check == "mask_leak"]
    assert leaks == ["fc2.weight"]


def test_compiled_autograd_unused_head_reported():
    torch.manual_seed(0)
    model = Mlp(unused_head=True)
    runner = torch.compile(model, backend="inductor")
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    captures = []
    backward_compiler = torch.compile(backend="inductor")
    with gradwatch(runner, on_alert="ignore") as gw:
        for _ in range(8):
            x = torch.randn(16, 8, generator=generator)
            y = torch.randint(0, 3, (16,), generator=generator)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(runner(x), y)
            with torch._dynamo.compiled_autograd._enable(backward_compiler):
                loss.backward()
            optimizer.step()
            captures.append(counters["compiled_autograd"]["captures"])
    unused = sorted(a.param for a in gw.alerts if a.check == "unused_parameter")
    assert unused == ["head.bias", "head.weight"]
    assert captures[-1] == captures[3]
