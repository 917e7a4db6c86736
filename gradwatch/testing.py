"""Assertions for test suites: fail a test when gradients stop reaching parameters.

Works with any test runner; nothing here imports pytest. The pytest plugin
(:mod:`gradwatch.pytest_plugin`) builds its fixture on the same functions.

Example::

    from gradwatch.testing import assert_gradients_flow

    def test_model_learns_everywhere():
        model = MyModel()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(8, 16), torch.randn(8, 1)

        def step_fn(step):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()

        assert_gradients_flow(model, step_fn, steps=3)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from gradwatch.alerts import SEVERITIES, Alert, Severity
from gradwatch.session import Session, gradwatch

__all__ = [
    "assert_gradients_flow",
    "check_severity",
    "failing_alerts",
    "failure_message",
]


def check_severity(severity: object, source: str = "severity") -> Severity:
    """Return ``severity`` if it is a valid alert severity, else raise ValueError.

    Args:
        severity: The value to check.
        source: Where the value came from, named in the error message.
    """
    if severity not in SEVERITIES:
        valid = ", ".join(repr(s) for s in SEVERITIES)
        msg = f"{source} must be one of {valid}, got {severity!r}"
        raise ValueError(msg)
    return severity  # type: ignore[return-value]


def failing_alerts(
    alerts: Iterable[Alert], severity: Severity = "error"
) -> list[Alert]:
    """Return the alerts whose severity is ``severity`` or more serious.

    The order of seriousness is ``"error"`` > ``"warning"`` > ``"info"``, so
    ``severity="warning"`` selects errors and warnings.
    """
    check_severity(severity)
    limit = SEVERITIES.index(severity)
    return [a for a in alerts if SEVERITIES.index(a.severity) <= limit]


def failure_message(
    sessions: Iterable[Session], severity: Severity = "error", where: str = ""
) -> str | None:
    """Return the failure text for ``sessions``, or None if none has a failing alert.

    The text names the number of failing alerts and the threshold, then gives
    each session's report (what, where, when and how to fix).

    Args:
        sessions: Sessions that have run, usually already exited.
        severity: The lowest severity that counts as a failure.
        where: Words appended to the first line, such as ``" in test_x"``.
    """
    sessions = list(sessions)
    failing = [len(failing_alerts(s.alerts, severity)) for s in sessions]
    total = sum(failing)
    if not total:
        return None

    threshold = "error" if severity == "error" else f"{severity} or more serious"
    lines = [f"gradwatch found {total} alert(s) of severity {threshold}{where}."]
    for index, (session, count) in enumerate(zip(sessions, failing, strict=True)):
        if not count:
            continue
        if len(sessions) > 1:
            lines.append(f"\nSession {index + 1} of {len(sessions)}:")
        lines.append(session.report())
    return "\n".join(lines)


def assert_gradients_flow(
    model: nn.Module,
    step_fn: Callable[[int], Any],
    steps: int = 3,
    *,
    severity: Severity = "error",
    **options: Any,
) -> Session:
    """Run ``steps`` training steps under gradwatch; fail if an alert fires.

    ``step_fn(step)`` runs one training step (forward, backward and usually
    ``optimizer.step()``) and gets the step index, 0 to ``steps - 1``. When a
    call does not step an optimizer of the model's parameters, the step
    is ended explicitly, so every call counts as one step.

    Args:
        model: The module whose parameters should receive gradients.
        step_fn: Called once per step with the step index.
        steps: Number of steps to run. Must be at least the session's
            ``patience`` (3 by default), because a finding is reported only once
            it has held for ``patience`` steps.
        severity: The lowest alert severity that fails the assertion:
            ``"error"`` (default), ``"warning"`` or ``"info"``.
        **options: Passed to :func:`gradwatch.gradwatch`, such as ``checks``,
            ``ignore``, ``patience`` or ``on_alert``.

    Returns:
        The exited session, for further asserts on ``session.alerts``.

    Raises:
        AssertionError: An alert of ``severity`` or more serious fired. The
            message is the session's report.
        ValueError: ``steps`` or ``severity`` is invalid, or an option is.
    """
    check_severity(severity)
    session = gradwatch(model, **options)
    patience = session.options.patience
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < patience:
        msg = (
            f"steps must be an int >= patience ({patience}), got {steps!r}; with "
            f"fewer steps no finding can hold long enough to be reported"
        )
        raise ValueError(msg)

    with session as gw:
        for step in range(steps):
            before = int(gw.step)
            step_fn(step)
            if int(gw.step) == before:
                gw.step()

    message = failure_message([session], severity)
    if message is not None:
        raise AssertionError(message)
    return session
