"""The session: options, alert policies, steps, hook removal, observation only."""

from __future__ import annotations

import copy
import gc
import logging
import weakref

import pytest
import torch
from torch import nn

from gradwatch import (
    Alert,
    DisconnectWarning,
    GradwatchError,
    GradwatchWarning,
    gradwatch,
)


class WithSpare(nn.Sequential):
    """A Sequential plus a layer that forward never calls."""

    def __init__(self, *layers):
        super().__init__(*layers)
        self.spare = nn.Linear(2, 2)

    def forward(self, x):
        for layer in list(self)[:-1]:
            x = layer(x)
        return x


def make_model(spare=False):
    torch.manual_seed(0)
    layers = (nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2))
    return WithSpare(*layers) if spare else nn.Sequential(*layers)


def run(model, optimizer, steps=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()


def hook_state(model):
    """Every hook dict of every module and parameter, by name, as key lists."""
    state = {}
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr.endswith("hooks") or attr.endswith("hooks_with_kwargs"):
                state[(name, attr)] = list(value)
    for name, param in model.named_parameters():
        hooks = getattr(param, "_post_accumulate_grad_hooks", None)
        state[(name, "post_accumulate")] = list(hooks or {})
        state[(name, "backward")] = list(param._backward_hooks or {})
    return state


# Options


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("on_alert", "shout", "'warn', 'raise', 'ignore'"),
        ("patience", 0, "patience must be an int >= 1"),
        ("patience", 2.5, "patience must be an int >= 1"),
        ("checks", ["unused", "graph_cut"], "unknown check id"),
        ("zero_tol", 2.0, "zero_tol must be a float in (0, 1)"),
        ("ignore", [3], "glob patterns"),
        ("log_every", 0, "log_every must be an int >= 1"),
    ],
)
def test_invalid_option_raises_value_error(option, value, expected):
    with pytest.raises(
        ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")
    ):
        gradwatch(make_model(), **{option: value})


def test_non_module_raises_type_error():
    with pytest.raises(TypeError, match="takes a torch.nn.Module, got dict"):
        gradwatch({"weight": torch.ones(2)})


def test_module_class_raises_with_hint():
    with pytest.raises(TypeError, match=r"instantiate it first: gradwatch\(Linear"):
        gradwatch(nn.Linear)


def test_logdir_that_is_a_file_raises(tmp_path):
    path = tmp_path / "events"
    path.write_text("not a directory")
    with pytest.raises(ValueError, match="is a file"):
        gradwatch(make_model(), logdir=path)


def test_model_without_trainable_parameters_warns():
    model = make_model().requires_grad_(False)
    with pytest.warns(GradwatchWarning, match="no trainable parameters"):
        gradwatch(model)


def test_meta_parameters_raise():
    with torch.device("meta"):
        model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="meta device"):
        gradwatch(model)


def test_session_enters_only_once():
    session = gradwatch(make_model())
    with session:
        pass
    with pytest.raises(RuntimeError, match="entered only once"), session:
        pass


# Alert policies


def test_warn_policy_warns_and_logs(caplog):
    model = make_model(spare=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    caplog.set_level(logging.WARNING, logger="gradwatch")
    with (
        pytest.warns(DisconnectWarning, match="spare.weight") as record,
        gradwatch(model),
    ):
        run(model, optimizer)

    assert record[0].filename == __file__
    assert any("unused_parameter" in r.message for r in caplog.records)


def test_raise_policy_raises_at_first_error_and_cleans_up():
    model = make_model(spare=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = hook_state(model)
    session = gradwatch(model, on_alert="raise")
    with pytest.raises(GradwatchError, match="unused_parameter") as info, session:
        run(model, optimizer, steps=10)

    assert isinstance(info.value.alert, Alert)
    assert info.value.alert.param in ("spare.weight", "spare.bias")
    assert hook_state(model) == before


def test_callable_policy_receives_each_new_alert_once():
    model = make_model(spare=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    with gradwatch(model, on_alert=seen.append):
        run(model, optimizer, steps=10)

    assert sorted(a.param for a in seen) == ["spare.bias", "spare.weight"]


def test_checks_option_limits_alerts():
    model = make_model(spare=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch(model, on_alert="ignore", checks=["zero_gradient"]) as gw:
        run(model, optimizer)

    assert gw.alerts == []


def test_report_names_parameter_step_and_fix():
    model = make_model(spare=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch(model, on_alert="ignore") as gw:
        run(model, optimizer)

    report = gw.report()
    assert "5 step(s), 6 parameter tensor(s) watched, 2 alert(s): 2 error" in report
    assert "[error] unused_parameter `spare.weight` (steps 0-4)" in report
    assert "never called in forward" in report


def test_report_without_alerts():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch(model) as gw:
        run(model, optimizer)

    assert gw.report().endswith("no alerts.")


# Steps


def test_step_counts_optimizer_steps():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch(model) as gw:
        assert gw.step == 0
        run(model, optimizer, steps=3)
        assert gw.step == 3

    assert int(gw.step) == 3


def test_optimizer_of_another_model_does_not_count():
    model, other = make_model(), make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    with gradwatch(model) as gw:
        run(other, other_optimizer, steps=2)
        run(model, optimizer, steps=3)

    assert gw.step == 3


def test_other_optimizer_counts_once_it_holds_the_model():
    model, other = make_model(), make_model()
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    with gradwatch(model) as gw:
        run(other, other_optimizer, steps=2)
        other_optimizer.add_param_group({"params": list(model.parameters())})
        run(model, other_optimizer, steps=3)

    assert gw.step == 3


def test_gradient_accumulation_makes_one_step():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(3):
            optimizer.zero_grad()
            for _ in range(4):
                model(torch.randn(4, 4)).square().mean().backward()
            optimizer.step()

    assert gw.step == 3
    assert gw.alerts == []


def test_forward_after_backward_ends_step_without_optimizer():
    model = make_model(spare=True)
    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(4):
            model.zero_grad()
            model(torch.randn(4, 4)).square().mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p -= 0.1 * p.grad

    assert gw.step == 4
    assert sorted(a.param for a in gw.alerts) == ["spare.bias", "spare.weight"]


def test_explicit_step_call_ends_step():
    model = make_model()
    with gradwatch(model) as gw:
        model(torch.randn(4, 4)).sum().backward()
        gw.step()
        assert gw.step == 1

    with pytest.raises(RuntimeError, match="inside the `with gradwatch"):
        gw.step()


def test_single_backward_is_analysed_on_exit():
    model = make_model(spare=True)
    with gradwatch(model, on_alert="ignore") as gw:
        model(torch.randn(4, 4)).sum().backward()

    assert gw.step == 1
    assert sorted(a.param for a in gw.alerts) == ["spare.bias", "spare.weight"]


# Hooks and references


def test_hooks_removed_after_exit():
    model = make_model(spare=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = hook_state(model)
    with gradwatch(model, on_alert="ignore"):
        run(model, optimizer)
        assert hook_state(model) != before

    assert hook_state(model) == before


@pytest.mark.parametrize("where", ["forward", "backward", "step", "interrupt"])
def test_hooks_removed_after_exception(where):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = hook_state(model)
    error = KeyboardInterrupt if where == "interrupt" else ValueError

    def fail(*_):
        raise error(where)

    if where == "forward":
        model[1].register_forward_hook(fail)
    elif where == "backward":
        model[0].weight.register_hook(fail)
    elif where == "step":
        optimizer.register_step_pre_hook(fail)
    before = hook_state(model)

    def train_in_session():
        with gradwatch(model):
            run(model, optimizer)
            if where == "interrupt":
                raise KeyboardInterrupt(where)

    with pytest.raises(error, match=where):
        train_in_session()

    assert hook_state(model) == before


def test_user_hooks_keep_their_order():
    model = make_model()
    calls = []
    model[0].register_forward_hook(lambda *_: calls.append("before"))
    with gradwatch(model):
        model[0].register_forward_hook(lambda *_: calls.append("after"))
        model(torch.randn(2, 4))

    assert calls == ["before", "after"]


def test_model_collectable_after_exit():
    model = make_model(spare=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch(model, on_alert="ignore") as gw:
        run(model, optimizer)
    reference = weakref.ref(model)
    del model, optimizer
    gc.collect()

    assert reference() is None
    assert len(gw.alerts) == 2


def test_nested_sessions_on_one_model():
    model = make_model(spare=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = hook_state(model)
    with gradwatch(model, on_alert="ignore") as outer:
        with gradwatch(model, on_alert="ignore") as inner:
            run(model, optimizer)
        run(model, optimizer)

    assert len(inner.alerts) == 2
    assert outer.step == 10
    assert hook_state(model) == before


# Observation only


def test_training_is_bitwise_identical():
    model = make_model()
    twin = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-2)

    torch.manual_seed(1)
    run(twin, twin_optimizer, steps=20)
    twin_rng = torch.get_rng_state()
    torch.manual_seed(1)
    with gradwatch(model, histogram_every=1, log_every=1):
        run(model, optimizer, steps=20)

    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(torch.get_rng_state(), twin_rng)


def test_alert_book_escalates_severity():
    from gradwatch.alerts import AlertBook

    book = AlertBook()
    info = Alert("mask_leak", "info", 2, "w", "m", "expected leak")
    error = Alert("mask_leak", "error", 5, "w", "m", "leak at a forward")

    assert book.record(info) is True
    assert book.record(error) is True
    assert book.record(info) is False
    (stored,) = book.as_list()
    assert stored.severity == "error"
    assert stored.message == "leak at a forward"
    assert stored.step == 2
    assert stored.last_step == 5
    assert stored.count == 3
