"""Numeric checks: non-finite, exploding and vanishing gradients, update size."""

from __future__ import annotations

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from gradwatch import gradwatch
from gradwatch.errors import GradwatchError

NUMERIC_CHECKS = ("nonfinite_gradient", "exploding_gradient", "vanishing_gradient")


def numeric_alerts(gw, severities=("error", "warning")):
    return [
        a for a in gw.alerts if a.check in NUMERIC_CHECKS and a.severity in severities
    ]


def only(gw, check):
    return [a for a in gw.alerts if a.check == check]


# Non-finite gradients


class LogProb(nn.Module):
    """log of masked magnitudes: log(0) on the features the mask drops."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 4) * 0.5)
        self.register_buffer("keep", torch.tensor([1.0, 1.0, 0.0, 1.0]))

    def forward(self, x):
        return torch.log((x @ self.weight).abs() * self.keep)


class LogNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.logprob = LogProb()
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        scores = self.logprob(torch.tanh(self.body(x)))
        return self.head(scores.clamp_min(-5.0))


def test_log_zero_located_in_module():
    torch.manual_seed(0)
    model = LogNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(16, 6)).square().mean().backward()
            optimizer.step()

    (alert,) = only(gw, "nonfinite_gradient")
    assert alert.severity == "error"
    assert alert.step == 0
    assert alert.module == "logprob"
    assert "NaN" in alert.data["kinds"]
    assert "logprob.weight" in alert.data["params"]
    assert "head.weight" not in alert.data["params"]
    assert alert.last_step == 2


class Normalize(nn.Module):
    """Divide each row by its sum: 0/0 for rows that sum to zero."""

    def forward(self, x):
        return x / x.sum(dim=1, keepdim=True)


class DivNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.normalize = Normalize()
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(self.normalize(torch.relu(self.body(x))))


def test_division_by_zero_located_by_probe():
    torch.manual_seed(0)
    model = DivNet()
    with torch.no_grad():
        model.body.bias.fill_(-10.0)  # every ReLU output 0: each row sums to 0
    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(3):
            model.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            gw.step()

    located = {a.module: a for a in only(gw, "nonfinite_gradient")}
    assert "normalize" in located
    probe = located["normalize"]
    assert probe.severity == "error"
    assert probe.step == 1
    assert probe.data["located_by"] == "gradient probe"
    assert probe.data["origin_kind"] == "forward"


class WhereNet(nn.Module):
    """sqrt through torch.where: finite forward, NaN gradient from the other branch."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        s = self.head(torch.tanh(self.body(x))).squeeze(-1)
        return torch.where(s > 0, torch.sqrt(s), torch.zeros_like(s))


def test_where_nan_probe_names_head():
    torch.manual_seed(0)
    model = WhereNet()
    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(2):
            model.zero_grad()
            model(torch.randn(32, 4)).sum().backward()
            gw.step()

    (alert,) = only(gw, "nonfinite_gradient")
    assert alert.module == "head"
    assert alert.step == 0
    assert alert.last_step == 1


class Energy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return torch.exp(self.proj(x))


class ExpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.energy = Energy()
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.energy(x))


def test_exp_overflow_reported_as_inf():
    torch.manual_seed(0)
    model = ExpNet()
    with torch.no_grad():
        model.energy.proj.bias.fill_(95.0)  # exp(95) overflows float32
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch(model, on_alert="ignore") as gw:
        optimizer.zero_grad()
        model(torch.randn(8, 4)).mean().backward()
        optimizer.step()

    (alert,) = only(gw, "nonfinite_gradient")
    assert alert.severity == "error"
    assert "Inf" in alert.data["kinds"]
    assert "energy.proj.weight" in alert.data["params"]


def test_exp_overflow_probe_finds_forward():
    torch.manual_seed(0)
    model = ExpNet()
    with torch.no_grad():
        model.energy.proj.bias.fill_(95.0)
    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(2):
            model.zero_grad()
            model(torch.randn(8, 4)).mean().backward()
            gw.step()

    located = {a.module: a for a in only(gw, "nonfinite_gradient")}
    assert located["energy"].data["origin_kind"] == "forward"
    assert located["energy"].data["located_by"] == "gradient probe"


def test_nonfinite_raises_under_raise_policy():
    torch.manual_seed(0)
    model = LogNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 6)
    with gradwatch(model, on_alert="raise"):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        with pytest.raises(GradwatchError, match="nonfinite_gradient"):
            optimizer.step()


def test_overflowing_norm_not_nonfinite():
    model = nn.Linear(4, 4, bias=False).half()
    x = torch.full((1, 4), 240.0, dtype=torch.float16)
    with gradwatch(model, on_alert="ignore") as gw:
        (model(x) * 250.0).sum().backward()  # every entry 60000: norm overflows
        gw.step()

    assert torch.isfinite(model.weight.grad).all()
    assert model.weight.grad.norm().isinf()
    assert not only(gw, "nonfinite_gradient")


# GradScaler


class HalfNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def scaled_steps(model, optimizer, scaler, steps):
    skipped = 0
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(torch.randn(32, 8)).float().square().mean()
        scaler.scale(loss).backward()
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped += scaler.get_scale() < before
    return skipped


def test_gradscaler_skipped_steps_are_info():
    torch.manual_seed(0)
    model = HalfNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    # 2**22 times the gradient overflows float16 (max 65504) in backward.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22)
    with gradwatch(model, on_alert="ignore") as gw:
        skipped = scaled_steps(model, optimizer, scaler, 14)

    assert skipped >= 2
    alerts = only(gw, "nonfinite_gradient")
    assert alerts
    assert {a.severity for a in alerts} == {"info"}
    assert alerts[0].data["source"] == "GradScaler"
    assert alerts[0].data["skipped_steps"] == skipped
    assert alerts[0].data["scale"] < 2.0**22


def test_gradscaler_skip_at_session_end_is_info():
    torch.manual_seed(0)
    model = HalfNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    with gradwatch(model, on_alert="ignore") as gw:
        skipped = scaled_steps(model, optimizer, scaler, 2)

    assert skipped == 2
    alerts = only(gw, "nonfinite_gradient")
    assert alerts
    assert all(a.severity == "info" for a in alerts)


# Exploding and vanishing gradients


def sigmoid_mlp(depth):
    layers, width = [], 16
    for _ in range(depth):
        layers += [nn.Linear(width, 16), nn.Sigmoid()]
    layers.append(nn.Linear(16, 4))
    return nn.Sequential(*layers)


def train_classifier(model, steps, lr=0.1, optimizer=None, **options):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=generator)
    y = torch.randint(0, 4, (64,), generator=generator)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=lr)
    with gradwatch(model, on_alert="ignore", **options) as gw:
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return gw


def test_vanishing_in_deep_sigmoid_mlp():
    torch.manual_seed(0)
    gw = train_classifier(sigmoid_mlp(30), steps=6)

    (alert,) = only(gw, "vanishing_gradient")
    assert alert.severity == "warning"
    assert alert.step == 0
    assert alert.last_step == 5
    assert alert.data["ratio"] < 1e-3
    # The first layers' gradients underflow to exact zeros, which zero_gradient
    # reports; the alert names the lowest layers that still get a gradient.
    layers = [int(name.split(".")[0]) for name in alert.data["params"]]
    assert min(layers) < 30
    assert max(layers) < 40
    assert not only(gw, "exploding_gradient")


class SeqNet(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(4, 32, batch_first=True)
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def train_sequence(model, steps, lr, clip=None):
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(steps):
            x = torch.randn(32, 30, 4, generator=generator)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), 3 * x[:, 0, :1]).backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
    return gw


def test_exploding_rnn_with_large_learning_rate():
    torch.manual_seed(0)
    gw = train_sequence(SeqNet(nn.RNN), steps=12, lr=0.3)

    alerts = only(gw, "exploding_gradient")
    assert alerts
    first = min(alerts, key=lambda a: a.step)
    assert first.severity == "warning"
    assert first.step <= 8
    assert first.param.startswith(("rnn.", "head."))
    assert first.data["ratio"] > 100


def test_lstm_stays_silent():
    torch.manual_seed(0)
    gw = train_sequence(SeqNet(nn.LSTM), steps=40, lr=0.05, clip=1.0)

    assert numeric_alerts(gw) == []


class ResidualMLP(nn.Module):
    def __init__(self, depth=20, width=32):
        super().__init__()
        self.stem = nn.Linear(16, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width),
                nn.Linear(width, width),
                nn.ReLU(),
                nn.Linear(width, width),
            )
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def test_residual_mlp_stays_silent():
    torch.manual_seed(0)
    model = ResidualMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gw = train_classifier(model, steps=40, optimizer=optimizer)

    assert numeric_alerts(gw) == []


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.position = nn.Parameter(torch.zeros(1, 12, 32))
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 50)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens) + self.position))


def test_small_transformer_stays_silent():
    torch.manual_seed(0)
    model = TinyTransformer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(30):
            tokens = torch.randint(0, 50, (8, 12), generator=generator)
            targets = tokens.roll(-1, dims=1)
            optimizer.zero_grad()
            logits = model(tokens)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            loss.backward()
            optimizer.step()

    assert numeric_alerts(gw) == []


def test_deep_relu_mlp_stays_silent():
    torch.manual_seed(0)
    layers, width = [], 16
    for _ in range(10):
        layers += [nn.Linear(width, 16), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(16, 4))
    gw = train_classifier(model, steps=30)

    assert numeric_alerts(gw) == []


# Update size


def test_update_ratio_matches_manual_computation(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    expected = []
    with gradwatch(model, logdir=tmp_path, on_alert="ignore", log_every=2):
        for _ in range(4):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            before = model.weight.detach().clone()
            optimizer.step()
            change = (model.weight.detach() - before).norm() / before.norm()
            expected.append(change.item())

    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    records = events.Scalars("gradwatch/update_ratio/weight")
    assert [r.step for r in records] == [0, 2]
    assert records[0].value == pytest.approx(expected[0], rel=1e-5)
    assert records[1].value == pytest.approx(expected[2], rel=1e-5)
    assert "gradwatch/update_ratio/bias" in events.Tags()["scalars"]


def test_update_ratio_bounds_warn_on_large_updates():
    torch.manual_seed(0)
    gw = train_classifier(
        nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)),
        steps=6,
        lr=50.0,
        log_every=1,
        update_ratio_bounds=(1e-5, 1e-1),
    )

    alerts = [a for a in gw.alerts if a.data.get("kind") == "update"]
    assert alerts
    assert all(a.check == "exploding_gradient" for a in alerts)
    assert all(a.data["update_ratio"] > 0.1 for a in alerts)


def test_update_ratio_bounds_off_by_default(tmp_path):
    torch.manual_seed(0)
    gw = train_classifier(
        nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)),
        steps=6,
        lr=1e-6,
        log_every=1,
        logdir=tmp_path,
    )

    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    ratios = events.Scalars("gradwatch/update_ratio/0.weight")
    assert len(ratios) == 6
    assert max(r.value for r in ratios) < 1e-5  # far below any sensible bound
    assert not [a for a in gw.alerts if a.data.get("kind") == "update"]


# Observation only


def test_training_bitwise_identical(tmp_path):
    def run(logdir):
        torch.manual_seed(0)
        model = ResidualMLP(depth=4)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(0)
        with gradwatch(model, logdir=logdir, on_alert="ignore", log_every=1):
            for _ in range(5):
                x = torch.randn(16, 16, generator=generator)
                optimizer.zero_grad()
                model(x).square().mean().backward()
                optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    watched = run(tmp_path)
    torch.manual_seed(0)
    model = ResidualMLP(depth=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(16, 16, generator=generator)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    for mine, bare in zip(watched, model.parameters(), strict=True):
        assert torch.equal(mine, bare.detach())


def div_net_grads(steps, session=None):
    torch.manual_seed(0)
    model = DivNet()
    with torch.no_grad():
        model.body.bias.fill_(-10.0)
    generator = torch.Generator().manual_seed(0)
    grads = []
    with session(model) if session else torch.enable_grad() as gw:
        for _ in range(steps):
            model.zero_grad()
            model(torch.randn(8, 4, generator=generator)).sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            if session:
                gw.step()
    return grads


def test_probe_leaves_gradients_unchanged():
    bare = div_net_grads(3)
    watched = div_net_grads(3, lambda m: gradwatch(m, on_alert="ignore"))

    for step_watched, step_bare in zip(watched, bare, strict=True):
        for mine, other in zip(step_watched, step_bare, strict=True):
            assert torch.equal(mine.isnan(), other.isnan())
            assert torch.equal(mine.nan_to_num(), other.nan_to_num())


def test_probe_hooks_removed_on_exit():
    torch.manual_seed(0)
    model = DivNet()
    with torch.no_grad():
        model.body.bias.fill_(-10.0)
    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(2):
            model.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            gw.step()
        model.zero_grad()
        model(torch.randn(8, 4)).sum().backward()

    for module in model.modules():
        assert not module._forward_hooks
        assert not module._forward_pre_hooks
    for param in model.parameters():
        assert not param._backward_hooks
        assert not param._post_accumulate_grad_hooks


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("explode_factor", 1.0),
        ("vanish_factor", 0.0),
        ("norm_window", 2),
        ("update_ratio_bounds", (1e-1, 1e-5)),
        ("image_every", -1),
    ],
)
def test_invalid_numeric_options_rejected(option, value):
    with pytest.raises(ValueError, match=option):
        gradwatch(nn.Linear(2, 2), **{option: value})


def test_nan_weight_set_mid_training_reported_once():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch(model, on_alert="ignore") as gw:
        for step in range(4):
            if step == 1:
                with torch.no_grad():
                    model[0].weight[0, 0] = math.nan
            optimizer.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            optimizer.step()

    alerts = only(gw, "nonfinite_gradient")
    assert len(alerts) == 1
    assert alerts[0].step == 1
