"""The pytest plugin, run on generated test files with pytester.

The inner runs load the plugin through the installed ``pytest11`` entry point,
as a user's suite does.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest_plugins = ["pytester"]

# A model with a switchable fault, and a few training steps, shared by every
# generated test file.
MODELS = """
import pytest
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, fault="none"):
        super().__init__()
        self.fault = fault
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 1)
        self.gate = nn.Linear(4, 1)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        if self.fault == "detach":
            h = h.detach()
        out = self.fc2(h)
        if self.fault == "zero-gate":
            out = out + 0.0 * self.gate(x)
        else:
            out = out + self.gate(x)
        return out


def train(model, steps=3):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=generator)
    y = torch.randn(8, 1, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
"""


@pytest.fixture(scope="module", autouse=True)
def _import_lazy_modules():
    """Import what torch imports lazily on the first optimizer or SummaryWriter.

    Inner runs drop the modules first imported while they ran, and torch rejects
    a second registration of the operators those modules register on import.
    Importing them here, once, also saves seconds per inner run.
    """
    import torch
    from torch.utils.tensorboard import SummaryWriter

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    assert SummaryWriter is not None


def make_tests(pytester: pytest.Pytester, body: str) -> None:
    pytester.makepyfile(test_model=MODELS + textwrap.dedent(body))


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # An inner run drops the modules it imported first, so each run would import
    # hypothesis again through its plugin (a second per run), and rewrite the
    # asserts of every plugin module it imports.
    return pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "--assert=plain", *args
    )


def test_detached_layer_fails_with_report(pytester):
    make_tests(
        pytester,
        """
        def test_detached(gradwatch):
            model = Net("detach")
            gradwatch(model)
            train(model)
        """,
    )
    result = run(pytester)

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*gradwatch found 3 alert(s) of severity error in "
            "test_model.py::test_detached.",
            "*[[]error] unused_parameter `fc1.bias` (steps 0-2)",
            "*[[]error] unused_parameter `fc1.weight` (steps 0-2)",
            "*[[]error] graph_cut `<root>` (step 2)",
            "*Keep the computation in torch tensors*",
        ]
    )
    assert "ERROR at teardown" not in result.stdout.str()


def test_fixed_twin_passes(pytester):
    make_tests(
        pytester,
        """
        def test_healthy(gradwatch):
            model = Net()
            gw = gradwatch(model)
            train(model)
            assert gw.step == 3
        """,
    )
    result = run(pytester, "-W", "error::UserWarning")

    result.assert_outcomes(passed=1)


def test_with_block_ends_session(pytester):
    make_tests(
        pytester,
        """
        def test_inspect(gradwatch):
            model = Net("detach")
            with gradwatch(model) as gw:
                train(model)
            assert gw.closed
            assert {a.check for a in gw.alerts} == {"unused_parameter", "graph_cut"}

        def test_healthy(gradwatch):
            model = Net()
            with gradwatch(model) as gw:
                train(model)
            assert gw.alerts == []
        """,
    )
    result = run(pytester)

    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_model.py::test_inspect - Failed: *"])


def test_hooks_removed_after_each_test(pytester):
    make_tests(
        pytester,
        """
        from torch.optim import optimizer as optim_module

        models = {}

        def test_detached(gradwatch):
            models["detached"] = model = Net("detach")
            gradwatch(model)
            train(model)

        def test_raises(gradwatch):
            models["raising"] = model = Net()
            gradwatch(model)
            train(model, steps=1)
            raise KeyError("boom")

        def test_no_hooks_left():
            for model in models.values():
                assert not model._forward_pre_hooks
                assert not model._forward_hooks
                assert not model.fc1._forward_hooks
            assert not optim_module._global_optimizer_pre_hooks
            assert not optim_module._global_optimizer_post_hooks
        """,
    )
    result = run(pytester)

    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*KeyError: 'boom'", "*gradwatch session 1*"])


def test_exception_keeps_test_error(pytester):
    make_tests(
        pytester,
        """
        def test_raises(gradwatch):
            model = Net("detach")
            gradwatch(model)
            train(model)
            raise ValueError("the test's own failure")
        """,
    )
    result = run(pytester)

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*ValueError: the test's own failure",
            "*- Captured gradwatch session 1 call -*",
            "*unused_parameter*",
        ]
    )
    assert "gradwatch found" not in result.stdout.str()


def test_several_sessions_judged_together(pytester):
    make_tests(
        pytester,
        """
        def test_two(gradwatch):
            healthy, broken = Net(), Net("detach")
            gradwatch(healthy)
            train(healthy)
            gradwatch(broken)
            train(broken)
        """,
    )
    result = run(pytester)

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Session 2 of 2:*"])
    assert "Session 1 of 2" not in result.stdout.str()


def test_call_options_take_precedence(pytester):
    make_tests(
        pytester,
        """
        from gradwatch import GradwatchError

        @pytest.mark.gradwatch(patience=5)
        def test_raise_policy(gradwatch):
            model = Net("detach")
            gradwatch(model, on_alert="raise", patience=3)
            with pytest.raises(GradwatchError, match="unused_parameter"):
                train(model)
        """,
    )
    result = run(pytester)

    # The session also failed the test afterwards, because the alert is kept.
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*gradwatch found * alert(s) of severity error*"])


def test_warning_passes_with_summary(pytester):
    make_tests(
        pytester,
        """
        def test_zero_gate(gradwatch):
            model = Net("zero-gate")
            gradwatch(model)
            train(model)
        """,
    )
    result = run(pytester)

    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "*GradwatchWarning: gradwatch raised * warning(s)*",
            "*zero_gradient*gate*",
        ]
    )


def test_xfail_applies_to_findings(pytester):
    make_tests(
        pytester,
        """
        @pytest.mark.xfail(reason="known cut", strict=True)
        def test_detached(gradwatch):
            model = Net("detach")
            gradwatch(model)
            train(model)
        """,
    )
    result = run(pytester)

    result.assert_outcomes(xfailed=1)


# The marker

MARKED = """
@pytest.mark.gradwatch({options})
def test_marked(gradwatch):
    model = Net("{fault}")
    gradwatch(model)
    train(model)
"""


@pytest.mark.parametrize(
    ("options", "fault", "outcome"),
    [
        ("severity='warning'", "zero-gate", "failed"),
        ("severity='error'", "zero-gate", "passed"),
        ("checks=['not_in_optimizer']", "detach", "passed"),
        ("checks=['graph_cut']", "detach", "failed"),
        ("patience=5", "detach", "passed"),
    ],
)
def test_marker_sets_options(pytester, options, fault, outcome):
    make_tests(pytester, MARKED.format(options=options, fault=fault))
    result = run(pytester)

    result.assert_outcomes(**{outcome: 1})


def test_marker_ignore_hides_layer(pytester):
    make_tests(
        pytester,
        """
        @pytest.mark.gradwatch(ignore=["fc1.*"], checks=["unused_parameter"])
        def test_marked(gradwatch):
            model = Net("detach")
            gradwatch(model)
            train(model)
        """,
    )
    result = run(pytester)

    result.assert_outcomes(passed=1)


def test_marker_strict_severity_text(pytester):
    make_tests(pytester, MARKED.format(options="severity='warning'", fault="zero-gate"))
    result = run(pytester)

    result.stdout.fnmatch_lines(
        [
            "*gradwatch found * alert(s) of severity warning or more serious*",
            "*[[]warning] zero_gradient `gate.*`*",
        ]
    )


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            "patiense=5",
            "*@pytest.mark.gradwatch got unknown keyword(s) patiense; valid "
            "keywords are: checks, severity, patience, ignore",
        ),
        ("'error'", "*takes keyword arguments only (checks, severity, patience*"),
        (
            "severity='fatal'",
            "*severity=...) must be one of 'error', 'warning', 'info'*",
        ),
        ("checks=['graph_cuts']", "*unknown check id(s) [[]'graph_cuts']; valid*"),
        ("patience=0", "*patience must be an int >= 1, got 0*"),
    ],
)
def test_marker_rejects_bad_keyword(pytester, options, expected):
    make_tests(pytester, MARKED.format(options=options, fault="none"))
    result = run(pytester)

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([expected])


def test_marker_checked_without_fixture(pytester):
    make_tests(
        pytester,
        """
        @pytest.mark.gradwatch(sevrity="warning")
        def test_plain():
            pass
        """,
    )
    result = run(pytester)

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*unknown keyword(s) sevrity*"])


def test_marker_registered(pytester):
    make_tests(pytester, MARKED.format(options="patience=3", fault="none"))
    result = run(pytester, "--strict-markers")

    result.assert_outcomes(passed=1)


# Command-line options and ini keys

ZERO_GATE = MARKED.format(options="", fault="zero-gate")
DETACHED = MARKED.format(options="", fault="detach")


@pytest.mark.parametrize(
    ("args", "source", "outcome"),
    [
        ((), DETACHED, "failed"),
        ((), ZERO_GATE, "passed"),
        (("--gradwatch-strict",), ZERO_GATE, "failed"),
        (("--gradwatch-severity=warning",), ZERO_GATE, "failed"),
        (("--gradwatch-patience=5",), DETACHED, "passed"),
        (("--gradwatch-checks=not_in_optimizer,zero_gradient",), DETACHED, "passed"),
        (("--gradwatch-checks", "graph_cut unused_parameter"), DETACHED, "failed"),
    ],
)
def test_options_set_defaults(pytester, args, source, outcome):
    make_tests(pytester, source)
    result = run(pytester, *args)

    result.assert_outcomes(**{outcome: 1})


def test_marker_overrides_options(pytester):
    make_tests(pytester, MARKED.format(options="severity='error'", fault="zero-gate"))
    result = run(pytester, "--gradwatch-strict")

    result.assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("ini", "outcome"),
    [
        ("gradwatch_strict = true", "failed"),
        ("gradwatch_severity = warning", "failed"),
        ("gradwatch_checks = dead_units", "passed"),
    ],
)
def test_ini_keys_set_defaults(pytester, ini, outcome):
    pytester.makeini(f"[pytest]\n{ini}\n")
    make_tests(pytester, ZERO_GATE)
    result = run(pytester)

    result.assert_outcomes(**{outcome: 1})


def test_option_beats_ini(pytester):
    pytester.makeini("[pytest]\ngradwatch_patience = 5\n")
    make_tests(pytester, DETACHED)
    result = run(pytester, "--gradwatch-patience=3")

    result.assert_outcomes(failed=1)


@pytest.mark.parametrize(
    ("args", "ini", "expected"),
    [
        (
            ("--gradwatch-checks=bogus",),
            "",
            "*--gradwatch-checks: unknown check id(s) [[]'bogus']; valid check ids*",
        ),
        (
            ("--gradwatch-patience=soon",),
            "",
            "*--gradwatch-patience: patience must be an int >= 1 (steps), got 'soon'",
        ),
        (
            (),
            "gradwatch_patience = 0",
            "*ini key gradwatch_patience: patience must be an int >= 1 (steps), got*",
        ),
        (
            (),
            "gradwatch_severity = fatal",
            "*ini key gradwatch_severity must be one of 'error', 'warning', 'info'*",
        ),
    ],
)
def test_bad_setting_names_source(pytester, args, ini, expected):
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    make_tests(pytester, DETACHED)
    result = run(pytester, *args)

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])


def test_header_shows_settings(pytester):
    make_tests(pytester, DETACHED)
    result = run(pytester, "--gradwatch-strict", "--gradwatch-patience=4")

    result.stdout.fnmatch_lines(
        [
            "gradwatch: tests fail on alerts of severity warning or more serious; "
            "patience=4, checks=all, logdir=none"
        ]
    )


def test_default_header(pytester):
    make_tests(pytester, DETACHED)
    result = run(pytester)

    result.stdout.fnmatch_lines(
        [
            "gradwatch: tests fail on alerts of severity error; patience=default, "
            "checks=all, logdir=none"
        ]
    )


def test_logdir_writes_run_per_test(pytester):
    make_tests(
        pytester,
        """
        @pytest.mark.parametrize("fault", ["none", "detach"])
        def test_run(gradwatch, fault):
            model = Net(fault)
            gradwatch(model)
            train(model)

        def test_two_sessions(gradwatch):
            for _ in range(2):
                model = Net()
                gradwatch(model)
                train(model)
        """,
    )
    logdir = pytester.path / "logs"
    result = run(pytester, f"--gradwatch-logdir={logdir}")

    result.assert_outcomes(passed=2, failed=1)
    base = logdir / "test_model.py"
    for run_dir in (
        base / "test_run[none]",
        base / "test_run[detach]",
        base / "test_two_sessions",
        base / "test_two_sessions" / "session-2",
    ):
        assert list(run_dir.glob("events.out.tfevents.*")), run_dir


@pytest.mark.slow
def test_plugin_loads_from_entry_point(pytester):
    """A separate interpreter finds the plugin only through the entry point."""
    make_tests(pytester, DETACHED)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_model.py"],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 1, result.stdout
    assert "gradwatch found 3 alert(s)" in result.stdout
    assert "gradwatch: tests fail on alerts" in result.stdout


@pytest.mark.slow
def test_import_does_not_import_pytest():
    code = "import sys, gradwatch, gradwatch.testing; print('pytest' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )

    assert result.stdout.strip() == "False"
