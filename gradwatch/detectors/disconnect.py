"""Parameters that never, or no longer, receive a usable gradient.

Checks: ``unused_parameter``, ``gradient_stopped``, ``zero_gradient`` and
``graph_cut`` (where the path from the loss to the parameter is cut).

Limitations:
    A parameter is judged only at the steps of an optimizer that contains it (every
    step when no optimizer contains it), so a generator and a discriminator that step
    alternately are each judged on their own steps. Once some parameters of the
    model get gradients on some steps only (layer drop, sampled task heads,
    mixture experts), a parameter must go without a gradient for as many steps
    as the least used of them could skip by chance before it counts as unused,
    so a truly unused layer in such a model is reported later (about 19 steps
    when the least used branch runs every other step). In a model whose every
    step uses the same parameters, ``patience`` steps suffice. Until some
    parameter has both received and missed a gradient, nothing shows that the
    forward changes between steps: a head sampled at random that is not drawn
    in the first ``patience`` steps while the others are drawn at every step
    (one of two heads, drawn the same for three steps: one run in four) is
    reported unused. Raise ``patience`` for such models.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING

from gradwatch.detectors.base import Detector, StepContext
from gradwatch.detectors.forward_trace import Cut, ForwardTrace

if TYPE_CHECKING:
    from gradwatch.config import Options
    from gradwatch.params import ParamInfo

__all__ = ["DisconnectDetector"]


@dataclasses.dataclass
class _Arrivals:
    """Gradient arrivals of one parameter, counted over the steps it was judged."""

    judged: int = 0
    arrived: int = 0
    gap: int = 0
    arrived_before_gap: int = 0
    judged_before_gap: int = 0
    zero_streak: int = 0
    alerted: bool = False


class DisconnectDetector(Detector):
    """Track which parameters receive gradients and flag those that do not."""

    def __init__(self, options: Options, trace: ForwardTrace) -> None:
        super().__init__(options)
        self._trace = trace
        self._cuts: dict[str, tuple[Cut, list[str]]] = {}
        self._unused_after = options.patience

    def analyse(self, ctx: StepContext) -> None:
        # The median is needed only for a gradient that may count as zero.
        median = functools.cache(lambda: _median_positive(ctx.grad_norms.values()))
        self._cuts = {}
        arrived = ctx.table.arrived
        if any(id(info.tensor) not in arrived for info in ctx.judged):
            self._unused_after = self._unused_threshold(ctx)
        arm = False
        for info in ctx.judged:
            state = info.state.get("arrivals")
            if state is None:
                state = info.state["arrivals"] = _Arrivals()
            assert isinstance(state, _Arrivals)
            state.judged += 1
            if id(info.tensor) in arrived:
                self._on_arrival(ctx, info, state, median)
            else:
                self._on_miss(ctx, info, state)
                arm |= state.gap + 1 >= self._threshold(state) and not state.alerted
        self._report_cuts(ctx)
        if arm:
            self._trace.arm()

    # Arrival and miss bookkeeping

    def _on_arrival(
        self,
        ctx: StepContext,
        info: ParamInfo,
        state: _Arrivals,
        median: Callable[[], float],
    ) -> None:
        state.arrived += 1
        state.gap = 0
        state.alerted = False
        norm = ctx.grad_norms.get(id(info.tensor))
        if norm is None or not self._negligible(ctx, info, norm, median):
            state.zero_streak = 0
            return
        state.zero_streak += 1
        if state.zero_streak >= self.options.patience:
            self._alert_zero(ctx, info, state, norm, median())

    def _on_miss(self, ctx: StepContext, info: ParamInfo, state: _Arrivals) -> None:
        if state.gap == 0:
            state.arrived_before_gap = state.arrived
            state.judged_before_gap = state.judged - 1
        state.gap += 1
        state.zero_streak = 0
        if state.arrived == 0:
            conditional = self._unused_after > self.options.patience
            short_session = (
                ctx.final and ctx.steps_seen < self.options.patience and not conditional
            )
            if state.judged >= self._unused_after or short_session:
                self._alert_unused(ctx, info, state)
        elif state.gap >= self._threshold(state):
            self._alert_stopped(ctx, info, state)

    def _threshold(self, state: _Arrivals) -> int:
        """Return the gap, in judged steps, after which a gradient counts as stopped.

        A parameter that received a gradient in a fraction f of its earlier n
        steps misses k steps in a row by chance with probability about
        (1 - f)^k at each step, so about n (1 - f)^k times over the run. The gap
        must make that expected count smaller than ``stop_confidence``. Counting
        the whole run keeps a layer dropped at random from tripping the check
        in a long run. The estimate f = arrivals / (n + 1) is never 1, so a short
        history asks for a long gap, and a parameter that always had a gradient
        needs about ``patience``.
        """
        if state.arrived == 0:
            return self._unused_after
        arrived, judged = state.arrived_before_gap, state.judged_before_gap
        if state.gap == 0:
            arrived, judged = state.arrived, state.judged
        return self._gap_for_rate(arrived, judged)

    def _gap_for_rate(self, arrived: int, judged: int) -> int:
        """Return the gap for ``arrived`` arrivals in ``judged`` steps (arrived > 0)."""
        miss_rate = 1.0 - arrived / (judged + 1)
        chance = self.options.stop_confidence / max(judged, 1)
        needed = math.log(chance) / math.log(miss_rate)
        return max(self.options.patience, math.ceil(needed))

    def _unused_threshold(self, ctx: StepContext) -> int:
        """Return the steps without any gradient after which a parameter is unused.

        If the model has intermittent parameters (some gradients, some misses,
        not yet reported), its forward takes different paths on different steps,
        and a parameter never reached so far may sit on a path not yet drawn. It
        is then held to the gap of the least used intermittent parameter. A stopped
        parameter drops out once reported, so it cannot delay this forever. The
        counts include the step being analysed.
        """
        rates = []
        for info in ctx.judged:
            state = info.state.get("arrivals")
            if not isinstance(state, _Arrivals) or state.alerted:
                continue
            arrived = state.arrived + ctx.arrived(info)
            judged = state.judged + 1
            if 0 < arrived < judged:
                rates.append((arrived / (judged + 1), arrived, judged))
        if not rates:
            return self.options.patience
        _, arrived, judged = min(rates)
        return self._gap_for_rate(arrived, judged)

    def _negligible(
        self,
        ctx: StepContext,
        info: ParamInfo,
        norm: float,
        median: Callable[[], float],
    ) -> bool:
        """Return whether a gradient norm counts as zero.

        A 1-D parameter counts only when exactly zero: a bias followed by batch
        normalisation, or a key bias under softmax, has a gradient that is zero in
        exact arithmetic and rounding residue in floating point, by design.
        """
        if norm == 0.0:
            return True
        if info.tensor.dim() < 2:
            return False
        tol = self.options.zero_tol
        own = ctx.param_norms.get(id(info.tensor), 0.0)
        return norm <= tol * own and norm <= tol * median()

    # Alerts

    def _alert_unused(self, ctx: StepContext, info: ParamInfo, state: _Arrivals):
        state.alerted = True
        cut = self._trace.explain(info)
        first = ctx.step - state.judged + 1
        message = (
            f"Parameter {info.describe()} in module `{info.module or '<root>'}` "
            f"has received no gradient{_on_every_rank(ctx)} since step {first}. "
            f"{_cause(cut, info)}"
        )
        ctx.alert(
            "unused_parameter",
            message,
            param=info,
            step=first,
            ranks=ctx.ranks_without(info),
            data=_with_cause(
                {"steps_without_gradient": state.judged, "names": info.names}, cut
            ),
        )
        self._note_cut(cut, info)

    def _alert_stopped(self, ctx: StepContext, info: ParamInfo, state: _Arrivals):
        state.alerted = True
        cut = self._trace.explain(info)
        last = ctx.step - state.gap
        message = (
            f"Parameter {info.describe()} in module `{info.module or '<root>'}` "
            f"received gradients in "
            f"{state.arrived} earlier step(s), the last at step {last}, and none"
            f"{_on_every_rank(ctx)} in the {state.gap} step(s) since. "
            f"{_cause(cut, info)} A branch no longer "
            f"taken, an expert that gets no tokens, or a `no_grad`/`detach` added "
            f"mid-run cause this; freeze the parameter with requires_grad_(False) "
            f"or pass it in `ignore` if it is meant to stop learning."
        )
        ctx.alert(
            "gradient_stopped",
            message,
            param=info,
            step=last + 1,
            ranks=ctx.ranks_without(info),
            data=_with_cause(
                {"last_gradient_step": last, "steps_without_gradient": state.gap}, cut
            ),
        )
        self._note_cut(cut, info)

    def _alert_zero(
        self,
        ctx: StepContext,
        info: ParamInfo,
        state: _Arrivals,
        norm: float,
        median: float,
    ) -> None:
        size = "exactly zero" if norm == 0.0 else f"negligible (norm {norm:.3g})"
        message = (
            f"Parameter {info.describe()} in module `{info.module or '<root>'}` "
            f"receives a gradient, but it has been {size} for {state.zero_streak} "
            f"step(s) up to step {ctx.step}; the median gradient norm "
            f"of the model is {median:.3g}. The path from the loss reaches it only "
            f"through operations with zero derivative: a constant (a weight "
            f"normalised to 1, a zero-initialised layer on both sides, a saturated "
            f"or dead activation, a loss term multiplied by 0) or a loss that does "
            f"not change with it (a bias that cancels in the difference of two "
            f"outputs of one tower)."
        )
        ctx.alert(
            "zero_gradient",
            message,
            param=info,
            step=ctx.step - state.zero_streak + 1,
            data={
                "grad_norm": norm,
                "median_grad_norm": median,
                "steps": state.zero_streak,
            },
        )

    def _note_cut(self, cut: Cut | None, info: ParamInfo) -> None:
        if cut is not None and cut.kind in _CUT_TEXT:
            _, orphans = self._cuts.setdefault(cut.module, (cut, []))
            orphans.extend(info.names)

    def _report_cuts(self, ctx: StepContext) -> None:
        for module, (cut, orphans) in self._cuts.items():
            shown = ", ".join(f"`{n}`" for n in orphans[:8])
            more = f" and {len(orphans) - 8} more" if len(orphans) > 8 else ""
            ctx.alert(
                "graph_cut",
                f"{_where(cut)}: {_CUT_TEXT[cut.kind]} It orphans {shown}{more}.",
                module=module,
                data={"kind": cut.kind, "orphaned": orphans, "caller": cut.caller},
            )


_CUT_TEXT = {
    "no_grad": (
        "a submodule runs with gradient recording off (`torch.no_grad()`, "
        "`torch.inference_mode()`, or re-entrant `torch.utils.checkpoint` whose "
        "inputs do not require grad). Run it with grad enabled, pass "
        "`use_reentrant=False` to checkpoint, or freeze it with "
        "requires_grad_(False) if it is not meant to learn."
    ),
    "detached": (
        "its forward turns a tensor that requires grad into one that does not "
        "(`.detach()`, `.item()`, `.numpy()`, `torch.tensor(...)` or `.data`). "
        "Keep the computation in torch tensors from the parameters to the output."
    ),
    "after_output": (
        "the output depends on these parameters, but backward from the loss never "
        "reaches them, so the loss code breaks the graph (`.item()`, "
        "`.detach()`, `.numpy()` or re-wrapping with `torch.tensor(...)`). Build "
        "the loss from the output tensors."
    ),
}


def _cause(cut: Cut | None, info: ParamInfo) -> str:
    if cut is None or cut.kind == "unknown":
        return (
            "Check that its module is called in forward, that no `.detach()`, "
            "`torch.no_grad()` or `.item()` sits between it and the loss, or freeze "
            "it with requires_grad_(False) if it is not meant to learn."
        )
    if cut.kind == "not_called":
        return (
            f"Module `{cut.module or '<root>'}` was never called in forward: it is "
            f"defined but unused (or only called on paths not taken). Call it, or "
            f"delete it or freeze it if it is not needed."
        )
    return f"{_where(cut)}: {_CUT_TEXT[cut.kind]}"


def _where(cut: Cut) -> str:
    """Describe where ``cut`` sits, as the start of a sentence."""
    module = f"`{cut.module or '<root>'}`"
    if cut.kind == "no_grad":
        caller = "outside the model"
        if cut.caller is not None:
            caller = f"from the forward of `{cut.caller or '<root>'}`"
        return f"Module {module} is called with gradient recording off {caller}"
    if cut.kind == "detached":
        after = f" after calling `{cut.caller}`" if cut.caller else ""
        return f"The graph is cut inside the forward of {module}{after}"
    return "The loss is cut from the model's output"


def _on_every_rank(ctx: StepContext) -> str:
    """Say that arrivals were combined across ranks, when they were."""
    if ctx.arrival_ranks is None:
        return ""
    return f" on any of the {len(ctx.world_ranks)} ranks"


def _with_cause(data: dict, cut: Cut | None) -> dict:
    """Add the cut's kind; a repeat without a traced forward keeps the first one."""
    if cut is not None:
        data["cause"] = cut.kind
    return data


def _median_positive(norms) -> float:
    positive = [n for n in norms if n > 0.0 and math.isfinite(n)]
    return statistics.median(positive) if positive else 0.0
