"""Exploding and vanishing gradients, judged from per-layer gradient norms.

Checks: ``exploding_gradient``, ``vanishing_gradient``.

Both read the gradient norms that :class:`~gradwatch.stats.GradientNorms`
copies to the host every step, so they cost a few float operations per
parameter and no device work. A "layer" here is a weight tensor: a parameter
with two or more dimensions (Linear, Conv, RNN and attention weights). Biases
and normalisation gains follow their layer's weight and are left out, and so
are the weights of ``nn.Embedding`` and ``nn.EmbeddingBag``, whose gradient
covers only the rows a batch looks up.

- ``exploding_gradient``: a weight's gradient norm exceeds ``explode_factor``
  (default 100) times the median of its own norms over the last
  ``norm_window`` steps (default 50; at least 5 steps of history).
- ``vanishing_gradient``: a weight's RMS gradient per element is taken as its
  median over the last ``norm_window`` steps. The check fires when that is
  below ``vanish_factor`` (default 1e-3) times the model's median layer, also
  taken as a median over those steps, with at least ``patience`` steps of
  history. Comparing each layer with
  the other layers, not with a fixed number, keeps a healthy deep network quiet
  while its early layers get gradients ten times smaller than its last ones.

Exact zeros and non-finite norms are not recorded: ``zero_gradient`` and
``nonfinite_gradient`` report those.

Limitations:
    Vanishing needs at least three weight tensors to compare. A weight used on
    a small part of its rows in every batch (a lookup table that is a plain
    ``nn.Parameter``) has a small RMS gradient and may be reported.
"""

from __future__ import annotations

import math
import statistics
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

from torch import nn

from gradwatch.detectors.base import Detector, StepContext

if TYPE_CHECKING:
    from gradwatch.config import Options
    from gradwatch.handles import HookSet
    from gradwatch.params import ParamInfo

__all__ = ["GradientScaleDetector"]

#: Steps of a weight's own history needed before it can explode.
MIN_HISTORY = 5

#: Weight tensors needed before one can be compared with the others.
MIN_LAYERS = 3

_LISTED = 4
_STATE = "gradient_scale"
_LAYER_STATE = f"{_STATE}.layer"
_SPARSE_LOOKUPS = (nn.Embedding, nn.EmbeddingBag)


#: Once a history contains this many steps, its medians are recomputed only every
#: this many steps: a median over up to ``norm_window`` steps moves slowly, and
#: sorting every history at every step cost about 3 µs per weight.
_MEDIAN_REFRESH = 5


class _History:
    """A weight's recent gradient norms, newest last, and their median.

    The RMS gradient per element is the norm times ``rms_scale``, a constant,
    so the median RMS is the median norm times ``rms_scale`` too.
    """

    __slots__ = ("_stale", "median", "norms", "rms_scale", "streak_start")

    def __init__(self, window: int, numel: int) -> None:
        self.norms: deque[float] = deque(maxlen=window)
        self.rms_scale = 1.0 / math.sqrt(max(numel, 1))
        self.median = math.nan
        self.streak_start: int | None = None
        self._stale = 0

    def append(self, norm: float) -> None:
        """Add a norm, and refresh the median (every few steps once history is long)."""
        self.norms.append(norm)
        self._stale += 1
        if len(self.norms) < 2 * _MEDIAN_REFRESH or self._stale >= _MEDIAN_REFRESH:
            self.median = statistics.median(self.norms)
            self._stale = 0

    @property
    def rms(self) -> float:
        """The latest RMS gradient per element."""
        return self.norms[-1] * self.rms_scale


#: Stored in place of a history for tensors that are not layers (biases, gains,
#: embedding tables), so that each tensor is classified once.
_NOT_A_LAYER = object()

_Layer = tuple["ParamInfo", float, _History]


class GradientScaleDetector(Detector):
    """Compare each layer's gradient norm with its history and with the others."""

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self._model: weakref.ref[nn.Module] | None = None
        self._model_rms: deque[float] = deque(maxlen=options.norm_window)
        self._vanish_subject: str | None = None

    def attach(self, model: nn.Module, hooks: HookSet) -> None:
        self._model = weakref.ref(model)

    def analyse(self, ctx: StepContext) -> None:
        exploding = self.options.enabled("exploding_gradient")
        vanishing = self.options.enabled("vanishing_gradient")
        if not (exploding or vanishing):
            return
        layers = self._layers(ctx)
        if not layers:
            return
        if exploding:
            self._check_exploding(ctx, layers)
        for _, norm, history in layers:
            history.append(norm)
        if vanishing:
            self._check_vanishing(ctx, layers)

    def close(self) -> None:
        self._model = None

    # Selection

    def _layers(self, ctx: StepContext) -> list[_Layer]:
        """Return the judged weights with a finite, nonzero gradient norm."""
        layers = []
        norms = ctx.grad_norms
        isfinite = math.isfinite
        for info in ctx.judged:
            norm = norms.get(id(info.tensor))
            if norm is None or norm == 0.0 or not isfinite(norm):
                continue
            history = info.state.get(_STATE)
            if history is None:
                history = self._history(info)
            if history is not _NOT_A_LAYER:
                layers.append((info, norm, history))
        return layers

    def _is_layer(self, info: ParamInfo) -> bool:
        cached = info.state.get(_LAYER_STATE)
        if cached is None:
            cached = info.tensor.dim() >= 2 and not self._is_lookup(info.module)
            info.state[_LAYER_STATE] = cached
        return bool(cached)

    def _is_lookup(self, module_name: str) -> bool:
        model = self._model() if self._model is not None else None
        if model is None:
            return False
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        return isinstance(module, _SPARSE_LOOKUPS)

    def _history(self, info: ParamInfo) -> Any:
        """Return the history of a weight, or ``_NOT_A_LAYER`` for other tensors."""
        history = info.state.get(_STATE)
        if not isinstance(history, _History):
            history = _NOT_A_LAYER
            if self._is_layer(info):
                history = _History(self.options.norm_window, info.tensor.numel())
            info.state[_STATE] = history
        return history

    # Exploding

    def _check_exploding(self, ctx: StepContext, layers: list[_Layer]) -> None:
        factor = self.options.explode_factor
        for info, norm, history in layers:
            if len(history.norms) < MIN_HISTORY:
                continue
            median = history.median
            if norm > factor * median:
                total = math.sqrt(sum(n * n for _, n, _ in layers))
                self._alert_exploding(
                    ctx, info, norm, median, len(history.norms), total
                )

    def _alert_exploding(
        self,
        ctx: StepContext,
        info: ParamInfo,
        norm: float,
        median: float,
        steps: int,
        total: float,
    ) -> None:
        ratio = norm / median
        ctx.alert(
            "exploding_gradient",
            f"Gradient norm of {info.describe()} in module "
            f"`{info.module or '<root>'}` is {norm:.3g} at step {ctx.step}, "
            f"{ratio:.0f} times its median of {median:.3g} over the previous "
            f"{steps} steps (explode_factor {self.options.explode_factor:g}); the "
            f"norm over all layers is {total:.3g}. Clip gradients with "
            f"torch.nn.utils.clip_grad_norm_ before optimizer.step(), lower the "
            f"learning rate, or add warmup; in recurrent nets check the recurrent "
            f"weights' initialisation.",
            param=info,
            data={"norm": norm, "median": median, "ratio": ratio, "global": total},
        )

    # Vanishing

    def _check_vanishing(self, ctx: StepContext, layers: list[_Layer]) -> None:
        if len(layers) < MIN_LAYERS:
            return
        self._model_rms.append(statistics.median(h.rms for _, _, h in layers))
        reference = statistics.median(self._model_rms)

        low: list[tuple[ParamInfo, float]] = []
        for info, _, history in layers:
            ratio = history.median * history.rms_scale / reference
            waking = _growing(history.norms, self.options.patience)
            if ratio >= self.options.vanish_factor or waking:
                history.streak_start = None
                continue
            if history.streak_start is None:
                history.streak_start = ctx.step
            if len(history.norms) >= self.options.patience:
                low.append((info, ratio))
        subject = self._vanish_subject
        if subject is not None and all(i.name != subject for i, _, _ in layers):
            # Its gradient became exactly zero (underflow): it did not recover.
            low += [
                (info, 0.0) for info in ctx.judged if info.name == self._vanish_subject
            ]
        if low:
            self._alert_vanishing(ctx, low, len(layers), reference)

    def _alert_vanishing(
        self,
        ctx: StepContext,
        low: list[tuple[ParamInfo, float]],
        count: int,
        reference: float,
    ) -> None:
        # One alert for the whole model names its weakest layer. The subject stays
        # while that layer stays low, so later steps update the same alert.
        names = {info.name: (info, ratio) for info, ratio in low}
        if self._vanish_subject in names:
            info, ratio = names[self._vanish_subject]
        else:
            info, ratio = min(low, key=lambda item: item[1])
            self._vanish_subject = info.name
        low = [item for item in low if item[1] > 0.0] or low
        listed = ", ".join(f"`{i.name}`" for i, _ in low[:_LISTED])
        if len(low) > _LISTED:
            listed += f" and {len(low) - _LISTED} more"
        history = self._history(info)
        first = history.streak_start if history.streak_start is not None else ctx.step
        ctx.alert(
            "vanishing_gradient",
            f"Gradient of {info.describe()} in module `{info.module or '<root>'}` "
            f"is {ratio:.1e} times that of the model's median layer (RMS per "
            f"element, median over the last {len(history.norms)} steps; "
            f"vanish_factor {self.options.vanish_factor:g}), so it barely learns. "
            f"{len(low)} of {count} weight tensors are this far below: {listed}. "
            f"Saturating activations (sigmoid, tanh) in a deep stack or a poor "
            f"initialisation shrink the gradient layer by layer; use ReLU or GELU "
            f"with Kaiming initialisation, or add normalisation or residual "
            f"connections.",
            param=info,
            step=first,
            data={
                "ratio": ratio,
                "median_layer_rms": reference,
                "params": [i.name for i, _ in low],
            },
        )


def _growing(norms: deque[float], steps: int) -> bool:
    """Return whether the gradient at least doubled over the last ``steps`` steps.

    A layer behind a zero-initialised one (the first layer of a residual branch
    whose last layer starts at zero) has a gradient that starts at zero and grows
    as that layer learns. Such a layer is waking up, not vanishing.
    """
    return len(norms) >= steps and norms[-1] > 2.0 * norms[-steps]
