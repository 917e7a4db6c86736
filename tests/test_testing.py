"""gradwatch.testing: assert_gradients_flow and the helpers the plugin shares."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import optimizer as optimizer_module

from gradwatch import Alert
from gradwatch.testing import (
    assert_gradients_flow,
    check_severity,
    failing_alerts,
    failure_message,
)


class Net(nn.Module):
    """Two layers and a gate; ``fault`` cuts fc1 off or multiplies the gate by 0."""

    def __init__(self, fault: str = "none") -> None:
        super().__init__()
        self.fault = fault
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 1)
        self.gate = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        if self.fault == "detach":
            h = h.detach()
        scale = 0.0 if self.fault == "zero-gate" else 1.0
        return self.fc2(h) + scale * self.gate(x)


def make_step(model: nn.Module, use_optimizer: bool = True):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=generator)
    y = torch.randn(8, 1, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def step_fn(step: int) -> None:
        seen.append(step)
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        if use_optimizer:
            optimizer.step()

    step_fn.seen = seen
    return step_fn


def test_healthy_model_passes():
    model = Net()
    step_fn = make_step(model)

    session = assert_gradients_flow(model, step_fn, steps=4)

    assert session.alerts == []
    assert session.step == 4
    assert step_fn.seen == [0, 1, 2, 3]


def test_detached_layer_raises_report():
    model = Net("detach")

    with pytest.raises(AssertionError) as raised:
        assert_gradients_flow(model, make_step(model), on_alert="ignore")

    text = str(raised.value)
    assert text.startswith("gradwatch found 3 alert(s) of severity error.")
    assert "[error] unused_parameter `fc1.weight` (steps 0-2)" in text
    assert "[error] graph_cut `<root>`" in text
    assert "Keep the computation in torch tensors" in text


def test_steps_without_optimizer_counted():
    model = Net("detach")
    step_fn = make_step(model, use_optimizer=False)

    with pytest.raises(AssertionError, match="unused_parameter"):
        assert_gradients_flow(model, step_fn, steps=3, on_alert="ignore")
    assert step_fn.seen == [0, 1, 2]


def test_healthy_without_optimizer_passes():
    model = Net()

    session = assert_gradients_flow(model, make_step(model, use_optimizer=False))

    assert session.alerts == []
    assert session.step == 3


def test_warning_passes_by_default():
    model = Net("zero-gate")

    session = assert_gradients_flow(model, make_step(model), on_alert="ignore")

    assert {a.severity for a in session.alerts} == {"warning"}
    assert "zero_gradient" in {a.check for a in session.alerts}


def test_warning_fails_at_warning_severity():
    model = Net("zero-gate")

    with pytest.raises(AssertionError) as raised:
        assert_gradients_flow(
            model, make_step(model), severity="warning", on_alert="ignore"
        )

    text = str(raised.value)
    assert "of severity warning or more serious" in text
    assert "zero_gradient `gate.weight`" in text


def test_options_reach_session():
    model = Net("detach")

    session = assert_gradients_flow(
        model, make_step(model), checks=["not_in_optimizer"], patience=2
    )

    assert session.options.checks == ("not_in_optimizer",)
    assert session.options.patience == 2
    assert session.alerts == []


def test_hooks_removed_after_failure():
    model = Net("detach")

    with pytest.raises(AssertionError):
        assert_gradients_flow(model, make_step(model), on_alert="ignore")

    assert not model._forward_pre_hooks
    assert not model._forward_hooks
    assert not model.fc1._forward_hooks
    assert not optimizer_module._global_optimizer_pre_hooks
    assert not optimizer_module._global_optimizer_post_hooks


def test_step_fn_error_propagates_and_cleans_up():
    model = Net()

    def step_fn(step: int) -> None:
        model(torch.zeros(2, 4)).sum().backward()
        raise KeyError("broken loader")

    with pytest.raises(KeyError, match="broken loader"):
        assert_gradients_flow(model, step_fn)
    assert not model._forward_pre_hooks
    assert not optimizer_module._global_optimizer_post_hooks


@pytest.mark.parametrize("steps", [0, 2, 2.5, True, "3"])
def test_rejects_steps_below_patience(steps):
    model = Net()

    with pytest.raises(ValueError, match=r"steps must be an int >= patience \(3\)"):
        assert_gradients_flow(model, make_step(model), steps=steps)


def test_steps_checked_against_given_patience():
    model = Net()

    with pytest.raises(ValueError, match=r">= patience \(5\), got 4"):
        assert_gradients_flow(model, make_step(model), steps=4, patience=5)


def test_rejects_bad_severity():
    model = Net()

    with pytest.raises(ValueError, match="severity must be one of 'error'"):
        assert_gradients_flow(model, make_step(model), severity="fatal")


def test_rejects_bad_option():
    model = Net()

    with pytest.raises(ValueError, match="unknown check id"):
        assert_gradients_flow(model, make_step(model), checks=["graph_cuts"])


# The shared helpers


def alert(severity: str, check: str = "zero_gradient") -> Alert:
    return Alert(check, severity, step=0, param="w", module="", message="m")


@pytest.mark.parametrize(
    ("severity", "expected"),
    [
        ("error", ["error"]),
        ("warning", ["error", "warning"]),
        ("info", ["error", "warning", "info"]),
    ],
)
def test_failing_alerts_by_threshold(severity, expected):
    alerts = [alert("info"), alert("warning"), alert("error")]

    selected = failing_alerts(alerts, severity)

    assert sorted(a.severity for a in selected) == sorted(expected)


def test_check_severity_names_source():
    with pytest.raises(ValueError, match=r"^--my-flag must be one of .*got 'loud'"):
        check_severity("loud", "--my-flag")


def test_failure_message_none_when_clean():
    model = Net()
    session = assert_gradients_flow(model, make_step(model))

    assert failure_message([session]) is None
    assert failure_message([session], "info") is None
