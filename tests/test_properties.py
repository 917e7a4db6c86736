"""Property tests: gradwatch observes training and never changes it.

Hypothesis draws small architectures (depth, widths, activations, a parallel
branch, tied weights, frozen layers), an optimizer and a number of steps. For
each draw, training under gradwatch must match training without it bit for bit,
and every hook gradwatch added must be gone afterwards, whether the block ends
normally or by an exception. The draws are derandomised so a CI run is
reproducible; hypothesis writes no example database.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref

import pytest
import torch
import torch.nn.modules.module as module_hooks
import torch.optim.optimizer as optimizer_hooks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradwatch import gradwatch

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "momentum": lambda params: torch.optim.SGD(
        params, lr=0.05, momentum=0.9, weight_decay=1e-3
    ),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2),
}
# Options that make every expensive check run at every step.
EVERY_STEP = {"log_every": 1, "histogram_every": 1, "symmetry_every": 1}

PROPERTY_SETTINGS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@dataclasses.dataclass(frozen=True)
class Architecture:
    widths: tuple[int, ...]
    activations: tuple[str, ...]
    branch: bool
    tied: bool
    frozen: tuple[bool, ...]
    dropout: bool
    seed: int


@st.composite
def architectures(draw):
    depth = draw(st.integers(1, 4))
    widths = tuple(draw(st.lists(st.integers(1, 8), min_size=depth, max_size=depth)))
    names = st.sampled_from(sorted(ACTIVATIONS))
    activations = tuple(draw(st.lists(names, min_size=depth, max_size=depth)))
    frozen = st.lists(st.booleans(), min_size=depth + 1, max_size=depth + 1)
    return Architecture(
        widths=widths,
        activations=activations,
        branch=draw(st.booleans()),
        tied=draw(st.booleans()),
        frozen=tuple(draw(frozen)),
        dropout=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


class Net(nn.Module):
    """An MLP built from an :class:`Architecture`."""

    def __init__(self, arch: Architecture, inputs: int = 5, outputs: int = 3):
        super().__init__()
        torch.manual_seed(arch.seed)
        sizes = (inputs, *arch.widths)
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False)
        )
        self.acts = nn.ModuleList(ACTIVATIONS[name]() for name in arch.activations)
        self.drop = nn.Dropout(0.2) if arch.dropout else nn.Identity()
        self.branch = nn.Linear(inputs, sizes[-1]) if arch.branch else None
        self.head = nn.Linear(sizes[-1], outputs)
        # A square layer that shares its weight with a hidden layer of the same
        # shape, when there is one, and is applied twice in forward.
        self.tied = nn.Linear(sizes[-1], sizes[-1]) if arch.tied else None
        if self.tied is not None:
            shared = self._square_weight(sizes[-1])
            if shared is not None:
                self.tied.weight = shared
        for layer, frozen in zip([*self.layers, self.head], arch.frozen, strict=True):
            layer.requires_grad_(not frozen)

    def _square_weight(self, width):
        for layer in self.layers:
            if layer.in_features == layer.out_features == width:
                return layer.weight
        return None

    def forward(self, x):
        h = x
        for layer, act in zip(self.layers, self.acts, strict=True):
            h = act(layer(h))
        if self.branch is not None:
            h = h + self.branch(x)
        if self.tied is not None:
            h = h + torch.tanh(self.tied(torch.tanh(self.tied(h))))
        return self.head(self.drop(h))


def has_trainable(model):
    return any(p.requires_grad for p in model.parameters())


def train(model, optimizer, steps, seed):
    """Train with a private generator for the data; dropout uses the global RNG."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(6, 5, generator=generator)
        target = torch.randn(6, 3, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()


def snapshot(model, optimizer):
    """Parameters, gradients and optimizer state, as exact copies."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }
    state = {
        (index, key): value.clone()
        for index, param_state in enumerate(optimizer.state.values())
        for key, value in param_state.items()
        if isinstance(value, torch.Tensor)
    }
    return params, grads, state


def assert_same(first, second):
    for part_a, part_b in zip(first, second, strict=True):
        assert part_a.keys() == part_b.keys()
        for key in part_a:
            assert torch.equal(part_a[key], part_b[key]), key


def hook_state(model, optimizer=None):
    """Every hook dict of the model, its parameters, optimizer and torch globals."""
    state = {}
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr.endswith("hooks") or attr.endswith("hooks_with_kwargs"):
                state[(name, attr)] = list(value)
    for name, param in model.named_parameters():
        hooks = getattr(param, "_post_accumulate_grad_hooks", None)
        state[(name, "post_accumulate")] = list(hooks or {})
        state[(name, "backward")] = list(param._backward_hooks or {})
    if optimizer is not None:
        for attr in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
            state[("optimizer", attr)] = list(getattr(optimizer, attr))
    for attr in (
        "_global_optimizer_pre_hooks",
        "_global_optimizer_post_hooks",
    ):
        state[("torch.optim", attr)] = list(getattr(optimizer_hooks, attr))
    for attr in dir(module_hooks):
        if attr.startswith("_global_") and attr.endswith("hooks"):
            state[("torch.nn", attr)] = list(getattr(module_hooks, attr))
    return state


# Observation only


@PROPERTY_SETTINGS
@given(
    arch=architectures(),
    optimizer_name=st.sampled_from(sorted(OPTIMIZERS)),
    steps=st.integers(1, 6),
)
def test_training_bitwise_identical(arch, optimizer_name, steps):
    model = Net(arch)
    twin = copy.deepcopy(model)
    if not has_trainable(model):
        return
    make = OPTIMIZERS[optimizer_name]
    optimizer = make([p for p in model.parameters() if p.requires_grad])
    twin_optimizer = make([p for p in twin.parameters() if p.requires_grad])

    torch.manual_seed(1)
    train(twin, twin_optimizer, steps, arch.seed)
    expected_rng = torch.get_rng_state()
    before = hook_state(model, optimizer)
    torch.manual_seed(1)
    with gradwatch(model, on_alert="ignore", **EVERY_STEP):
        train(model, optimizer, steps, arch.seed)

    assert_same(snapshot(model, optimizer), snapshot(twin, twin_optimizer))
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert hook_state(model, optimizer) == before


FAILURES = ("forward", "backward", "step", "interrupt")


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@PROPERTY_SETTINGS
@given(
    arch=architectures(),
    where=st.sampled_from(FAILURES),
    fail_at=st.integers(0, 4),
)
def test_hooks_removed_on_any_exception(arch, where, fail_at):
    model = Net(arch)
    if not has_trainable(model):
        return
    optimizer = OPTIMIZERS["adam"]([p for p in model.parameters() if p.requires_grad])
    calls = {"count": 0}
    error = KeyboardInterrupt if where == "interrupt" else ValueError

    def fail(*_):
        calls["count"] += 1
        if calls["count"] > fail_at:
            raise error(where)

    # The user's failing hook sits on the part the failure is about; it is
    # registered before the session, so removal must leave it in place.
    if where == "forward":
        model.head.register_forward_hook(fail)
    elif where == "backward":
        model.head.register_full_backward_hook(fail)
    elif where == "step":
        optimizer.register_step_pre_hook(fail)
    before = hook_state(model, optimizer)

    def train_in_session():
        with gradwatch(model, on_alert="ignore", **EVERY_STEP):
            for _ in range(fail_at + 1):
                train(model, optimizer, 1, arch.seed)
                if where == "interrupt":
                    fail()

    with pytest.raises(error, match=where):
        train_in_session()

    assert hook_state(model, optimizer) == before


@settings(PROPERTY_SETTINGS, max_examples=8)
@given(arch=architectures(), steps=st.integers(1, 4))
def test_session_keeps_no_model_alive(arch, steps):
    model = Net(arch)
    if not has_trainable(model):
        return
    optimizer = OPTIMIZERS["sgd"]([p for p in model.parameters() if p.requires_grad])
    with gradwatch(model, on_alert="ignore", **EVERY_STEP) as gw:
        train(model, optimizer, steps, arch.seed)
    reference = weakref.ref(model)
    del model, optimizer
    gc.collect()

    assert reference() is None
    assert gw.step == steps


# gc.collect() at every step makes each draw slow: fewer draws.
@settings(PROPERTY_SETTINGS, max_examples=6)
@given(arch=architectures(), steps=st.integers(2, 4))
def test_gradients_freed_after_zero_grad(arch, steps):
    model = Net(arch)
    if not has_trainable(model):
        return
    optimizer = OPTIMIZERS["momentum"](
        [p for p in model.parameters() if p.requires_grad]
    )
    generator = torch.Generator().manual_seed(arch.seed)
    with gradwatch(model, on_alert="ignore", **EVERY_STEP):
        for _ in range(steps):
            x = torch.randn(6, 5, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            optimizer.step()
            grads = [
                weakref.ref(p.grad) for p in model.parameters() if p.grad is not None
            ]
            optimizer.zero_grad(set_to_none=True)
            gc.collect()

            # The gradients of a finished step belong to the user: once the
            # user drops them, nothing in the session may keep them alive.
            assert [ref() for ref in grads] == [None] * len(grads)


# Sessions side by side


def make_net(seed, tied=False):
    arch = Architecture(
        widths=(6, 6),
        activations=("relu", "tanh"),
        branch=True,
        tied=tied,
        frozen=(False, False, False),
        dropout=False,
        seed=seed,
    )
    return Net(arch)


def test_nested_sessions_keep_training_identical():
    model = make_net(0, tied=True)
    twin = copy.deepcopy(model)
    optimizer = OPTIMIZERS["adam"](model.parameters())
    twin_optimizer = OPTIMIZERS["adam"](twin.parameters())
    train(twin, twin_optimizer, 3, 0)
    train(twin, twin_optimizer, 5, 1)
    before = hook_state(model, optimizer)

    with gradwatch(model, on_alert="ignore", **EVERY_STEP) as outer:
        train(model, optimizer, 3, 0)
        with gradwatch(model, on_alert="ignore") as inner:
            train(model, optimizer, 5, 1)

    assert_same(snapshot(model, optimizer), snapshot(twin, twin_optimizer))
    assert outer.step == 8
    assert inner.step == 5
    assert hook_state(model, optimizer) == before


def test_two_sessions_on_two_models():
    first, second = make_net(1), make_net(2)
    second.spare = nn.Linear(6, 6)
    first_optimizer = OPTIMIZERS["sgd"](first.parameters())
    second_optimizer = OPTIMIZERS["adam"](second.parameters())

    with (
        gradwatch(first, on_alert="ignore") as gw_first,
        gradwatch(second, on_alert="ignore") as gw_second,
    ):
        for step in range(6):
            train(first, first_optimizer, 1, step)
            train(second, second_optimizer, 1, step)
        train(second, second_optimizer, 2, 9)

    assert gw_first.step == 6
    assert gw_second.step == 8
    assert gw_first.alerts == []
    assert {a.param for a in gw_second.alerts} == {"spare.weight", "spare.bias"}
