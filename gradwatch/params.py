"""The watched parameters: names, owning modules, and gradient arrival."""

from __future__ import annotations

import dataclasses
import fnmatch
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from gradwatch.handles import HookSet

__all__ = ["ParamInfo", "ParamTable"]


@dataclasses.dataclass(eq=False)
class ParamInfo:
    """One parameter tensor of the model, under every name it has (tied weights).

    ``state`` is where detectors keep their per-parameter figures, keyed by
    detector; it survives rescans for as long as the tensor stays in the model.
    """

    tensor: nn.Parameter
    names: list[str]
    ignored: bool = False
    state: dict[str, object] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def trainable(self) -> bool:
        return self.tensor.requires_grad and not self.ignored

    def describe(self) -> str:
        """Return ``name`` with its shape, and its other names when it is tied."""
        shape = "x".join(str(d) for d in self.tensor.shape) or "scalar"
        text = f"`{self.name}` ({shape})"
        if len(self.names) > 1:
            text += " tied with " + ", ".join(f"`{n}`" for n in self.names[1:])
        return text


class ParamTable:
    """The parameters of a model, rescanned when the model changes.

    A post-accumulate-grad hook on each trainable tensor records that a gradient
    arrived; the hook does one set insertion and nothing else.
    """

    def __init__(self, model: nn.Module, ignore: tuple[str, ...] = ()) -> None:
        self._model = weakref.ref(model)
        self._ignore = ignore
        self._infos: dict[int, ParamInfo] = {}
        self._hooks = HookSet()
        self._past = weakref.WeakValueDictionary[int, torch.Tensor]()
        self._module_ids: set[int] = set()
        self.arrived: set[int] = set()
        self.dirty = True
        self._trainable: list[ParamInfo] = []
        self._tensors: list[nn.Parameter] = []
        self._grad_flags: list[bool] | None = None
        self.generation = 0

    def contains_module(self, module: nn.Module) -> bool:
        """Return whether ``module`` was part of the model at the last scan."""
        return id(module) in self._module_ids

    def __iter__(self) -> Iterator[ParamInfo]:
        return iter(self._infos.values())

    def __len__(self) -> int:
        return len(self._infos)

    def get(self, tensor: torch.Tensor) -> ParamInfo | None:
        info = self._infos.get(id(tensor))
        return info if info is not None and info.tensor is tensor else None

    def was_parameter(self, tensor: torch.Tensor) -> bool:
        """Return whether ``tensor`` is or once was a parameter of the model."""
        return self._past.get(id(tensor)) is tensor

    def scan(self) -> None:
        """Re-read the model's parameters, keeping the state of those that stay."""
        model = self._model()
        if model is None:
            return
        self._module_ids = {id(m) for m in model.modules()}
        names: dict[int, list[str]] = {}
        tensors: dict[int, nn.Parameter] = {}
        for name, tensor in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(tensor), []).append(name)
            tensors[id(tensor)] = tensor

        infos = {}
        for key, tensor in tensors.items():
            info = self.get(tensor) or ParamInfo(tensor, names[key])
            info.names = names[key]
            info.ignored = self._is_ignored(info.names)
            infos[key] = info
            self._past[key] = tensor
        for key in set(self._hooks.keys()) - infos.keys():
            self._hooks.discard(key)
            self.arrived.discard(key)
        self._infos = infos
        self._tensors = [info.tensor for info in infos.values()]
        self._grad_flags = None
        self.generation += 1
        self.dirty = False
        self.watch_arrivals()

    def watch_arrivals(self) -> None:
        """Hook every trainable tensor that is not hooked yet.

        Only a change of some tensor's ``requires_grad`` since the last call
        (unfreezing) or a rescan can add one, so an unchanged model costs one
        pass over the flags.
        """
        self.trainable()

    def trainable(self) -> list[ParamInfo]:
        """Return the trainable, not ignored parameters, in model order.

        The list is the same object from call to call until a rescan or a change
        of some tensor's ``requires_grad``, so callers may cache what they derive
        from it by its identity.
        """
        flags = [tensor.requires_grad for tensor in self._tensors]
        if flags != self._grad_flags:
            self._grad_flags = flags
            for info in self._infos.values():
                self._watch(info.tensor)
            self._trainable = [info for info in self._infos.values() if info.trainable]
        return self._trainable

    def watch_registered(self, value: object) -> None:
        """Hook the tensors of a module or parameter being added to the model.

        Registration hooks run before the model is rescanned, so a layer swapped in
        mid-step has its gradient recorded from that step's backward on.
        """
        if isinstance(value, nn.Module):
            for tensor in value.parameters():
                self._watch(tensor)
        elif isinstance(value, nn.Parameter):
            self._watch(value)
        self.dirty = True

    def _watch(self, tensor: torch.Tensor) -> None:
        key = id(tensor)
        if key in self._hooks or not tensor.requires_grad:
            return
        arrived = self.arrived
        # TODO: add a mode that reads arrival at the step boundary (.grad presence
        # and version counters) for setups where this hook breaks compiled graphs.
        # None is built because torch 2.13 runs it under torch.compile and
        # compiled autograd without graph breaks (tests/test_compile.py).
        handle = tensor.register_post_accumulate_grad_hook(lambda _: arrived.add(key))
        self._hooks.add(handle, key)

    def ignores(self, name: str) -> bool:
        """Return whether the ``ignore`` patterns skip the parameter ``name``."""
        return self._is_ignored([name])

    def _is_ignored(self, names: list[str]) -> bool:
        candidates = set()
        for name in names:
            parts = name.split(".")
            candidates.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        return any(
            fnmatch.fnmatchcase(c, pattern)
            for pattern in self._ignore
            for c in candidates
        )

    def close(self) -> None:
        """Remove every hook and drop every tensor reference."""
        self._hooks.remove()
        self._infos.clear()
        self._tensors = []
        self._trainable = []
        self.arrived.clear()
