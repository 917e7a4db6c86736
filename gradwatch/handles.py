"""One handle that removes every hook a session registered."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["HookSet", "eager_hook"]

HookT = TypeVar("HookT", bound=Callable)


def eager_hook(hook: HookT) -> HookT:
    """Return ``hook`` marked to run eagerly inside ``torch.compile``'d code.

    TorchDynamo would otherwise trace gradwatch's own hook code into the user's
    compiled graph, and recompile it whenever the hook's state changes. A
    disabled hook costs one graph break on the steps where it is installed. The
    wrapper keeps a bound method's ``__self__``, so the hook's owner can still
    be found from the module's hook dicts.
    """
    disabled = torch.compiler.disable(hook, recursive=True)
    owner = getattr(hook, "__self__", None)
    if owner is not None:
        disabled.__self__ = owner
    return disabled


class HookSet:
    """Removal tokens of registered hooks, removed together.

    :meth:`remove` is idempotent, and the set works as a context manager. Handles
    may be added under a key, so that one hook can be removed alone later.
    """

    def __init__(self) -> None:
        self._handles: dict[object, RemovableHandle] = {}
        self._next_key = 0

    def add(self, handle: RemovableHandle, key: object = None) -> RemovableHandle:
        if key is None:
            key = ("anonymous", self._next_key)
            self._next_key += 1
        previous = self._handles.pop(key, None)
        if previous is not None:
            previous.remove()
        self._handles[key] = handle
        return handle

    def extend(self, handles: Iterable[RemovableHandle]) -> None:
        for handle in handles:
            self.add(handle)

    def discard(self, key: object) -> None:
        """Remove the hook registered under ``key``, if there is one."""
        handle = self._handles.pop(key, None)
        if handle is not None:
            handle.remove()

    def keys(self) -> list[object]:
        return list(self._handles)

    def __contains__(self, key: object) -> bool:
        return key in self._handles

    def __len__(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        """Remove every hook; calling it again does nothing."""
        while self._handles:
            _, handle = self._handles.popitem()
            handle.remove()

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


class CloseOnRemove:
    """A removal token that closes an object, for a session's :class:`HookSet`.

    Detectors that install and remove their own hooks step by step add one of
    these to the session's hooks, so that the session's exit also closes them.
    The object is held weakly.
    """

    def __init__(self, owner: object) -> None:
        self._owner = weakref.ref(owner)

    def remove(self) -> None:
        owner = self._owner()
        if owner is not None:
            owner.close()  # type: ignore[attr-defined]
