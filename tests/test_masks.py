"""Mask checks: each fault next to its healthy twin, plus input checks and plumbing."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gradwatch import gradwatch
from gradwatch.detectors.masks import MaskDetector
from gradwatch.masks.watch import leak_figures

IN, HIDDEN, OUT = 16, 24, 4


class MaskedLinear(nn.Linear):
    """A linear layer with a ``mask`` buffer; ``forward_uses`` selects the weight."""

    def __init__(self, keep, forward_uses="masked", zero_data=True):
        super().__init__(keep.shape[1], keep.shape[0])
        self.register_buffer("mask", keep.float())
        self.forward_uses = forward_uses
        if zero_data:
            with torch.no_grad():
                self.weight.mul_(self.mask)

    def forward(self, x):
        if self.forward_uses == "masked":
            weight = self.weight * self.mask
        elif self.forward_uses == "transposed":
            weight = self.weight * self.mask.T
        else:
            weight = self.weight
        return F.linear(x, weight, self.bias)


class Net(nn.Module):
    def __init__(self, fc1=None):
        super().__init__()
        self.fc1 = fc1 if fc1 is not None else nn.Linear(IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, OUT)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def random_keep(shape=(HIDDEN, IN), keep=0.4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) < keep


def batch(step, features=IN):
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(32, features, generator=generator)
    return x, torch.randint(0, OUT, (32,), generator=generator)


def fit(model, optimizer, steps=8, *, before=None, after=None, **options):
    """Train under gradwatch; ``before(gw, step)`` and ``after(step)`` hook in."""
    with gradwatch(model, on_alert="ignore", **options) as gw:
        for step in range(steps):
            if before is not None:
                before(gw, step)
            x, y = batch(step)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if after is not None:
                after(step)
    return gw


def loud(gw):
    """Return (check, param) of every error and warning alert."""
    return [(a.check, a.param) for a in gw.alerts if a.severity != "info"]


def alert(gw, check, param):
    found = [a for a in gw.alerts if a.check == check and a.param == param]
    assert found, f"no {check} alert on {param}; alerts: {gw.alerts}"
    return found[0]


def no_alert(gw, check):
    return not [a for a in gw.alerts if a.check == check]


def sgd(model, **kwargs):
    return torch.optim.SGD(model.parameters(), lr=0.1, **kwargs)


def train_dense(model, optimizer, steps=3):
    """Train without gradwatch, so that the optimizer has state."""
    for step in range(steps):
        x, y = batch(50 + step)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


# Mask buffers multiplied in forward, and their faults


def test_mask_buffer_in_forward_is_silent():
    torch.manual_seed(0)
    keep = random_keep()
    model = Net(MaskedLinear(keep, zero_data=False))
    gw = fit(model, sgd(model, momentum=0.9, weight_decay=1e-3))

    assert loud(gw) == []
    assert no_alert(gw, "mask_leak")
    assert (model.fc1.weight.detach()[~keep] != 0).any()  # raw weight not zeroed
    assert gw._masks.figures["fc1.weight"].sparsity == pytest.approx(
        (~keep).float().mean().item()
    )


def test_mask_buffer_bypassed_in_forward_leaks():
    torch.manual_seed(0)
    keep = random_keep()
    model = Net(MaskedLinear(keep, forward_uses="raw", zero_data=False))
    gw = fit(model, sgd(model))

    leak = alert(gw, "mask_leak", "fc1.weight")
    assert leak.severity == "error"
    assert leak.step == 0
    assert leak.data["count"] > 0
    assert leak.data["max_abs_grad"] > 0
    assert "bypasses the mask" in leak.message
    assert no_alert(gw, "mask_revived")  # never zero, so nothing came back


def test_mask_applied_once_through_data_leaks_and_revives():
    torch.manual_seed(0)
    keep = random_keep()
    model = Net(MaskedLinear(keep, forward_uses="raw", zero_data=True))
    gw = fit(model, sgd(model))

    leak = alert(gw, "mask_leak", "fc1.weight")
    revived = alert(gw, "mask_revived", "fc1.weight")
    assert leak.severity == "error"
    assert leak.step == 0
    assert revived.severity == "error"
    assert revived.step == 1
    assert revived.data["causes"] == ["gradient"]
    assert "The gradient leaked" in revived.message


def test_explicit_mask_applied_once_through_data():
    torch.manual_seed(0)
    model = Net()
    keep = random_keep()
    with torch.no_grad():
        model.fc1.weight.mul_(keep)
    gw = fit(
        model, sgd(model), before=lambda gw, s: s or gw.watch_mask("fc1.weight", keep)
    )

    leak = alert(gw, "mask_leak", "fc1.weight")
    revived = alert(gw, "mask_revived", "fc1.weight")
    assert leak.severity == "info"  # value-enforced: mask_revived decides
    assert revived.severity == "error"
    assert revived.step == 1
    assert revived.data["count"] == int((model.fc1.weight.detach()[~keep] != 0).sum())


def test_transposed_mask_in_forward_leaks():
    torch.manual_seed(0)
    keep = random_keep(shape=(IN, IN))
    fc1 = MaskedLinear(keep, forward_uses="transposed")
    model = nn.Sequential(fc1, nn.ReLU(), nn.Linear(IN, OUT))
    gw = fit(model, sgd(model))

    leak = alert(gw, "mask_leak", "0.weight")
    assert leak.severity == "error"
    assert leak.step == 0


def test_square_mask_in_forward_is_silent():
    torch.manual_seed(0)
    keep = random_keep(shape=(IN, IN))
    model = nn.Sequential(MaskedLinear(keep), nn.ReLU(), nn.Linear(IN, OUT))
    gw = fit(model, sgd(model, momentum=0.9))

    assert loud(gw) == []
    assert no_alert(gw, "mask_leak")


# Pruning by value, then momentum or Adam state


def prune_by_value(model, optimizer, reset_state):
    """Zero the smallest half of fc1.weight, mask its gradient; return the mask."""
    weight = model.fc1.weight
    keep = weight.detach().abs() > weight.detach().abs().median()
    with torch.no_grad():
        weight.mul_(keep)
    weight.register_hook(lambda grad: grad * keep)
    if reset_state:
        for value in optimizer.state[weight].values():
            if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                value.mul_(keep)
    return keep


@pytest.mark.parametrize("optimizer_name", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("reset_state", [False, True])
def test_optimizer_state_revives_pruned_entries(optimizer_name, reset_state):
    torch.manual_seed(0)
    model = Net()
    if optimizer_name == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        optimizer = sgd(model, momentum=0.9)

    def before(gw, step):
        if step == 3:
            gw.watch_mask(
                model.fc1.weight, prune_by_value(model, optimizer, reset_state)
            )

    gw = fit(model, optimizer, before=before)

    assert no_alert(gw, "mask_leak")
    if reset_state:
        assert loud(gw) == []
        return
    revived = alert(gw, "mask_revived", "fc1.weight")
    assert revived.step == 4
    assert revived.data["causes"] == ["optimizer_state"]
    key = "exp_avg" if optimizer_name == "adam" else "momentum_buffer"
    assert f"`{key}`" in revived.message


@pytest.mark.parametrize("reset_state", [False, True])
def test_track_zeros_takes_pruning_done_before_the_session(reset_state):
    torch.manual_seed(0)
    model = Net()
    optimizer = sgd(model, momentum=0.9)
    train_dense(model, optimizer)
    prune_by_value(model, optimizer, reset_state)

    gw = fit(model, optimizer, track_zeros=True)

    if reset_state:
        assert loud(gw) == []
    else:
        assert alert(gw, "mask_revived", "fc1.weight").step == 1
    assert "fc1.weight" in gw._masks.figures
    assert "fc2.weight" not in gw._masks.figures  # no zeros there


def test_track_zeros_skips_zero_initialised_tensors():
    torch.manual_seed(0)
    model = Net()
    nn.init.zeros_(model.fc1.bias)
    gw = fit(model, sgd(model), track_zeros=True)

    assert loud(gw) == []
    assert gw._masks.figures == {}


# torch.nn.utils.prune


def prune_fc1(model, how):
    if how == "l1_unstructured":
        prune.l1_unstructured(model.fc1, "weight", amount=0.6)
    elif how == "ln_structured":
        prune.ln_structured(model.fc1, "weight", amount=0.5, n=2, dim=0)
    else:
        prune.global_unstructured(
            [(model.fc1, "weight"), (model.fc2, "weight")],
            pruning_method=prune.L1Unstructured,
            amount=0.5,
        )


@pytest.mark.parametrize("how", ["l1_unstructured", "ln_structured", "global"])
def test_torch_prune_is_silent(how):
    torch.manual_seed(0)
    model = Net()
    prune_fc1(model, how)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2
    )
    gw = fit(model, optimizer)

    assert loud(gw) == []
    assert no_alert(gw, "mask_leak")
    assert gw._masks.figures["fc1.weight_orig"].sparsity > 0.4


def test_adamw_decay_on_pruned_orig_is_silent():
    torch.manual_seed(0)
    model = Net()
    prune.l1_unstructured(model.fc1, "weight", amount=0.6)
    masked = model.fc1.weight_mask == 0
    before = model.fc1.weight_orig.detach()[masked].clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    gw = fit(model, optimizer)

    assert loud(gw) == []
    assert not torch.equal(model.fc1.weight_orig.detach()[masked], before)  # drifted
    assert (model.fc1.weight.detach()[masked] == 0).all()


def test_prune_reading_orig_in_forward_leaks():
    class Bypass(Net):
        def forward(self, x):
            hidden = torch.relu(self.fc1(x))
            return self.fc2(hidden) + 1e-3 * self.fc1.weight_orig.sum()

    torch.manual_seed(0)
    model = Bypass()
    prune.l1_unstructured(model.fc1, "weight", amount=0.6)
    gw = fit(model, sgd(model))

    leak = alert(gw, "mask_leak", "fc1.weight_orig")
    assert leak.severity == "error"
    assert "`fc1.weight_orig` directly" in leak.message


@pytest.mark.parametrize("write_into", ["effective", "orig"])
def test_write_after_prune(write_into):
    torch.manual_seed(0)
    model = Net()
    prune.l1_unstructured(model.fc1, "weight", amount=0.6)
    fresh = torch.randn(HIDDEN, IN)

    def after(step):
        if step == 2:
            with torch.no_grad():
                if write_into == "effective":
                    model.fc1.weight.copy_(fresh)
                else:
                    model.fc1.weight_orig.copy_(fresh)

    gw = fit(model, sgd(model), after=after)

    if write_into == "orig":
        assert loud(gw) == []
        return
    revived = alert(gw, "mask_revived", "fc1.weight_orig")
    assert revived.step == 3
    assert revived.data["causes"] == ["direct_write"]
    assert "wrote into `fc1.weight` directly" in revived.message


def test_prune_mask_edited_in_place_is_silent():
    torch.manual_seed(0)
    model = Net()
    prune.l1_unstructured(model.fc1, "weight", amount=0.3)

    def before(gw, step):
        if step == 3:
            model.fc1.weight_mask[:, : IN // 2] = 0

    gw = fit(model, sgd(model, momentum=0.9), before=before)

    assert loud(gw) == []
    assert gw._masks.figures["fc1.weight_orig"].sparsity > 0.5


def test_iterative_torch_prune_is_silent():
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsity = []

    def before(gw, step):
        if step in (2, 4, 6):
            if prune.is_pruned(model.fc1):
                orig = model.fc1.weight_orig
            else:
                orig = model.fc1.weight
            prune.l1_unstructured(model.fc1, "weight", amount=0.3)
            assert model.fc1.weight_orig is orig
        if step:
            figures = gw._masks.figures.get("fc1.weight_orig")
            sparsity.append(figures.sparsity if figures else 0.0)

    gw = fit(model, optimizer, steps=9, before=before)

    assert loud(gw) == []
    assert sparsity[-1] > sparsity[2] > 0  # the mask grew and was followed


@pytest.mark.parametrize("zero_new_entries", [True, False])
def test_iterative_pruning_by_value(zero_new_entries):
    torch.manual_seed(0)
    model = Net()
    optimizer = sgd(model, momentum=0.9)
    weight = model.fc1.weight
    keep = torch.ones_like(weight, dtype=torch.bool)
    weight.register_hook(lambda grad: grad * keep)

    def before(gw, step):
        if step == 0:
            gw.watch_mask(weight, keep)
        if step in (2, 5):
            alive = weight.detach().abs()[keep]
            keep.logical_and_(weight.detach().abs() > alive.quantile(0.3))
            if zero_new_entries:
                with torch.no_grad():
                    weight.mul_(keep)
                optimizer.state[weight]["momentum_buffer"].mul_(keep)

    gw = fit(model, optimizer, before=before)

    if zero_new_entries:
        assert loud(gw) == []
        assert gw._masks.figures["fc1.weight"].sparsity > 0.45
    else:
        assert alert(gw, "mask_revived", "fc1.weight").step == 2


# Frozen mode


@pytest.mark.parametrize("decay_through_grad", [False, True])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_frozen_entries_and_weight_decay(decay_through_grad, optimizer_name):
    torch.manual_seed(0)
    model = Net()
    weight = model.fc1.weight
    keep = random_keep()
    decay = 0.1
    if decay_through_grad:
        weight.register_hook(lambda grad: (grad + decay * weight.detach()) * keep)
        others = [p for p in model.parameters() if p is not weight]
        groups = [{"params": [weight], "weight_decay": 0.0}, {"params": others}]
    else:
        weight.register_hook(lambda grad: grad * keep)
        groups = [{"params": list(model.parameters())}]
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=0.1, weight_decay=decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=1e-2, weight_decay=decay)
    start = weight.detach().clone()

    gw = fit(
        model,
        optimizer,
        before=lambda gw, s: s or gw.watch_mask(weight, keep, "frozen"),
    )

    if decay_through_grad:
        assert loud(gw) == []
        assert torch.equal(weight.detach()[~keep], start[~keep])
        return
    revived = alert(gw, "mask_revived", "fc1.weight")
    assert revived.step == 1
    assert revived.data["causes"] == ["weight_decay"]
    assert "weight_decay=0.1" in revived.message


class Bag(nn.Module):
    def __init__(self, sparse):
        super().__init__()
        self.embed = nn.Embedding(20, 8, sparse=sparse)
        self.head = nn.Linear(8, OUT)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(dim=1))


def fit_retired_rows(sparse):
    """Train on every row, then retire rows 10..19: they must keep their values."""
    torch.manual_seed(0)
    model = Bag(sparse)
    if sparse:
        optimizer = torch.optim.SparseAdam(list(model.embed.parameters()), lr=1e-2)
        head = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        head = None
    keep = torch.ones(20, 1, dtype=torch.bool)
    keep[10:] = False
    generator = torch.Generator().manual_seed(0)

    with gradwatch(model, on_alert="ignore") as gw:
        for step in range(8):
            retired = step >= 3
            if step == 3:
                gw.watch_mask(model.embed.weight, keep, mode="frozen")
            high = 10 if retired else 20
            tokens = torch.randint(0, high, (16, 5), generator=generator)
            labels = torch.randint(0, OUT, (16,), generator=generator)
            optimizer.zero_grad(set_to_none=True)
            if head is not None:
                head.zero_grad(set_to_none=True)
            F.cross_entropy(model(tokens), labels).backward()
            optimizer.step()
            if head is not None:
                head.step()
    return gw


def test_dense_adam_moves_retired_embedding_rows():
    gw = fit_retired_rows(sparse=False)

    revived = alert(gw, "mask_revived", "embed.weight")
    assert revived.step == 4
    assert revived.data["causes"] == ["optimizer_state"]
    assert no_alert(gw, "mask_leak")


def test_sparse_adam_keeps_retired_embedding_rows():
    gw = fit_retired_rows(sparse=True)

    assert loud(gw) == []
    assert no_alert(gw, "mask_leak")
    assert gw._masks.figures["embed.weight"].sparsity == 0.5


def test_leak_figures_of_sparse_gradient_match_dense():
    indices = torch.tensor([[0, 3, 3, 7]])
    values = torch.tensor([[1.0, -2.0], [0.5, 0.0], [-0.5, 4.0], [3.0, 0.0]])
    grad = torch.sparse_coo_tensor(indices, values, (8, 2), check_invariants=True)
    masked = torch.zeros(8, 1, dtype=torch.bool)
    masked[3] = masked[7] = True

    sparse = leak_figures(grad, masked)
    dense = leak_figures(grad.to_dense(), masked)

    assert sparse.tolist() == dense.tolist()
    assert sparse.tolist() == [2.0, 4.0]  # row 3 sums to (0, 4); row 7 is (3, 0)


# Input checks


def test_watch_mask_rejects_bad_input():
    model = Net()
    keep = random_keep()
    with gradwatch(model, on_alert="ignore") as gw:
        with pytest.raises(ValueError, match="mode must be one of 'zero', 'frozen'"):
            gw.watch_mask(model.fc1.weight, keep, mode="zeros")
        with pytest.raises(ValueError, match="'fc9.weight' is not a parameter"):
            gw.watch_mask("fc9.weight", keep)
        with pytest.raises(ValueError, match="not a parameter of the watched model"):
            gw.watch_mask(model.fc1.weight.detach().clone(), keep)
        with pytest.raises(TypeError, match="got list"):
            gw.watch_mask(model.fc1.weight, keep.tolist())
        with pytest.raises(ValueError, match=r"transpose of the expected mask"):
            gw.watch_mask(model.fc1.weight, keep.T)
        with pytest.raises(ValueError, match=r"shape \(3,\), which does not broadcast"):
            gw.watch_mask(model.fc1.weight, torch.ones(3))
        additive = torch.zeros(HIDDEN, IN).masked_fill(~keep, -torch.inf)
        with pytest.raises(ValueError, match=r"only 0 and 1 .* \[-inf, 0\]"):
            gw.watch_mask(model.fc1.weight, additive)
        with pytest.raises(TypeError, match="in_graph must be True or False"):
            gw.watch_mask(model.fc1.weight, keep, in_graph="yes")
        gw.watch_mask(model.fc1.weight, keep[:, :1])  # broadcasts over columns
    with pytest.raises(RuntimeError, match="until the `with gradwatch"):
        gw.watch_mask(model.fc1.weight, keep)


def test_watch_mask_names_the_pruned_parameter():
    model = Net()
    prune.l1_unstructured(model.fc1, "weight", amount=0.5)
    with (
        gradwatch(model, on_alert="ignore") as gw,
        pytest.raises(ValueError, match="its parameter is `fc1.weight_orig`"),
    ):
        gw.watch_mask("fc1.weight", torch.ones(HIDDEN, IN))


def test_masks_option_is_checked():
    model = Net()
    with pytest.raises(ValueError, match="mask tensors"):
        gradwatch(model, masks={"fc1.weight": [1, 0]})
    with pytest.raises(ValueError, match="track_zeros must be True or False"):
        gradwatch(model, track_zeros=1)
    with pytest.raises(ValueError, match="'fc9.weight' is not a parameter"):
        gradwatch(model, masks={"fc9.weight": torch.ones(3)})


def test_masks_option_watches_like_watch_mask():
    torch.manual_seed(0)
    model = Net()
    keep = random_keep()
    with torch.no_grad():
        model.fc1.weight.mul_(keep)
    gw = fit(model, sgd(model), masks={"fc1.weight": keep})

    assert alert(gw, "mask_revived", "fc1.weight").step == 1
    assert "the masks option" in alert(gw, "mask_revived", "fc1.weight").message


# Plumbing: discovery log, hooks, observation only, TensorBoard


def test_discovery_is_logged_once(caplog):
    torch.manual_seed(0)
    model = Net(MaskedLinear(random_keep()))
    with caplog.at_level(logging.INFO, logger="gradwatch.detectors.masks"):
        fit(model, sgd(model))
    lines = [r.getMessage() for r in caplog.records if "watches" in r.getMessage()]

    assert len(lines) == 1
    assert "`fc1.weight` by buffer `fc1.mask` (in forward" in lines[0]
    assert "% masked" in lines[0]


def mask_hooks(module):
    """Return the forward hooks and pre-hooks the mask checks put on ``module``."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return [h for h in hooks if type(getattr(h, "__self__", None)) is MaskDetector]


def test_models_without_masks_get_no_forward_hooks():
    model = Net()
    with gradwatch(model, on_alert="ignore"):
        assert mask_hooks(model.fc1) == []
        assert mask_hooks(model.fc2) == []


def test_mask_hooks_are_removed_on_exit():
    model = Net(MaskedLinear(random_keep()))
    prune.l1_unstructured(model.fc2, "weight", amount=0.5)
    prune_hook = next(iter(model.fc2._forward_pre_hooks.values()))
    with gradwatch(model, on_alert="ignore"):
        assert len(mask_hooks(model.fc1)) == 1
        assert len(mask_hooks(model.fc2)) == 2  # a pre-hook and a forward hook
        first = next(iter(model.fc2._forward_pre_hooks.values()))
        assert type(first.__self__) is MaskDetector  # runs before prune's hook
    assert mask_hooks(model.fc1) == []
    assert mask_hooks(model.fc2) == []
    assert prune_hook in model.fc2._forward_pre_hooks.values()


def test_checks_switched_off_add_no_hooks():
    model = Net(MaskedLinear(random_keep()))
    with gradwatch(model, checks=["graph_cut"]) as gw:
        assert mask_hooks(model.fc1) == []
        gw.watch_mask(model.fc2.weight, torch.ones(OUT, HIDDEN))
        assert mask_hooks(model.fc2) == []


def test_training_is_bitwise_identical():
    def run(watch):
        torch.manual_seed(0)
        model = Net(MaskedLinear(random_keep(), forward_uses="raw"))
        prune.l1_unstructured(model.fc2, "weight", amount=0.5)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        if watch:
            fit(model, optimizer, track_zeros=True)
        else:
            for step in range(8):
                x, y = batch(step)
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    for watched, plain in zip(run(True), run(False), strict=True):
        assert torch.equal(watched, plain)


def test_tensorboard_scalars_per_masked_parameter(tmp_path):
    torch.manual_seed(0)
    keep = random_keep()
    model = Net(MaskedLinear(keep, forward_uses="raw"))
    fit(model, sgd(model), logdir=tmp_path, log_every=4)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]

    sparsity = events.Scalars("gradwatch/masks/fc1.weight/sparsity")
    leaking = events.Scalars("gradwatch/masks/fc1.weight/leaking")
    assert "gradwatch/masks/fc1.weight/revived" in tags
    assert sparsity[0].value == pytest.approx((~keep).float().mean().item())
    assert leaking[0].value > 0


def test_sparse_gradient_on_masked_rows_leaks():
    torch.manual_seed(0)
    model = Bag(sparse=True)
    optimizer = torch.optim.SparseAdam(list(model.embed.parameters()), lr=1e-2)
    keep = torch.arange(20).unsqueeze(1) < 10
    tokens = torch.tensor([[1, 12, 12, 15, 3]] * 4)
    with gradwatch(model, on_alert="ignore") as gw:
        gw.watch_mask(model.embed.weight, keep, in_graph=True)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(tokens), torch.zeros(4, dtype=torch.long)).backward()
        assert model.embed.weight.grad.is_sparse
        optimizer.step()

    leak = alert(gw, "mask_leak", "embed.weight")
    assert leak.severity == "error"
    assert leak.data["count"] == 2 * 8  # rows 12 and 15, eight dimensions each
    assert leak.data["masked"] == 10 * 8


class HostSyncs(TorchDispatchMode):
    """Count ops that copy a device value to the host (``.item()``, ``bool()``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_forward_sampling_copies_nothing_to_host():
    torch.manual_seed(0)
    model = Net(MaskedLinear(random_keep()))
    prune.l1_unstructured(model.fc2, "weight", amount=0.5)
    x, _ = batch(0)
    with gradwatch(model, on_alert="ignore", checks=["mask_leak", "mask_revived"]):
        with torch.no_grad():
            model.fc2.weight.mul_(2.0)  # a write, so prune's weight is read too
        with HostSyncs() as syncs:
            for _ in range(3):
                model(x)

    assert syncs.count == 0
