"""Variants that run around the training step: gradwatch's modes and its peers.

Each variant is a function ``(workload, tmpdir) -> context manager`` plus the
number of steps between two of its logging events (its cadence), so that a timed
block always contains the same number of events. A peer whose package is missing
raises :class:`MissingPeer` with a note.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from workloads import Workload

from gradwatch import gradwatch


class MissingPeer(RuntimeError):
    """A peer's package is not installed. The message names the package."""


@contextlib.contextmanager
def bare(workload: Workload, tmpdir: Path) -> Iterator[None]:
    yield


def _supported(options: dict[str, Any]) -> dict[str, Any]:
    """Keep the options this version of ``gradwatch()`` accepts."""
    accepted = inspect.signature(gradwatch).parameters
    return {k: v for k, v in options.items() if k in accepted}


def gradwatch_default(workload: Workload, tmpdir: Path):
    return gradwatch(workload.model, on_alert="ignore")


def gradwatch_everything(workload: Workload, tmpdir: Path):
    options = {
        "logdir": tmpdir / "gradwatch",
        "log_every": 1,
        "histogram_every": 1,
        "symmetry_every": 1,
        "activations": True,
        "track_zeros": True,
    }
    return gradwatch(workload.model, on_alert="ignore", **_supported(options))


def _on_each_step(workload: Workload, callback: Callable[[int], None]):
    """Call ``callback(step)`` after each optimizer step of the workload."""
    counter = {"step": 0}

    def hook(optimizer, args, kwargs):
        callback(counter["step"])
        counter["step"] += 1

    return workload.optimizer.register_step_post_hook(hook)


def tensorboard_histograms(every: int):
    @contextlib.contextmanager
    def variant(workload: Workload, tmpdir: Path) -> Iterator[None]:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tmpdir / "histograms"))
        named = list(workload.model.named_parameters())

        def log(step: int) -> None:
            if step % every:
                return
            for name, param in named:
                writer.add_histogram(f"weight/{name}", param, step)
                if param.grad is not None:
                    writer.add_histogram(f"grad/{name}", param.grad, step)

        handle = _on_each_step(workload, log)
        try:
            yield
        finally:
            handle.remove()
            writer.close()

    return variant


def wandb_watch(every: int):
    @contextlib.contextmanager
    def variant(workload: Workload, tmpdir: Path) -> Iterator[None]:
        try:
            import wandb
        except ImportError as err:
            raise MissingPeer("wandb is not installed (pip install wandb)") from err

        os.environ["WANDB_MODE"] = "offline"
        os.environ["WANDB_SILENT"] = "true"
        run = wandb.init(dir=str(tmpdir), project="gradwatch-bench", mode="offline")
        wandb.watch(workload.model, log="all", log_freq=every)
        handle = _on_each_step(workload, lambda step: wandb.log({"step": step}))
        try:
            yield
        finally:
            handle.remove()
            wandb.unwatch(workload.model)
            run.finish()

    return variant


@contextlib.contextmanager
def naive_hooks(workload: Workload, tmpdir: Path) -> Iterator[None]:
    norms: list[float] = []
    handles = [
        p.register_hook(lambda grad: norms.append(grad.norm().item()))
        for p in workload.model.parameters()
        if p.requires_grad
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def detect_anomaly(workload: Workload, tmpdir: Path) -> Iterator[None]:
    # Anomaly mode is global to the process. It is switched on only inside this
    # variant's own steps, because it would slow every other block too.
    step = workload.step

    def anomaly_step() -> None:
        with torch.autograd.detect_anomaly(check_nan=True):
            step()

    workload.step = anomaly_step
    try:
        yield
    finally:
        workload.step = step


#: name -> (variant, cadence in steps)
VARIANTS: dict[str, tuple[Callable[[Workload, Path], Any], int]] = {
    "bare": (bare, 1),
    "gradwatch default": (gradwatch_default, 10),
    "gradwatch everything": (gradwatch_everything, 1),
    "tb add_histogram @1": (tensorboard_histograms(1), 1),
    "tb add_histogram @100": (tensorboard_histograms(100), 100),
    "wandb.watch all @1": (wandb_watch(1), 1),
    "wandb.watch all @100": (wandb_watch(100), 100),
    "naive norm().item() hooks": (naive_hooks, 1),
    "detect_anomaly": (detect_anomaly, 1),
}
