"""Optimizer ownership with several optimizers or a replaced one."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import gradwatch


def problems(gw, check):
    return [a for a in gw.alerts if a.severity != "info" and a.check == check]


def names(gw, check):
    return sorted(a.param or a.module for a in problems(gw, check))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )


def train_gan(leave_out_head):
    """Step a discriminator and a generator in turn, and return the session."""
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    critic = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    model = nn.ModuleDict({"gen": generator, "critic": critic})
    gen_params = list(generator.parameters())
    if leave_out_head:
        gen_params = gen_params[:2]
    gen_optimizer = torch.optim.Adam(gen_params, lr=1e-3)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=1e-3)

    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(20):
            z, real = torch.randn(32, 8), torch.randn(32, 4)
            critic_optimizer.zero_grad()
            fake = generator(z).detach()
            critic_loss = (
                F.softplus(-critic(real)).mean() + F.softplus(critic(fake)).mean()
            )
            critic_loss.backward()
            critic_optimizer.step()

            gen_optimizer.zero_grad()
            F.softplus(-critic(generator(z))).mean().backward()
            gen_optimizer.step()
    return gw


def train_halves(leave_out_bias):
    """Step two optimizers over disjoint halves of one model back to back."""
    model = mlp()
    first = torch.optim.SGD([*model[0].parameters(), *model[2].parameters()], lr=0.05)
    second_params = list(model[4].parameters())
    if leave_out_bias:
        second_params = second_params[:1]
    second = torch.optim.SGD(second_params, lr=0.05)

    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(20):
            x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
            first.zero_grad()
            second.zero_grad()
            F.cross_entropy(model(x), y).backward()
            first.step()
            second.step()
    return gw


def test_gan_optimizers_silent():
    gw = train_gan(leave_out_head=False)

    assert problems(gw, "not_in_optimizer") == [], gw.report()


def test_gan_generator_head_left_out():
    gw = train_gan(leave_out_head=True)

    assert names(gw, "not_in_optimizer") == ["gen.2.bias", "gen.2.weight"]
    # The generator steps at odd steps: its first step is step 1.
    assert {a.step for a in problems(gw, "not_in_optimizer")} == {1}


def test_disjoint_halves_silent():
    gw = train_halves(leave_out_bias=False)

    assert problems(gw, "not_in_optimizer") == [], gw.report()


def test_disjoint_halves_bias_left_out():
    gw = train_halves(leave_out_bias=True)

    assert names(gw, "not_in_optimizer") == ["4.bias"]


@pytest.mark.parametrize("partial", [False, True])
def test_new_optimizer_takes_over(partial):
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    with gradwatch(model, on_alert="ignore") as gw:
        for step in range(20):
            if step == 8:
                params = list(model.parameters())
                if partial:
                    params = params[:-2]
                # The old optimizer is dropped, so only the new one steps the model.
                optimizer = torch.optim.SGD(params, lr=0.05)
                gc.collect()
            x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    expected = ["4.bias", "4.weight"] if partial else []
    assert names(gw, "not_in_optimizer") == expected, gw.report()
