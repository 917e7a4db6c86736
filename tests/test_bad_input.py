"""Bad input: clear errors when the session is built, never deep inside training.

Each error names the type or value received, what was expected and the fix. Cases
already pinned in test_session.py (a non-module, a module class, a model without
trainable parameters, meta parameters, a logdir that is a file) and
test_masks.py (watch_mask shapes and values) are not repeated here.
"""

from __future__ import annotations

import errno
import logging
import shutil
import subprocess
import warnings

import pytest
import torch
from torch import nn

from gradwatch import GradwatchWarning, gradwatch


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def train(model, steps=6, optimizer=None):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 3, generator=generator)).square().mean().backward()
        optimizer.step()


# The model argument


@pytest.mark.parametrize(
    ("model", "received"),
    [
        (None, "NoneType"),
        (torch.ones(2, requires_grad=True), "Tensor"),
        ([nn.Parameter(torch.ones(2))], "list"),
        ("resnet18", "str"),
    ],
)
def test_non_module_names_type(model, received):
    with pytest.raises(TypeError, match=f"takes a torch.nn.Module, got {received}"):
        gradwatch(model)


def test_optimizer_instead_of_model_raises():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="got SGD; pass the model"):
        gradwatch(optimizer)


def test_frozen_model_warns_and_runs():
    model = make_model().requires_grad_(False)
    with pytest.warns(GradwatchWarning, match="Sequential has no trainable parameters"):
        session = gradwatch(model)
    with session as gw:
        model(torch.randn(2, 3))

    assert gw.alerts == []


def test_partly_meta_model_names_parameter():
    model = make_model()
    with torch.device("meta"):
        model[2] = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"parameter '2.weight' is on the meta device"):
        gradwatch(model)


# Option values


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("symmetry_every", 0, "symmetry_every must be an int >= 1, got 0"),
        ("dead_fraction", 0, r"dead_fraction must be a float in \(0, 1\], got 0"),
        ("activations", "yes", "activations must be True or False, got 'yes'"),
        ("unit_groups", {"0": "rows"}, "must be one of 'children', got 'rows'"),
        ("explode_factor", 1, "explode_factor must be a number > 1, got 1"),
        ("explode_factor", float("nan"), "explode_factor must be a number > 1"),
        ("vanish_factor", 2, r"vanish_factor must be a float in \(0, 1\)"),
        ("norm_window", 2, "norm_window must be an int >= 5, got 2"),
        ("update_ratio_bounds", (1, 0.5), "0 < low < high"),
        ("image_every", -1, "image_every must be an int >= 0"),
        ("logdir", 5, "logdir must be a path or None, got int"),
        ("track_zeros", "yes", "track_zeros must be True or False"),
        ("on_alert", 3, "on_alert must be one of 'warn', 'raise', 'ignore'"),
        ("stop_confidence", 0, r"stop_confidence must be a float in \(0, 1\)"),
        ("graph_walk_steps", -1, "graph_walk_steps must be an int >= 0"),
        ("histogram_every", -1, "histogram_every must be an int >= 0"),
        ("patience", True, "patience must be an int >= 1, got True"),
        ("zero_tol", float("nan"), r"zero_tol must be a float in \(0, 1\)"),
        ("symmetry_tol", 0, r"symmetry_tol must be a float in \(0, 1\)"),
    ],
)
def test_invalid_option_value(option, value, expected):
    with pytest.raises(ValueError, match=expected):
        gradwatch(make_model(), **{option: value})


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("watch_outputs", 5, "watch_outputs must be a sequence of module"),
        ("ignore", 5, "ignore must be a sequence of glob patterns"),
        ("checks", 5, "checks must be a check id or a sequence of check ids"),
        ("masks", 5, "masks must map parameter qualified names to mask tensors"),
        ("unit_groups", 5, "unit_groups must map module names to a unit kind"),
    ],
)
def test_option_of_wrong_type(option, value, expected):
    with pytest.raises(ValueError, match=expected):
        gradwatch(make_model(), **{option: value})


def test_single_check_id_as_string():
    with pytest.raises(ValueError, match=r"unknown check id\(s\) \['unused'\]"):
        gradwatch(make_model(), checks="unused")
    session = gradwatch(make_model(), checks="unused_parameter")

    assert session.options.checks == ("unused_parameter",)


@pytest.mark.parametrize("option", ["watch_outputs", "unit_groups"])
def test_unknown_module_name_raises_at_build(option):
    value = ("encoder",) if option == "watch_outputs" else {"encoder": "children"}
    with pytest.raises(ValueError, match="no module of the model is named 'encoder'"):
        gradwatch(make_model(), **{option: value})


def test_unknown_option_name_raises():
    with pytest.raises(TypeError, match="unexpected keyword argument 'patiance'"):
        gradwatch(make_model(), patiance=5)


# logdir


def test_logdir_below_a_file_raises(tmp_path):
    blocker = tmp_path / "events"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        gradwatch(make_model(), logdir=blocker / "run")


def test_logdir_that_cannot_be_created_raises(tmp_path):
    # /proc accepts no new directories, not even from root.
    with pytest.raises(ValueError, match="cannot create logdir '/proc/gradwatch-run'"):
        gradwatch(make_model(), logdir="/proc/gradwatch-run")


# Complex parameters


def complex_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        model[1].to(torch.complex64)
    return model


def test_complex_parameter_raises_with_fix():
    with pytest.raises(TypeError, match=r"'1.weight' has dtype torch.complex64"):
        gradwatch(complex_model())
    with pytest.raises(TypeError, match=r"ignore=\['1.\*'\]"):
        gradwatch(complex_model())


def test_ignored_complex_parameters_train():
    model = complex_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    with gradwatch(model, ignore=["1.*"]) as gw:
        for _ in range(12):
            optimizer.zero_grad()
            x = torch.randn(8, 3, generator=generator)
            model[1](model[0](x).to(torch.complex64)).abs().mean().backward()
            optimizer.step()

    assert gw.step == 12
    assert gw.alerts == []


# watch_mask


def test_watch_mask_rejects_complex_dtype():
    model = make_model()
    keep = torch.ones(4, 3, dtype=torch.complex64)
    expected = "must be a dense bool, integer or floating tensor, got torch.complex64"
    with gradwatch(model) as gw, pytest.raises(TypeError, match=expected):
        gw.watch_mask(model[0].weight, keep)


def test_watch_mask_rejects_meta_mask():
    model = make_model()
    keep = torch.ones(4, 3, dtype=torch.bool, device="meta")
    expected = "`0.weight` is on the meta device and has no values"
    with gradwatch(model) as gw, pytest.raises(ValueError, match=expected):
        gw.watch_mask(model[0].weight, keep)


def test_watch_mask_accepts_integer_and_float_masks():
    model = make_model()
    with gradwatch(model, on_alert="ignore") as gw:
        gw.watch_mask(model[0].weight, torch.ones(4, 3, dtype=torch.int8))
        gw.watch_mask(model[2].weight, torch.ones(2, 4, dtype=torch.float16))
        train(model)

    assert gw.alerts == []


# Forward outputs that are not tensors


class Tagger(nn.Module):
    """Returns a tag string, None and nested containers next to the tensor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        h = torch.relu(self.lin(x))
        return {"h": h, "tag": "noun", "none": None, "nested": [[h, "a"], {"b": None}]}


class Labeller(nn.Module):
    def forward(self, x):
        return "ok" if x.numel() else "empty"


class OddOutputs(nn.Module):
    def __init__(self, root_output):
        super().__init__()
        self.fc = nn.Linear(3, 16)
        self.tagger = Tagger()
        self.labeller = Labeller()
        self.head = nn.Linear(16, 2)
        self.root_output = root_output
        self.loss = None

    def forward(self, x):
        label = self.labeller(x)
        y = self.head(self.tagger(self.fc(x))["h"])
        self.loss = y.square().mean()
        if self.root_output == "none":
            return None
        if self.root_output == "string":
            return label
        return y, label, None, {"aux": [y.sum(), (y.mean(), 3)]}


@pytest.mark.parametrize("root_output", ["none", "string", "nested"])
def test_non_tensor_outputs_are_tolerated(root_output):
    torch.manual_seed(0)
    model = OddOutputs(root_output)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    with gradwatch(model, symmetry_every=1, histogram_every=1) as gw:
        for _ in range(12):
            optimizer.zero_grad()
            model(torch.randn(16, 3, generator=generator))
            model.loss.backward()
            optimizer.step()

    assert gw.step == 12
    assert [a for a in gw.alerts if a.severity != "info"] == []


# Hooks of the user


def register_user_hooks(model, optimizer, tag, calls):
    """Register one hook of each kind that appends ``(tag, kind)`` to ``calls``."""

    def record(kind):
        def hook(*_args, **_kwargs):
            calls.append((tag, kind))

        return hook

    model[0].register_forward_pre_hook(record("forward_pre"))
    model[0].register_forward_hook(record("forward"))
    model[0].register_full_backward_pre_hook(record("backward_pre"))
    model[0].register_full_backward_hook(record("backward"))
    model[0].weight.register_hook(record("tensor"))
    model[0].weight.register_post_accumulate_grad_hook(record("post_accumulate"))
    optimizer.register_step_pre_hook(record("step_pre"))
    optimizer.register_step_post_hook(record("step_post"))


def one_step(model, optimizer):
    optimizer.zero_grad()
    x = torch.randn(4, 3, requires_grad=True)
    model(x).sum().backward()
    optimizer.step()


def test_user_hooks_keep_order_and_survive():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    register_user_hooks(model, optimizer, "before", calls)
    with gradwatch(model, symmetry_every=1, histogram_every=1):
        register_user_hooks(model, optimizer, "after", calls)
        one_step(model, optimizer)
        inside = list(calls)

    kinds = [kind for tag, kind in inside if tag == "before"]
    assert kinds == [kind for tag, kind in inside if tag == "after"]
    assert len(kinds) == 8
    for kind in kinds:
        assert inside.index(("before", kind)) < inside.index(("after", kind)), kind

    calls.clear()
    one_step(model, optimizer)

    assert calls == inside


# TensorBoard writer failures on a real file system


@pytest.fixture
def small_filesystem(tmp_path):
    """A 256 KiB tmpfs mounted at a temporary directory; skipped without mount."""
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("the mount command is not installed")
    command = [mount, "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(64, 64)
        self.head = nn.Linear(64, 2)
        self.spare = nn.Linear(8, 8)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("failure", ["read_only", "full"])
def test_writer_failure_on_real_filesystem(small_filesystem, failure, caplog):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    caplog.set_level(logging.ERROR, logger="gradwatch")
    logdir = small_filesystem / "run"
    options = {"log_every": 1, "histogram_every": 1}
    with gradwatch(model, logdir=logdir, on_alert="ignore", **options) as gw:
        for step in range(40):
            if step == 3 and failure == "read_only":
                remount = ["mount", "-o", "remount,ro", str(small_filesystem)]
                subprocess.run(remount, check=True)
            optimizer.zero_grad()
            model(torch.randn(8, 64, generator=generator)).square().mean().backward()
            optimizer.step()

    failures = [r for r in caplog.records if "stopped writing" in r.message]
    assert len(failures) == 1
    code = errno.EROFS if failure == "read_only" else errno.ENOSPC
    assert errno.errorcode[code] in failures[0].getMessage() or str(code) in str(
        failures[0].getMessage()
    )
    assert gw.step == 40
    assert {a.param for a in gw.alerts} == {"spare.weight", "spare.bias"}
