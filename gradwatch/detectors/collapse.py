"""Outputs that became the same for every sample of the batch.

Check: ``representation_collapse``.

On check steps, a forward hook on the model and on each module named in
``watch_outputs`` reduces every training-mode call's output, flattened to
``(batch, features)``, to two figures computed on the device:

- spread: the root of the summed per-feature variance across the batch of the
  L2-normalised outputs, ``sqrt(1 - ||mean of unit rows||**2)``. It is about 1
  for outputs in independent directions and 0 when every sample points the same
  way. It ignores scale, so a large shared offset with little variation counts
  as collapse;
- participation ratio: ``trace(G)**2 / ||G||_F**2`` for the centred batch Gram
  matrix ``G``, an effective rank between 1 and ``min(features, batch - 1)``
  that needs no eigendecomposition.

A call collapsed when its spread is below ``_SPREAD_FLOOR``, or its participation
ratio below ``_RANK_FRACTION`` of the width, and an earlier check saw more than
``_DROP`` times that figure. The module is reported after ``patience`` collapsed
checks in a row.

Limitations:
    Outputs are judged over the batch, so batches of fewer than ``_MIN_BATCH``
    samples, and outputs of fewer than ``_MIN_FEATURES`` features, are
    skipped. Outputs wider than ``_MAX_FEATURES`` are judged on a fixed random
    subset of their features. A collapse present from the first
    step, with no diverse step before it, is not reported. The thresholds were
    set on small siamese models trained on scikit-learn's digits; a model whose
    healthy outputs share one direction more than that may look collapsed.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradwatch.detectors.base import Detector, StepContext
from gradwatch.detectors.units import resolve_modules, schedule_hooks
from gradwatch.graph import iter_tensors
from gradwatch.handles import CloseOnRemove, HookSet, eager_hook

if TYPE_CHECKING:
    from gradwatch.config import Options
    from gradwatch.transfer import Pending

__all__ = ["CollapseDetector", "batch_diversity"]

_MIN_BATCH = 4
#: Outputs narrower than this are not judged: the directions of a few features
#: coincide in healthy models (a 1-D regression output that turns positive for
#: every sample has zero spread).
_MIN_FEATURES = 8
_MAX_FEATURES = 16384
_SPREAD_FLOOR = 0.1
_RANK_FRACTION = 0.05
_DROP = 4.0
_SEED = 0xC011


def batch_diversity(output: torch.Tensor, features: torch.Tensor | None = None):
    """Return ``[spread, participation ratio, width]`` of a batch, on its device.

    Args:
        output: A tensor whose first axis is the batch.
        features: Indices of the flattened features to keep, or None for all.
    """
    x = output.detach().reshape(output.shape[0], -1)
    if features is not None:
        x = x.index_select(1, features)
    x = x.float()
    lengths = x.norm(dim=1, keepdim=True)
    unit = x / lengths.clamp_min(torch.finfo(torch.float32).tiny)
    unit_power = unit.square().sum(dim=1).mean()
    spread = (unit_power - unit.mean(dim=0).square().sum()).clamp_min(0).sqrt()
    centred = x - x.mean(dim=0)
    gram = centred @ centred.T
    # Identical rows give a zero Gram matrix: rank 0, not NaN.
    ratio = (gram.diagonal().sum().square() / gram.square().sum()).nan_to_num(0.0)
    width = min(x.shape[1], x.shape[0] - 1)
    return torch.stack([spread, ratio, torch.tensor(float(width), device=x.device)])


class _History:
    """Figures of one watched module over the checks so far."""

    def __init__(self) -> None:
        self.best_spread = 0.0
        self.best_ratio = 0.0
        self.streak = 0
        self.since = 0


class CollapseDetector(Detector):
    """Report watched outputs that became the same for every sample."""

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self._model: weakref.ref[nn.Module] | None = None
        self._hooks = HookSet()
        self._calls: dict[str, list[torch.Tensor]] = {}
        self._features: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._history: dict[str, _History] = {}
        self._pending: list[tuple[str, Pending]] = []

    def attach(self, model: nn.Module, hooks: HookSet) -> None:
        resolve_modules(model, self.options.watch_outputs)
        self._model = weakref.ref(model)
        hooks.add(CloseOnRemove(self))

    def begin_step(self, step: int) -> None:
        self._calls = {}
        schedule_hooks(self._hooks, step, self.options.symmetry_every, self._install)

    def close(self) -> None:
        self._hooks.remove()
        self._calls = {}
        self._pending = []
        self._features = {}

    def _install(self) -> None:
        model = self._model() if self._model is not None else None
        if model is None:
            return
        watched = {"": model, **resolve_modules(model, self.options.watch_outputs)}
        for name, module in watched.items():
            self._hooks.add(module.register_forward_hook(eager_hook(self._hook(name))))

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            tensor = next(
                (t for t in iter_tensors(output) if t.is_floating_point()), None
            )
            if tensor is None or tensor.dim() < 2 or tensor.shape[0] < _MIN_BATCH:
                return
            if tensor[0].numel() < _MIN_FEATURES:
                return
            with torch.no_grad():
                figures = batch_diversity(tensor, self._subset(tensor))
            self._calls.setdefault(name, []).append(figures)

        return hook

    def _subset(self, tensor: torch.Tensor) -> torch.Tensor | None:
        count = tensor[0].numel()
        if count <= _MAX_FEATURES:
            return None
        key = (count, tensor.device)
        if key not in self._features:
            generator = torch.Generator().manual_seed(_SEED + count)
            chosen = torch.randperm(count, generator=generator)[:_MAX_FEATURES]
            self._features[key] = chosen.sort().values.to(tensor.device)
        return self._features[key]

    def collect(self, ctx: StepContext) -> None:
        self._pending = []
        for name, calls in self._calls.items():
            # Take the maximum over the step's calls, so that the module counts as
            # collapsed only when every call was.
            figures = torch.stack(calls).amax(dim=0)
            self._pending.append((name, ctx.batch.add(figures)))
        self._calls = {}

    def analyse(self, ctx: StepContext) -> None:
        pending, self._pending = self._pending, []
        for name, queued in pending:
            spread, ratio, width = queued.values
            history = self._history.setdefault(name, _History())
            collapsed = (
                spread < _SPREAD_FLOOR and history.best_spread > _DROP * spread
            ) or (ratio < _RANK_FRACTION * width and history.best_ratio > _DROP * ratio)
            if collapsed:
                history.since = ctx.step if not history.streak else history.since
                history.streak += 1
            else:
                history.streak = 0
            history.best_spread = max(history.best_spread, spread)
            history.best_ratio = max(history.best_ratio, ratio)
            if history.streak >= self.options.patience:
                self._alert(ctx, name, history, spread, ratio, width)

    def _alert(self, ctx, name, history, spread, ratio, width) -> None:
        subject = f"The output of `{name}`" if name else "The model's output"
        message = (
            f"{subject} is nearly the same for every sample of the batch "
            f"at {history.streak} checks in a row from step {history.since} to "
            f"{ctx.step}: spread across the batch {spread:.3g} (earlier "
            f"{history.best_spread:.3g}), effective rank {ratio:.3g} of {width:.0f} "
            f"(earlier {history.best_ratio:.3g}). The representation collapsed. "
            f"In siamese or self-supervised training, stop the gradient on one "
            f"branch and add a predictor (SimSiam, BYOL), or add a variance or "
            f"contrastive term to the loss; elsewhere, look for a learning rate "
            f"that is too large or a loss that a constant output minimises."
        )
        ctx.alert(
            "representation_collapse",
            message,
            module=name,
            step=history.since,
            data={
                "spread": spread,
                "earlier_spread": history.best_spread,
                "effective_rank": ratio,
                "earlier_effective_rank": history.best_ratio,
                "width": width,
            },
        )
