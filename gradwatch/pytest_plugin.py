"""pytest plugin: the ``gradwatch`` fixture, the ``gradwatch`` marker and options.

pytest loads this module through the ``pytest11`` entry point once gradwatch is
installed; ``import gradwatch`` never imports pytest.

The fixture returns a factory. Each call ``gradwatch(model, **options)`` builds a
session, enters it and returns it; the loop under test then runs unchanged::

    def test_model_trains(gradwatch):
        model = MyModel()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        gw = gradwatch(model)
        for _ in range(3):
            optimizer.zero_grad()
            model(x).sum().backward()
            optimizer.step()

When the test function returns, every session is exited. The test fails if an
alert of the failing severity (``"error"`` by default) was raised, with the
session's report as the failure text. Warning-severity alerts that do not fail
the test are listed in one :class:`GradwatchWarning`. Sessions built here
default to ``on_alert="ignore"``, so alerts are not also logged and warned one
by one; pass ``on_alert=`` to change that. A session can also be used as
``with gradwatch(model) as gw:`` to end it inside the test and assert on
``gw.alerts``; it is then judged the same way. Hooks are removed at teardown
whatever happened.

Settings, from the most to the least specific: keyword arguments of the call,
``@pytest.mark.gradwatch(...)``, command-line options, ini keys.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from gradwatch.alerts import SEVERITIES, Alert, Severity
from gradwatch.config import Options
from gradwatch.errors import GradwatchWarning
from gradwatch.session import Session, StepIndex
from gradwatch.session import gradwatch as build_session
from gradwatch.testing import check_severity, failure_message

__all__ = ["MARKER_KEYWORDS", "SessionFactory", "WatchedSession"]

#: Keywords ``@pytest.mark.gradwatch(...)`` accepts.
MARKER_KEYWORDS = ("checks", "severity", "patience", "ignore")

_MARKER_LINE = (
    "gradwatch(checks=None, severity='error', patience=3, ignore=()): options of "
    "the gradwatch fixture for this test. checks: check ids to run (all when "
    "None); severity: lowest alert severity that fails the test ('error', "
    "'warning' or 'info'); patience: steps a finding must hold before it is "
    "reported; ignore: glob patterns of parameter or module names not to watch."
)


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Options from the command line and ini file, validated once per run."""

    severity: Severity = "error"
    patience: int | None = None
    checks: tuple[str, ...] | None = None
    logdir: Path | None = None

    def describe(self) -> str:
        checks = ",".join(self.checks) if self.checks else "all"
        patience = self.patience if self.patience is not None else "default"
        logdir = self.logdir if self.logdir is not None else "none"
        return (
            f"gradwatch: tests fail on alerts of severity {_threshold(self.severity)}; "
            f"patience={patience}, checks={checks}, logdir={logdir}"
        )


def _threshold(severity: Severity) -> str:
    return "error" if severity == "error" else f"{severity} or more serious"


_SETTINGS_KEY = pytest.StashKey[_Settings]()
_FACTORY_KEY = pytest.StashKey["SessionFactory"]()


# Options and ini keys


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradwatch", "gradwatch: fail tests whose gradients stop")
    group.addoption(
        "--gradwatch-severity",
        choices=SEVERITIES,
        default=None,
        help="lowest alert severity that fails a test using the gradwatch fixture "
        "(default: error; ini: gradwatch_severity)",
    )
    group.addoption(
        "--gradwatch-strict",
        action="store_true",
        default=None,
        help="fail tests on warning-severity alerts too, the same as "
        "--gradwatch-severity=warning (ini: gradwatch_strict)",
    )
    group.addoption(
        "--gradwatch-patience",
        default=None,
        metavar="STEPS",
        help="number of steps a finding must hold before it is reported "
        "(default: gradwatch's own, 3; ini: gradwatch_patience)",
    )
    group.addoption(
        "--gradwatch-checks",
        default=None,
        metavar="IDS",
        help="comma-separated check ids to run, such as "
        "unused_parameter,graph_cut (default: all; ini: gradwatch_checks)",
    )
    group.addoption(
        "--gradwatch-logdir",
        default=None,
        metavar="DIR",
        help="directory for TensorBoard event files, one subdirectory per test "
        "named after its node id; files of earlier runs are kept (default: none "
        "written; ini: gradwatch_logdir)",
    )
    parser.addini(
        "gradwatch_severity", "lowest alert severity that fails a test", default=""
    )
    parser.addini(
        "gradwatch_strict", "fail tests on warnings too", type="bool", default=False
    )
    parser.addini("gradwatch_patience", "steps a finding must hold", default="")
    parser.addini("gradwatch_checks", "comma-separated check ids to run", default="")
    parser.addini(
        "gradwatch_logdir", "directory for TensorBoard event files", default=""
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _MARKER_LINE)
    config.stash[_SETTINGS_KEY] = _read_settings(config)


def pytest_report_header(config: pytest.Config) -> str:
    return config.stash[_SETTINGS_KEY].describe()


def _setting(config: pytest.Config, name: str) -> tuple[Any, str]:
    """Return the value of setting ``name`` and where it came from."""
    value = config.getoption(f"gradwatch_{name}")
    if value is not None:
        return value, f"--gradwatch-{name}"
    return config.getini(f"gradwatch_{name}"), f"ini key gradwatch_{name}"


def _read_settings(config: pytest.Config) -> _Settings:
    severity, source = _setting(config, "severity")
    try:
        severity = check_severity(severity or "error", source)
    except ValueError as err:
        raise pytest.UsageError(str(err)) from err
    if _setting(config, "strict")[0] and severity == "error":
        severity = "warning"

    patience, source = _setting(config, "patience")
    patience = _parse_patience(patience, source) if patience not in ("", None) else None
    checks, source = _setting(config, "checks")
    checks = _parse_checks(checks, source) if checks else None
    logdir = _setting(config, "logdir")[0]
    return _Settings(severity, patience, checks, Path(logdir) if logdir else None)


def _parse_patience(text: str, source: str) -> int:
    try:
        patience = int(text)
        Options(patience=patience)
    except ValueError as err:
        msg = f"{source}: patience must be an int >= 1 (steps), got {text!r}"
        raise pytest.UsageError(msg) from err
    return patience


def _parse_checks(text: str, source: str) -> tuple[str, ...]:
    checks = tuple(c for c in re.split(r"[\s,]+", text) if c)
    try:
        Options(checks=checks)
    except ValueError as err:
        raise pytest.UsageError(f"{source}: {err}") from err
    return checks


# The marker


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("gradwatch")
    if marker is not None:
        _marker_options(marker)


def _marker_options(marker: pytest.Mark) -> dict[str, Any]:
    """Return the validated keywords of ``marker``; fail the test if one is invalid."""
    where = "@pytest.mark.gradwatch"
    valid = ", ".join(MARKER_KEYWORDS)
    if marker.args:
        pytest.fail(
            f"{where} takes keyword arguments only ({valid}), got positional "
            f"arguments {marker.args!r}",
            pytrace=False,
        )
    unknown = sorted(set(marker.kwargs) - set(MARKER_KEYWORDS))
    if unknown:
        pytest.fail(
            f"{where} got unknown keyword(s) {', '.join(unknown)}; valid keywords "
            f"are: {valid}",
            pytrace=False,
        )

    options = dict(marker.kwargs)
    try:
        if "severity" in options:
            check_severity(options["severity"], f"{where}(severity=...)")
        Options(**{k: v for k, v in options.items() if k != "severity"})
    except (ValueError, TypeError) as err:
        pytest.fail(f"{where}: {err}", pytrace=False)
    return options


# The fixture


class WatchedSession:
    """A session the ``gradwatch`` fixture entered; it exits at the end of the test.

    It offers the public API of :class:`gradwatch.Session` (``alerts``,
    ``report()``, ``step``, ``options``); the session itself is ``.session``.
    ``with`` ends the session at the end of the block, so a test can assert on
    the final alerts inside it.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self._open = True

    @property
    def alerts(self) -> list[Alert]:
        """The alerts so far, in the order of the step they were first seen."""
        return self.session.alerts

    @property
    def step(self) -> StepIndex:
        """The index of the current step; ``gw.step()`` ends it."""
        return self.session.step

    @property
    def options(self) -> Options:
        """The validated options of the session."""
        return self.session.options

    @property
    def closed(self) -> bool:
        """True once the session has exited and its hooks are removed."""
        return not self._open

    def report(self) -> str:
        """Return the session's summary of every alert."""
        return self.session.report()

    def close(self, error: BaseException | None = None) -> None:
        """Exit the session once; ``error`` is the exception the test raised.

        With an error, the pending step is not analysed, as when an exception
        leaves a ``with gradwatch(...)`` block.
        """
        if not self._open:
            return
        self._open = False
        if error is None:
            self.session.__exit__(None, None, None)
        else:
            self.session.__exit__(type(error), error, error.__traceback__)

    def __enter__(self) -> WatchedSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(exc)


class SessionFactory:
    """The value of the ``gradwatch`` fixture: builds and enters sessions."""

    def __init__(self, item: pytest.Item, settings: _Settings) -> None:
        self._item = item
        self._settings = settings
        marker = item.get_closest_marker("gradwatch")
        self._marker = _marker_options(marker) if marker is not None else {}
        self.severity: Severity = self._marker.get("severity", settings.severity)
        self.sessions: list[WatchedSession] = []
        self.judged = False

    def __call__(self, model: Any, **options: Any) -> WatchedSession:
        """Build a session on ``model``, enter it and return it.

        Args:
            model: The module to watch.
            **options: Options of :func:`gradwatch.gradwatch`; they take
                precedence over the marker and the command line.
        """
        merged = {"on_alert": "ignore", **self._defaults(), **options}
        session = build_session(model, **merged)
        session.__enter__()
        watched = WatchedSession(session)
        self.sessions.append(watched)
        return watched

    def _defaults(self) -> dict[str, Any]:
        settings = self._settings
        defaults: dict[str, Any] = {}
        if settings.patience is not None:
            defaults["patience"] = settings.patience
        if settings.checks is not None:
            defaults["checks"] = settings.checks
        if settings.logdir is not None:
            defaults["logdir"] = self._logdir(settings.logdir)
        defaults.update((k, v) for k, v in self._marker.items() if k != "severity")
        return defaults

    def _logdir(self, root: Path) -> Path:
        parts = [
            re.sub(r"[^\w.\-\[\]]+", "_", p) for p in self._item.nodeid.split("::")
        ]
        path = root.joinpath(*parts)
        if self.sessions:
            path = path / f"session-{len(self.sessions) + 1}"
        return path

    def close(self, error: BaseException | None = None) -> None:
        """Exit every open session, the latest first, even if one exit raises."""
        first: BaseException | None = None
        for watched in reversed(self.sessions):
            try:
                watched.close(error)
            except BaseException as err:
                first = first or err
        if first is not None:
            raise first

    def failure(self) -> str | None:
        """Return the failure text once, if an alert of the failing severity fired."""
        if self.judged:
            return None
        self.judged = True
        where = f" in {self._item.nodeid}"
        return failure_message([w.session for w in self.sessions], self.severity, where)


@pytest.fixture(name="gradwatch")
def gradwatch_fixture(request: pytest.FixtureRequest) -> Iterator[SessionFactory]:
    """Build sessions with ``gradwatch(model, **options)``; judge them at the end.

    The test fails if any session raised an alert of the failing severity
    (``"error"`` unless the marker, ``--gradwatch-severity`` or
    ``--gradwatch-strict`` set another). Every session is exited at teardown,
    so its hooks are removed whatever the test did.
    """
    settings = request.config.stash[_SETTINGS_KEY]
    factory = SessionFactory(request.node, settings)
    request.node.stash[_FACTORY_KEY] = factory
    try:
        yield factory
    finally:
        del request.node.stash[_FACTORY_KEY]
        factory.close()
    message = factory.failure()
    if message is not None:
        pytest.fail(message, pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Exit the test's sessions right after its body, so findings fail the test.

    Judging here, in place of the fixture teardown, reports a failing test and
    not an error in teardown; ``xfail`` markers apply to it as usual.
    """
    try:
        result = yield
    except BaseException as err:
        factory = item.stash.get(_FACTORY_KEY, None)
        if factory is not None:
            factory.close(err)
            factory.judged = True
            for index, watched in enumerate(factory.sessions):
                item.add_report_section(
                    "call", f"gradwatch session {index + 1}", watched.report()
                )
        raise

    factory = item.stash.get(_FACTORY_KEY, None)
    if factory is not None:
        factory.close()
        message = factory.failure()
        if message is not None:
            pytest.fail(message, pytrace=False)
        _warn_below_threshold(factory)
    return result


def _warn_below_threshold(factory: SessionFactory) -> None:
    """Issue one warning for the warning-severity alerts that did not fail the test."""
    if factory.severity != "error":
        return
    alerts = [
        alert
        for watched in factory.sessions
        for alert in watched.alerts
        if alert.severity == "warning"
    ]
    if alerts:
        lines = [f"gradwatch raised {len(alerts)} warning(s); they fail the test "]
        lines[0] += "under --gradwatch-strict:"
        lines.extend(f"  {alert}" for alert in alerts)
        warnings.warn("\n".join(lines), GradwatchWarning, stacklevel=1)
