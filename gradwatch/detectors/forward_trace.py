"""Forward tracing on diagnostic steps: which modules ran, and what their outputs reach.

Module hooks cost Python work on every call, so they are installed only on the
first ``graph_walk_steps`` steps and on steps where a detector expects an alert
(:meth:`ForwardTrace.arm`). Everything the trace records is dropped when the next
step begins.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradwatch.detectors.base import Detector, StepContext
from gradwatch.graph import GraphReach, iter_tensors, walk, walk_nodes
from gradwatch.handles import CloseOnRemove, HookSet, eager_hook

if TYPE_CHECKING:
    from gradwatch.config import Options
    from gradwatch.params import ParamInfo, ParamTable

__all__ = ["Cut", "ForwardTrace"]

_KEPT_OUTPUTS = 4


@dataclasses.dataclass
class _Calls:
    """Call counts and output nodes of one module in the traced forwards of a step."""

    grad_calls: int = 0
    nograd_calls: int = 0
    cut_calls: int = 0
    outputs: list[Any] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Cut:
    """Location and kind of the cut between a parameter and the loss.

    ``kind`` is one of:

    - ``"not_called"``: ``module`` never ran in forward;
    - ``"no_grad"``: ``module`` ran with gradient recording off, called from the
      forward of ``caller`` (None when the caller is outside the model);
    - ``"detached"``: the graph is cut inside ``module``'s forward, after its child
      ``caller`` (None when the cut is in ``module``'s own code);
    - ``"after_output"``: the model's output reaches the parameter, the loss does
      not (``module`` is the root, ``""``);
    - ``"unknown"``.
    """

    kind: str
    module: str
    caller: str | None


class ForwardTrace(Detector):
    """Records module calls on diagnostic steps and explains graph cuts."""

    def __init__(
        self,
        options: Options,
        table: ParamTable,
        removal_safe: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__(options)
        self._table = table
        self._removal_safe = removal_safe
        self._model: weakref.ref[nn.Module] | None = None
        self._hooks = HookSet()
        self._names: dict[int, str] = {}
        self._armed = False
        self._active = False
        self._enabled = False
        self._reset()

    def _reset(self) -> None:
        self._calls: dict[str, _Calls] = {}
        self._entries: list[Any] = []
        self._inputs: set[int] = set()
        self._depth = 0
        self._entry_grad = False
        self._reach: dict[str, GraphReach] = {}
        self.traced = False

    def attach(self, model: nn.Module, hooks: HookSet) -> None:
        self._model = weakref.ref(model)
        hooks.add(CloseOnRemove(self))

    def arm(self) -> None:
        """Trace the next step."""
        self._armed = True

    def begin_step(self, step: int) -> None:
        self._reset()
        trace = step < self.options.graph_walk_steps or self._armed
        self._armed = False
        self._enabled = trace
        if trace and not self._active:
            self._install()
        elif not trace and self._active and self._removal_safe():
            # Removing hooks while torch runs the hooks of a module call would make
            # it call a removed hook, so a step that ends inside a forward keeps
            # them, switched off by ``_enabled``.
            self._hooks.remove()
            self._active = False

    def close(self) -> None:
        self._hooks.remove()
        self._active = False
        self._reset()

    def _install(self) -> None:
        model = self._model() if self._model is not None else None
        if model is None:
            return
        self._names = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self._hooks.add(
                module.register_forward_pre_hook(
                    eager_hook(self._pre_hook), with_kwargs=True
                )
            )
            self._hooks.add(
                module.register_forward_hook(
                    eager_hook(self._post_hook), with_kwargs=True, always_call=True
                )
            )
            self._names.setdefault(id(module), name)
        self._active = True

    def _pre_hook(self, module: nn.Module, args: Any, kwargs: Any = None) -> None:
        if not self._enabled:
            return
        self._depth += 1
        if self._depth == 1:
            self._entry_grad = torch.is_grad_enabled()
            if self._entry_grad:
                self._inputs.update(id(t) for t in iter_tensors((args, kwargs)))

    def _post_hook(self, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        if not self._enabled:
            return
        self._depth = max(self._depth - 1, 0)
        if not self._entry_grad:
            return
        self.traced = True
        name = self._names.get(id(module))
        if name is None:
            return
        calls = self._calls.setdefault(name, _Calls())
        if not torch.is_grad_enabled():
            calls.nograd_calls += 1
            return

        calls.grad_calls += 1
        outputs = [t for t in iter_tensors(out) if t.is_floating_point()]
        nodes = [t.grad_fn for t in outputs if t.grad_fn is not None]
        cut = outputs and not any(t.requires_grad for t in outputs)
        if cut and (_has_trainable(module) or _requires_grad((args, kwargs))):
            calls.cut_calls += 1
        calls.outputs = (calls.outputs + nodes)[-_KEPT_OUTPUTS:]
        if self._depth == 0:
            self._entries.extend(t for t in outputs if t.requires_grad)

    # Analysis

    def entry_reach(self) -> GraphReach:
        """Return what the outputs of the traced entry calls reach."""
        if "\0entries" not in self._reach:
            self._reach["\0entries"] = walk(self._entries)
        return self._reach["\0entries"]

    def _module_reach(self, name: str) -> GraphReach:
        if name not in self._reach:
            self._reach[name] = walk_nodes(self._calls[name].outputs)
        return self._reach[name]

    def explain(self, info: ParamInfo) -> Cut | None:
        """Return where ``info`` lost its path to the loss, or None if untraced."""
        if not self.traced:
            return None
        tensor = info.tensor
        if self.entry_reach().reaches(tensor):
            return Cut("after_output", "", None)

        owner = info.module
        calls = self._calls.get(owner)
        if calls is None:
            return Cut("not_called", owner, None)
        if calls.grad_calls == 0:
            return self._no_grad_cut(owner)
        if calls.cut_calls:
            return Cut("detached", owner, None)
        for ancestor in _ancestors(owner):
            if ancestor not in self._calls:
                continue
            if self._calls[ancestor].cut_calls or not self._module_reach(
                ancestor
            ).reaches(tensor):
                return Cut("detached", ancestor, _child_on_path(ancestor, owner))
        return Cut("unknown", owner, None)

    def _no_grad_cut(self, owner: str) -> Cut:
        """Name the outermost module that ran with grad off, and its caller."""
        outermost = owner
        for ancestor in _ancestors(owner):
            calls = self._calls.get(ancestor)
            if calls is None:
                continue
            if calls.grad_calls:
                return Cut("no_grad", outermost, ancestor)
            outermost = ancestor
        return Cut("no_grad", outermost, None)

    def unregistered_leaves(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Return leaves the model's output reaches that it does not register."""
        reach = self.entry_reach()
        strays = {
            key: leaf
            for key, leaf in reach.leaves.items()
            if self._table.get(leaf) is None and key not in self._inputs
        }
        if not strays:
            return {}
        named = _attribute_tensors(model)
        return {name: t for name, t in named.items() if strays.get(id(t)) is t}

    def analyse(self, ctx: StepContext) -> None:
        model = self._model() if self._model is not None else None
        if model is None or not self.traced or not self._entries:
            return
        for name, leaf in self.unregistered_leaves(model).items():
            module, _, attr = name.rpartition(".")
            shape = "x".join(str(d) for d in leaf.shape) or "scalar"
            ctx.alert(
                "unregistered_parameter",
                f"Tensor `{name}` ({shape}) requires grad and takes part in the "
                f"forward at step {ctx.step}, but it is not a registered parameter "
                f"of the model, so `model.parameters()` and usually the optimizer "
                f"never see it. Keep submodules in nn.ModuleList/nn.ModuleDict and "
                f"wrap trainable tensors in nn.Parameter.",
                param=name,
                module=module,
                data={"name": name, "shape": list(leaf.shape)},
            )


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _requires_grad(obj: Any) -> bool:
    return any(t.requires_grad for t in iter_tensors(obj))


def _ancestors(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


def _child_on_path(ancestor: str, owner: str) -> str:
    rest = owner[len(ancestor) :].lstrip(".") if ancestor else owner
    child = rest.split(".")[0]
    return f"{ancestor}.{child}" if ancestor else child


def _attribute_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name the tensors kept in plain attributes, lists and dicts of submodules."""
    named: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr in ("_parameters", "_buffers", "_modules"):
                continue
            path = f"{prefix}.{attr}" if prefix else attr
            named.update(_tensors_in(path, value))
    return named


def _tensors_in(path: str, value: Any) -> dict[str, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return {path: value} if value.requires_grad and value.is_leaf else {}
    if isinstance(value, nn.Module):
        return {f"{path}.{n}": p for n, p in value.named_parameters()}
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return {}
    named: dict[str, torch.Tensor] = {}
    for key, item in items:
        if isinstance(item, torch.Tensor | nn.Module):
            named.update(_tensors_in(f"{path}.{key}", item))
    return named
