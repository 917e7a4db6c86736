"""Memory: a long run under gradwatch keeps its footprint flat.

The bounds carry a wide margin over what was measured, so the tests catch
per-step growth (a list appended at every step, a kept gradient) and not
allocator noise. Measured on the CPU build of torch 2.13 with one thread, after
200 warm-up steps of the model below: resident memory grew by 0.15 MiB over
3,000 steps without a logdir, and moved within 3 MiB either way with one.
Allocations made at lines of gradwatch's code grew by 20 KiB (75 KiB with a
logdir) over 1,000 steps; most of that is small objects torch itself keeps
from calls such as ``torch.tensor(..., device=...)``, which grow the same way
outside gradwatch.
"""

from __future__ import annotations

import gc
import os
import tracemalloc
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch as gradwatch_package
from gradwatch import gradwatch

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc"
)

WARM_UP_STEPS = 200
MEASURED_STEPS = 1_000
RESIDENT_BOUND_MIB = 16.0
# About 130 bytes a step: one leaked dict, tuple or tensor wrapper per step
# exceeds it, a single leaked float per step does not.
OWN_ALLOCATION_BOUND_KIB = {"memory": 128.0, "tensorboard": 256.0}


def resident_mib():
    """Return this process's resident set size in MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_run():
    """Return a model and a function running one training step of it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)

    def train_step():
        x = torch.randn(32, 64, generator=generator)
        y = torch.randint(10, (32,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return model, train_step


@pytest.mark.parametrize("with_logdir", [False, True], ids=["memory", "tensorboard"])
def test_resident_memory_flat_over_1000_steps(tmp_path, with_logdir):
    model, train_step = make_run()
    logdir = tmp_path if with_logdir else None
    with gradwatch(model, logdir=logdir) as gw:
        for _ in range(WARM_UP_STEPS):
            train_step()
        gc.collect()
        before = resident_mib()
        for _ in range(MEASURED_STEPS):
            train_step()
        gc.collect()
        growth = resident_mib() - before

    assert gw.step == WARM_UP_STEPS + MEASURED_STEPS
    assert growth < RESIDENT_BOUND_MIB, f"resident memory grew by {growth:.1f} MiB"


@pytest.mark.slow
@pytest.mark.parametrize("sink", ["memory", "tensorboard"])
def test_own_allocations_flat_over_1000_steps(tmp_path, sink):
    package = str(Path(gradwatch_package.__file__).parent)
    only_gradwatch = [tracemalloc.Filter(True, f"{package}{os.sep}*")]
    model, train_step = make_run()
    logdir = tmp_path if sink == "tensorboard" else None
    tracing = tracemalloc.is_tracing()
    with gradwatch(model, logdir=logdir):
        for _ in range(WARM_UP_STEPS):
            train_step()
        tracemalloc.start()
        try:
            gc.collect()
            before = tracemalloc.take_snapshot().filter_traces(only_gradwatch)
            for _ in range(MEASURED_STEPS):
                train_step()
            gc.collect()
            after = tracemalloc.take_snapshot().filter_traces(only_gradwatch)
        finally:
            if not tracing:
                tracemalloc.stop()

    differences = after.compare_to(before, "lineno")
    growth = sum(d.size_diff for d in differences) / 1024
    largest = "\n".join(str(d) for d in differences[:5])
    bound = OWN_ALLOCATION_BOUND_KIB[sink]
    assert growth < bound, f"grew by {growth:.0f} KiB:\n{largest}"
