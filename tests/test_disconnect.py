"""Gradient disconnects: each fault with its healthy twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradwatch import gradwatch


def train(model, optimizer, steps=6, make_loss=None, **options):
    """Run ``steps`` SGD steps on random data under a session; return the session."""
    generator = torch.Generator().manual_seed(0)
    options.setdefault("on_alert", "ignore")
    with gradwatch(model, **options) as gw:
        for _ in range(steps):
            x = torch.randn(8, 4, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            loss = make_loss(out) if make_loss else out.square().mean()
            loss.backward()
            optimizer.step()
    return gw


def problems(gw, check=None):
    return [a for a in gw.alerts if a.severity != "info" and check in (None, a.check)]


def names(gw, check):
    return sorted(a.param or a.module for a in problems(gw, check))


class Block(nn.Module):
    """Linear -> ReLU -> Linear, with a fault planted in forward by ``cut``."""

    def __init__(self, cut="none"):
        super().__init__()
        self.cut = cut
        self.first = nn.Linear(4, 8)
        self.second = nn.Linear(8, 2)

    def forward(self, x):
        if self.cut == "no_grad":
            with torch.no_grad():
                h = torch.relu(self.first(x))
        elif self.cut == "inference_mode":
            with torch.inference_mode():
                h = torch.relu(self.first(x))
            h = h.clone()
        else:
            h = torch.relu(self.first(x))
        if self.cut == "detach":
            h = h.detach()
        elif self.cut == "numpy":
            h = torch.from_numpy(np.maximum(h.detach().numpy(), 0))
        elif self.cut == "tensor":
            h = torch.tensor(h.tolist())
        elif self.cut == "leaf":
            h = h.detach().requires_grad_(True)
        return self.second(h)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "cut", ["detach", "no_grad", "inference_mode", "numpy", "tensor", "leaf"]
)
def test_cut_in_forward_flags_first_layer(cut):
    model = Block(cut)
    gw = train(model, sgd(model))

    assert names(gw, "unused_parameter") == ["first.bias", "first.weight"]
    assert problems(gw, "graph_cut"), gw.report()
    assert not problems(gw, "not_in_optimizer")


@pytest.mark.parametrize("cut", ["detach", "numpy", "tensor", "leaf"])
def test_graph_cut_names_module_of_detach(cut):
    model = Block(cut)
    gw = train(model, sgd(model))

    (cut_alert,) = problems(gw, "graph_cut")
    assert cut_alert.module == ""
    assert cut_alert.data["kind"] == "detached"
    assert cut_alert.data["caller"] == "first"
    assert set(cut_alert.data["orphaned"]) == {"first.weight", "first.bias"}


@pytest.mark.parametrize("cut", ["no_grad", "inference_mode"])
def test_graph_cut_names_module_run_without_grad(cut):
    model = Block(cut)
    gw = train(model, sgd(model))

    (cut_alert,) = problems(gw, "graph_cut")
    assert cut_alert.module == "first"
    assert cut_alert.data["kind"] == "no_grad"
    assert "torch.no_grad()" in cut_alert.message


def test_healthy_block_is_silent():
    model = Block()
    gw = train(model, sgd(model))

    assert problems(gw) == []


def test_detach_inside_submodule_forward_names_submodule():
    class Detaching(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 8)

        def forward(self, x):
            return self.inner(x).detach()

    model = nn.Sequential(Detaching(), nn.ReLU(), nn.Linear(8, 2))
    gw = train(model, sgd(model))

    (cut_alert,) = problems(gw, "graph_cut")
    assert cut_alert.module == "0"
    assert names(gw, "unused_parameter") == ["0.inner.bias", "0.inner.weight"]


def test_unused_layer_says_never_called():
    model = Block()
    model.spare = nn.Linear(8, 8)
    gw = train(model, sgd(model))

    alerts = problems(gw)
    assert sorted(a.param for a in alerts) == ["spare.bias", "spare.weight"]
    assert all(a.check == "unused_parameter" for a in alerts)
    assert all(a.module == "spare" for a in alerts)
    assert "never called in forward" in alerts[0].message


def test_unused_alert_is_raised_once_and_updated():
    model = Block()
    model.spare = nn.Linear(8, 8)
    gw = train(model, sgd(model), steps=10)

    alert = next(a for a in gw.alerts if a.param == "spare.weight")
    assert alert.step == 0
    assert alert.last_step == 9
    assert alert.count == 8
    assert len(problems(gw)) == 2


def test_loss_rewrapped_from_item_flags_every_parameter():
    model = Block()

    def rewrapped(out):
        return torch.tensor(out.square().mean().item(), requires_grad=True)

    gw = train(model, sgd(model), make_loss=rewrapped)

    expected = ["first.bias", "first.weight", "second.bias", "second.weight"]
    assert names(gw, "unused_parameter") == expected
    (cut_alert,) = problems(gw, "graph_cut")
    assert cut_alert.data["kind"] == "after_output"


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_reentrant_checkpoint_behind_frozen_embedding():
    class Net(nn.Module):
        def __init__(self, reentrant):
            super().__init__()
            self.reentrant = reentrant
            self.embed = nn.Embedding(20, 8)
            self.embed.weight.requires_grad_(False)
            self.block = nn.Sequential(nn.Linear(8, 8), nn.GELU())
            self.head = nn.Linear(8, 2)

        def forward(self, tokens):
            h = checkpoint(self.block, self.embed(tokens), use_reentrant=self.reentrant)
            return self.head(h.mean(dim=1))

    def run(reentrant):
        model = Net(reentrant)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-2
        )
        with gradwatch(model, on_alert="ignore") as gw:
            for step in range(4):
                tokens = torch.randint(
                    0, 20, (4, 5), generator=torch.Generator().manual_seed(step)
                )
                optimizer.zero_grad()
                model(tokens).square().mean().backward()
                optimizer.step()
        return gw

    faulty = run(reentrant=True)
    assert names(faulty, "unused_parameter") == ["block.0.bias", "block.0.weight"]
    (cut_alert,) = problems(faulty, "graph_cut")
    assert cut_alert.module == "block"
    assert "use_reentrant=False" in cut_alert.message
    assert problems(run(reentrant=False)) == []


def test_frozen_parameters_are_not_flagged():
    model = Block()
    model.first.requires_grad_(False)
    optimizer = torch.optim.SGD(model.second.parameters(), lr=0.1)
    gw = train(model, optimizer)

    assert problems(gw) == []


def test_ignore_pattern_skips_module():
    model = Block("detach")
    gw = train(model, sgd(model), ignore=["first"])

    assert problems(gw) == []


def test_branch_that_stops_is_gradient_stopped():
    class Switch(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(4, 4)
            self.branch = nn.Linear(4, 4)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            h = self.trunk(x)
            return self.branch(h) if self.calls <= 12 else h

    model = Switch()
    gw = train(model, sgd(model), steps=24)

    stopped = problems(gw, "gradient_stopped")
    assert sorted(a.param for a in stopped) == ["branch.bias", "branch.weight"]
    assert stopped[0].data["last_gradient_step"] == 11
    assert problems(gw, "unused_parameter") == []


def test_alternating_heads_are_silent():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 8)
            self.heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 3)])
            self.task = 0

        def forward(self, x):
            self.task = 1 - self.task
            return self.heads[self.task](torch.relu(self.body(x)))

    model = TwoHeads()
    gw = train(model, sgd(model), steps=30)

    assert problems(gw) == []


def test_intermittent_branch_is_silent():
    class LayerDrop(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))
            self.generator = torch.Generator().manual_seed(3)

        def forward(self, x):
            for layer in self.layers:
                if torch.rand(1, generator=self.generator).item() > 0.3:
                    x = x + layer(x)
            return x

    model = LayerDrop()
    gw = train(model, sgd(model), steps=40)

    assert problems(gw, "gradient_stopped") == []


def test_not_in_optimizer_when_head_left_out():
    model = Block()
    optimizer = torch.optim.SGD(model.first.parameters(), lr=0.1)
    gw = train(model, optimizer)

    assert names(gw, "not_in_optimizer") == ["second.bias", "second.weight"]
    alert = problems(gw, "not_in_optimizer")[0]
    assert alert.step == 0
    assert "add_param_group" in alert.message


def test_not_in_optimizer_after_layer_replaced():
    model = Block()
    optimizer = sgd(model)
    with gradwatch(model, on_alert="ignore") as gw:
        for step in range(8):
            if step == 3:
                model.second = nn.Linear(8, 2)
            optimizer.zero_grad()
            model(torch.randn(8, 4)).square().mean().backward()
            optimizer.step()

    assert names(gw, "not_in_optimizer") == ["second.bias", "second.weight"]
    alert = problems(gw, "not_in_optimizer")[0]
    assert alert.step == 3
    assert alert.data["stale_tensors"] == 2


def test_new_optimizer_after_layer_replaced_is_silent():
    model = Block()
    holder = {"opt": sgd(model)}
    with gradwatch(model, on_alert="ignore") as gw:
        for step in range(8):
            if step == 3:
                model.second = nn.Linear(8, 2)
                holder["opt"] = sgd(model)
            holder["opt"].zero_grad()
            model(torch.randn(8, 4)).square().mean().backward()
            holder["opt"].step()

    assert problems(gw) == []


@pytest.mark.parametrize("fixed", [False, True])
def test_unfreeze_without_add_param_group(fixed):
    model = Block()
    model.first.requires_grad_(False)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1
    )
    with gradwatch(model, on_alert="ignore") as gw:
        for step in range(10):
            if step == 4:
                model.first.requires_grad_(True)
                if fixed:
                    optimizer.add_param_group({"params": model.first.parameters()})
            optimizer.zero_grad()
            model(torch.randn(8, 4)).square().mean().backward()
            optimizer.step()

    if fixed:
        assert problems(gw) == []
    else:
        assert names(gw, "not_in_optimizer") == ["first.bias", "first.weight"]
        assert problems(gw, "not_in_optimizer")[0].step == 4


class _Router(nn.Module):
    """Top-1 mixture whose routing weight is renormalised to 1 when ``normalise``."""

    def __init__(self, normalise):
        super().__init__()
        self.normalise = normalise
        self.router = nn.Linear(8, 4, bias=False)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        weight, index = torch.softmax(self.router(x), dim=-1).topk(1, dim=-1)
        if self.normalise:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            chosen = index[:, 0] == e
            if chosen.any():
                out[chosen] = weight[chosen] * expert(x[chosen])
        return self.head(x + out)


@pytest.mark.parametrize("normalise", [True, False])
def test_router_with_constant_weight_gets_zero_gradient(normalise):
    torch.manual_seed(0)
    model = _Router(normalise)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(8):
            x = torch.randn(64, 8, generator=generator)
            optimizer.zero_grad()
            F.mse_loss(model(x).squeeze(-1), torch.tanh(x.sum(-1))).backward()
            optimizer.step()

    if normalise:
        assert names(gw, "zero_gradient") == ["router.weight"]
    else:
        assert problems(gw) == []


def test_exact_zero_gradient_is_flagged():
    model = Block()
    with torch.no_grad():
        model.second.weight.zero_()
    optimizer = torch.optim.SGD(model.first.parameters(), lr=0.1)
    gw = train(model, optimizer)

    assert names(gw, "zero_gradient") == ["first.bias", "first.weight"]
    assert "exactly zero" in problems(gw, "zero_gradient")[0].message


def test_zero_initialised_output_layer_is_silent():
    model = Block()
    nn.init.zeros_(model.second.weight)
    nn.init.zeros_(model.second.bias)
    gw = train(model, sgd(model), make_loss=lambda out: (out - 1).square().mean())

    assert problems(gw) == []


def test_key_bias_under_softmax_is_silent():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            x = x.view(2, 4, 4)
            weights = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), dim=-1)
            return (weights @ self.v(x)).reshape(8, 4)

    model = Attention()
    gw = train(model, sgd(model))

    assert problems(gw) == []


def test_module_list_in_plain_list_is_unregistered():
    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = [nn.Linear(4, 4), nn.Linear(4, 4)]
            self.scale = torch.ones(4, requires_grad=True)
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            for stage in self.stages:
                x = torch.relu(stage(x))
            return self.head(x * self.scale)

    model = Hidden()
    gw = train(model, sgd(model))

    found = sorted(a.data["name"] for a in problems(gw, "unregistered_parameter"))
    assert found == [
        "scale",
        "stages.0.bias",
        "stages.0.weight",
        "stages.1.bias",
        "stages.1.weight",
    ]
    assert "nn.ModuleList" in problems(gw, "unregistered_parameter")[0].message


def test_input_that_requires_grad_is_not_unregistered():
    model = Block()
    optimizer = sgd(model)
    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(4):
            x = torch.randn(8, 4, requires_grad=True)
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()

    assert problems(gw) == []


def test_parameters_of_another_model_are_not_unregistered():
    encoder = nn.Linear(4, 4)
    model = Block()
    optimizer = torch.optim.SGD([*model.parameters(), *encoder.parameters()], lr=0.1)
    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(4):
            optimizer.zero_grad()
            model(encoder(torch.randn(8, 4))).square().mean().backward()
            optimizer.step()

    assert problems(gw) == []
