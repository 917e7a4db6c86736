"""Host synchronisations per step: one batched transfer, never one per parameter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import gradwatch, transfer

PACKAGE = str(Path(transfer.__file__).parent)
SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def deep_model(layers=20):
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(32, 32), nn.Tanh()]
    return nn.Sequential(*blocks, nn.Linear(32, 4))


@pytest.fixture
def sync_counter(monkeypatch):
    """Count calls of syncing tensor methods made from gradwatch's own code."""
    counts = {"calls": 0}
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(PACKAGE):
                counts["calls"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def test_default_mode_syncs_once_per_step(sync_counter):
    model = deep_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
    per_step = []
    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(40):
            before = sync_counter["calls"]
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            per_step.append(sync_counter["calls"] - before)

    assert gw.step == 40
    tensors = sum(1 for _ in model.parameters())
    assert tensors == 42
    assert sorted(per_step)[len(per_step) // 2] == 1, per_step
    assert max(per_step[5:]) <= 3, per_step


def test_transfer_batches_all_queued_tensors(monkeypatch):
    calls = []
    original = transfer.to_host
    monkeypatch.setattr(
        transfer, "to_host", lambda t: calls.append(t.numel()) or original(t)
    )
    batch = transfer.HostBatch()
    first = batch.add(torch.arange(3.0))
    second = batch.add(torch.tensor(7.0))
    batch.fetch()

    assert calls == [4]
    assert first.values == [0.0, 1.0, 2.0]
    assert second.value == 7.0
