"""Disconnect faults that PyTorch users reported, each with its fixed twin.

Each builder returns ``(model, step_fn)``; ``step_fn(step)`` runs one training
step. The faulty run must raise one of the expected checks on the named
parameters; the fixed twin must raise no error or warning.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradwatch import gradwatch

_DIGITS = load_digits()
X = torch.tensor(_DIGITS.data / 16.0, dtype=torch.float32)
Y = torch.tensor(_DIGITS.target)


def digits_batch(step, size=64):
    start = (step * size) % (len(X) - size)
    return X[start : start + size], Y[start : start + size]


def classification_step(model, holder):
    def step_fn(step):
        x, y = digits_batch(step)
        holder["opt"].zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        holder["opt"].step()

    return step_fn


# Reentrant activation checkpointing behind a frozen embedding: the blocks
# inside the checkpoints never get a gradient (use_reentrant=False fixes it).


class CheckpointedNet(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.embed = nn.Embedding(50, 16).requires_grad_(False)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(2)
        )
        self.head = nn.Linear(16, 4)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=self.reentrant)
        return self.head(h.mean(dim=1))


def build_checkpoint(healthy):
    model = CheckpointedNet(reentrant=not healthy)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    generator = torch.Generator().manual_seed(0)

    def step_fn(step):
        tokens = torch.randint(0, 50, (32, 6), generator=generator)
        labels = torch.randint(0, 4, (32,), generator=generator)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(tokens), labels).backward()
        opt.step()

    return model, step_fn


# An observation encoder run under torch.no_grad() inside the training forward.


class Agent(nn.Module):
    def __init__(self, grad_through_encoder):
        super().__init__()
        self.grad_through_encoder = grad_through_encoder
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, obs):
        obs = obs.view(-1, 1, 8, 8)
        if self.grad_through_encoder:
            return self.head(self.encoder(obs))
        with torch.no_grad():
            features = self.encoder(obs)
        return self.head(features)


def build_no_grad_encoder(healthy):
    model = Agent(grad_through_encoder=healthy)
    holder = {"opt": torch.optim.Adam(model.parameters(), lr=1e-3)}
    return model, classification_step(model, holder)


# A policy-gradient loss built from .item() floats and re-wrapped as a leaf.


def build_item_loss(healthy):
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)

    def step_fn(step):
        states = torch.randn(32, 16, generator=generator)
        opt.zero_grad(set_to_none=True)
        logp = torch.log_softmax(model(states), dim=-1)
        actions = torch.multinomial(logp.exp().detach(), 1, generator=generator)
        rewards = torch.where(actions[:, 0] == 2, 1.0, -0.1)
        chosen = logp[torch.arange(32), actions[:, 0]]
        if healthy:
            loss = -(chosen * rewards).mean()
        else:
            value = -sum(
                c.item() * r.item() for c, r in zip(chosen, rewards, strict=True)
            )
            loss = torch.tensor(value / 32, requires_grad=True)
        loss.backward()
        opt.step()

    return model, step_fn


# An output projection defined in __init__ but skipped in forward.


class SelfAttention(nn.Module):
    def __init__(self, d, use_proj):
        super().__init__()
        self.use_proj = use_proj
        self.to_q, self.to_k, self.to_v = (nn.Linear(d, d) for _ in range(3))
        self.proj_attn = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        h = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v
        return x + (self.proj_attn(h) if self.use_proj else h)


def build_unused_projection(healthy):
    model = nn.Sequential()
    model.attn = SelfAttention(16, use_proj=healthy)
    model.out = nn.Linear(16, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)

    def step_fn(step):
        x = torch.randn(8, 5, 16, generator=generator)
        opt.zero_grad(set_to_none=True)
        pred = model.out(model.attn(x).mean(dim=1)).squeeze(-1)
        F.mse_loss(pred, x[:, :, 0].mean(dim=1)).backward()
        opt.step()

    return model, step_fn


# Hand-built parameter groups that leave out the classifier and a score vector.


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.fc = nn.Linear(32, 10)
        self.crf_trans = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return self.fc(self.encoder(x)) + self.crf_trans


def build_missing_groups(healthy):
    model = Tagger()
    groups = [{"params": list(model.encoder.parameters()), "lr": 0.05}]
    if healthy:
        groups.append({"params": list(model.fc.parameters()), "lr": 0.1})
        groups.append({"params": [model.crf_trans], "lr": 0.1})
    holder = {"opt": torch.optim.SGD(groups, lr=0.05, momentum=0.9)}
    return model, classification_step(model, holder)


# Layers swapped for smaller ones after the optimizer was built.


class SmallMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def build_swapped_layers(healthy):
    model = SmallMLP()
    holder = {"opt": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)}
    train_step = classification_step(model, holder)

    def step_fn(step):
        if step == 5:
            with torch.no_grad():
                keep = model.fc1.weight.abs().sum(1).topk(24).indices.sort().values
                fc1, fc2 = nn.Linear(64, 24), nn.Linear(24, 10)
                fc1.weight.copy_(model.fc1.weight[keep])
                fc1.bias.copy_(model.fc1.bias[keep])
                fc2.weight.copy_(model.fc2.weight[:, keep])
                fc2.bias.copy_(model.fc2.bias)
            model.fc1, model.fc2 = fc1, fc2
            if healthy:
                holder["opt"] = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(step)

    return model, step_fn


# A backbone unfrozen mid-run, but never added to the optimizer.


def build_unfrozen_backbone(healthy):
    model = nn.Sequential()
    model.backbone = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
    model.head = nn.Linear(32, 10)
    model.backbone.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    holder = {"opt": torch.optim.SGD(trainable, lr=0.1, momentum=0.9)}
    train_step = classification_step(model, holder)

    def step_fn(step):
        if step == 8:
            model.backbone.requires_grad_(True)
            if healthy:
                backbone = list(model.backbone.parameters())
                holder["opt"].add_param_group({"params": backbone})
        train_step(step)

    return model, step_fn


# A top-1 router whose weight is renormalised to exactly 1: ~zero gradient.


class TopOneMoE(nn.Module):
    def __init__(self, normalise):
        super().__init__()
        self.normalise = normalise
        self.router = nn.Linear(16, 4, bias=False)
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        weight, index = F.softmax(self.router(x), dim=-1).topk(1, dim=-1)
        if self.normalise:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            chosen = index[:, 0] == e
            if chosen.any():
                out[chosen] = weight[chosen] * expert(x[chosen])
        return x + out


def build_normalised_router(healthy):
    model = nn.Sequential()
    model.moe = TopOneMoE(normalise=not healthy)
    model.head = nn.Linear(16, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(16, generator=generator)

    def step_fn(step):
        x = torch.randn(64, 16, generator=generator)
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x).squeeze(-1), torch.tanh(x @ target)).backward()
        opt.step()

    return model, step_fn


CASES = {
    "reentrant-checkpoint": (
        build_checkpoint,
        10,
        {"unused_parameter", "graph_cut"},
        [
            "blocks.0.0.weight",
            "blocks.0.0.bias",
            "blocks.1.0.weight",
            "blocks.1.0.bias",
        ],
    ),
    "no-grad-encoder": (
        build_no_grad_encoder,
        10,
        {"unused_parameter", "graph_cut"},
        ["encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.2.bias"],
    ),
    "item-rewrapped-loss": (
        build_item_loss,
        10,
        {"unused_parameter", "graph_cut"},
        ["0.weight", "0.bias", "2.weight", "2.bias"],
    ),
    "unused-projection": (
        build_unused_projection,
        10,
        {"unused_parameter"},
        ["attn.proj_attn.weight", "attn.proj_attn.bias"],
    ),
    "missing-param-groups": (
        build_missing_groups,
        10,
        {"not_in_optimizer"},
        ["fc.weight", "fc.bias", "crf_trans"],
    ),
    "swapped-layers": (
        build_swapped_layers,
        15,
        {"not_in_optimizer"},
        ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"],
    ),
    "unfrozen-backbone": (
        build_unfrozen_backbone,
        16,
        {"not_in_optimizer"},
        ["backbone.0.weight", "backbone.0.bias"],
    ),
    "normalised-router": (
        build_normalised_router,
        10,
        {"zero_gradient"},
        ["moe.router.weight"],
    ),
}


def run_case(build, steps, healthy):
    torch.manual_seed(0)
    model, step_fn = build(healthy)
    with gradwatch(model, on_alert="ignore") as gw:
        for step in range(steps):
            step_fn(step)
    return [a for a in gw.alerts if a.severity in ("error", "warning")]


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("name", CASES)
def test_fault_is_detected_on_its_parameters(name):
    build, steps, checks, targets = CASES[name]
    alerts = run_case(build, steps, healthy=False)

    flagged = {a.param for a in alerts if a.check in checks}
    assert flagged >= set(targets), [str(a) for a in alerts]


@pytest.mark.parametrize("name", CASES)
def test_fixed_twin_is_silent(name):
    build, steps, _, _ = CASES[name]
    alerts = run_case(build, steps, healthy=True)

    assert alerts == []
