"""Alert messages of the mask checks, and the search for why masked entries moved."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from gradwatch.masks.watch import MaskWatch, count_revived

if TYPE_CHECKING:
    from gradwatch.params import ParamInfo

__all__ = ["Diagnosis", "diagnose", "leak_message", "revival_message"]

#: Optimizer state entries that do not move a parameter when its gradient is
#: zero: second moments, accumulators and step counters (Adam, Adagrad, RMSprop,
#: Adadelta, Adamax, Rprop, ASGD).
_NON_MOVING_STATE = frozenset(
    {
        "exp_avg_sq",
        "max_exp_avg_sq",
        "square_avg",
        "sum",
        "exp_inf",
        "acc_delta",
        "step",
        "eta",
        "mu",
        "ax",
        "prev",
        "step_size",
    }
)


@dataclasses.dataclass
class Diagnosis:
    """The causes of a revival, with the fix of each.

    Attributes:
        causes: Short ids: ``"gradient"``, ``"optimizer_state"``,
            ``"weight_decay"``, ``"direct_write"`` or ``"unknown"``.
        text: The causes and fixes, as sentences for the alert message.
    """

    causes: list[str]
    text: str


def leak_message(
    watch: MaskWatch, info: ParamInfo, count: int, masked: int, peak: float, step: int
) -> str:
    """Describe a gradient on masked entries, and what it means for this mask."""
    head = (
        f"{count} of {masked} masked entries ({count / max(masked, 1):.1%}) of "
        f"{info.describe()} received a nonzero gradient at step {step} "
        f"(max |grad| {peak:.3g})."
    )
    if watch.source == "prune":
        effective = f"`{watch.target_name}`"
        return (
            f"{head} torch.nn.utils.prune computes {effective} = `{info.name}` * "
            f"`{watch.target_name}_mask` before each forward, so a masked entry's "
            f"gradient is exactly zero unless some code reads `{info.name}` "
            f"directly. Fix: read {effective} in forward and in every loss term, "
            f"never `{info.name}`."
        )
    if watch.in_graph:
        return (
            f"{head} The {watch.label} masks them in forward, which gives masked "
            f"entries an exactly zero gradient, so some path bypasses the mask: the "
            f"forward reads the raw `{info.name}` in place of the masked weight, "
            f"the mask is transposed or applied to another tensor, or the raw "
            f"weight also enters the loss (a regularizer). Fix: multiply by the "
            f"mask wherever the weight is read, as in "
            f"F.linear(x, self.weight * self.mask, self.bias)."
        )
    kept = "zero" if watch.mode == "zero" else "at their registered values"
    return (
        f"{head} The mask ({watch.label}) is enforced by value, not in forward, so "
        f"this is expected as long as masked entries are {kept} at every forward; "
        f"mask_revived reports a forward where they are not. To keep gradient off "
        f"masked entries, multiply by the mask in forward or mask the gradient "
        f"with param.register_hook(lambda g: g * mask)."
    )


def revival_message(
    watch: MaskWatch,
    info: ParamInfo,
    count: int,
    masked: int,
    step: int,
    diagnosis: Diagnosis,
) -> str:
    """Describe masked entries that broke the mask at a forward, with the cause."""
    share = f"{count} of {masked} masked entries ({count / max(masked, 1):.1%})"
    modules = _module_names(info)
    if watch.source == "prune":
        return (
            f"{share} of the effective tensor `{watch.target_name}` were nonzero "
            f"when {modules} was about to run forward at step {step}, although "
            f"{watch.label} masks them. {diagnosis.text}"
        )
    if watch.mode == "frozen":
        state = "had moved from the values they held when the mask was registered"
    else:
        state = "were nonzero"
    return (
        f"{share} of {info.describe()} {state} when {modules} ran forward at step "
        f"{step} (mask: {watch.label}, mode {watch.mode!r}). {diagnosis.text}"
    )


def _module_names(info: ParamInfo) -> str:
    names = sorted({name.rpartition(".")[0] or "<root>" for name in info.names})
    return ", ".join(f"`{name}`" for name in names)


def diagnose(
    watch: MaskWatch,
    info: ParamInfo,
    optimizers: list[torch.optim.Optimizer],
    masked: torch.Tensor,
) -> Diagnosis:
    """Find why masked entries of ``watch`` moved; reads the optimizer state.

    This copies a few counts to the host, so it runs once per mask, when its
    revival is first reported.
    """
    if watch.source == "prune":
        return _direct_write(watch, info)
    causes: list[str] = []
    parts: list[str] = []
    holders = [o for o in optimizers if _holds(o, info.tensor)]
    moving = _moving_state(holders, info.tensor, masked)
    if watch.first_leak_step is not None:
        causes.append("gradient")
        parts.append(_gradient_cause(watch, moving))
    elif moving:
        causes.append("optimizer_state")
        parts.append(_state_cause(watch, moving))
    decay = _weight_decay(holders, info.tensor)
    if decay and watch.mode == "frozen":
        causes.append("weight_decay")
        parts.append(_decay_cause(decay))
    if not causes:
        causes.append("unknown")
        parts.append(_unknown_cause(watch))
    return Diagnosis(causes, " ".join(parts))


def _direct_write(watch: MaskWatch, info: ParamInfo) -> Diagnosis:
    module, _, base = (watch.target_name or "").rpartition(".")
    text = (
        f"Code wrote into `{watch.target_name}` directly; torch.nn.utils.prune "
        f"recomputes it from `{info.name}` before each forward, so the write is "
        f"lost, and any use of the tensor before that forward sees the unmasked "
        f"values. Fix: write into `{info.name}` under torch.no_grad(), or call "
        f"prune.remove({module or 'model'}, {base!r}) before writing and prune again "
        f"afterwards."
    )
    return Diagnosis(["direct_write"], text)


def _gradient_cause(watch: MaskWatch, moving: list[tuple[str, str, int]]) -> str:
    restore = "re-zero" if watch.mode == "zero" else "restore"
    text = (
        f"The gradient leaked: masked entries have received a nonzero gradient "
        f"since step {watch.first_leak_step}, and the optimizer moved them. Fix: "
        f"multiply by the mask in forward (weight * mask, or torch.nn.utils.prune), "
        f"or mask the gradient (param.register_hook(lambda g: g * mask)) and "
        f"{restore} masked entries under torch.no_grad() after every "
        f"optimizer.step()."
    )
    if moving:
        _, key, _ = moving[0]
        text += (
            f" The optimizer state took in the leaked gradient too, so also zero "
            f"it at masked entries (optimizer.state[param][{key!r}].mul_(mask))."
        )
    return text


def _state_cause(watch: MaskWatch, moving: list[tuple[str, str, int]]) -> str:
    listed = ", ".join(f"`{key}` of {opt} ({n} entries)" for opt, key, n in moving)
    _, key, _ = moving[0]
    restore = "re-applying the mask" if watch.mode == "zero" else "restoring them"
    return (
        f"The optimizer moved entries whose gradient was zero: its state is nonzero "
        f"at masked entries ({listed}), left from before the mask was set or "
        f"changed (momentum, Adam moments). Fix: when you set or change the mask, "
        f"zero the state there (optimizer.state[param][{key!r}].mul_(mask)) or "
        f"rebuild the optimizer; {restore} under torch.no_grad() after every "
        f"optimizer.step() also works."
    )


def _decay_cause(decay: list[tuple[str, float]]) -> str:
    listed = ", ".join(f"{opt} weight_decay={wd:g}" for opt, wd in decay)
    return (
        f"The optimizer moved entries whose gradient was zero: weight decay "
        f"({listed}) shrinks every entry of the parameter, frozen ones included. "
        f"Fix: set weight_decay=0 in this parameter's param group and add the decay "
        f"through the gradient, masked (param.grad.add_(wd * param * mask) before "
        f"optimizer.step()), or restore masked entries after every step."
    )


def _unknown_cause(watch: MaskWatch) -> str:
    if watch.mode == "frozen":
        return (
            "No gradient reached them and no optimizer state or weight decay moves "
            "them, so code outside the optimizer wrote into them. Fix: find that "
            "write, or restore masked entries before the next forward."
        )
    return (
        "No gradient reached them and no optimizer state moves them: they were "
        "nonzero when the mask was registered or last changed, or code outside "
        "the optimizer wrote into them. Fix: zero them under torch.no_grad() "
        "(param.mul_(mask)) whenever the mask is set or changed."
    )


def _holds(optimizer: torch.optim.Optimizer, tensor: torch.Tensor) -> bool:
    return any(p is tensor for g in optimizer.param_groups for p in g["params"])


def _moving_state(
    optimizers: list[torch.optim.Optimizer],
    tensor: torch.Tensor,
    masked: torch.Tensor,
) -> list[tuple[str, str, int]]:
    found = []
    for optimizer in optimizers:
        state = optimizer.state.get(tensor) or {}
        for key, value in state.items():
            if key in _NON_MOVING_STATE or not isinstance(value, torch.Tensor):
                continue
            if value.is_sparse or value.shape != tensor.shape:
                continue
            count = int(count_revived(value, masked, None))
            if count:
                found.append((type(optimizer).__name__, key, count))
    return found


def _weight_decay(
    optimizers: list[torch.optim.Optimizer], tensor: torch.Tensor
) -> list[tuple[str, float]]:
    found = []
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            decay = group.get("weight_decay", 0) or 0
            if decay and any(p is tensor for p in group["params"]):
                found.append((type(optimizer).__name__, float(decay)))
    return found
