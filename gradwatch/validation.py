"""Checks of the model and options, run when a session is built."""

from __future__ import annotations

import warnings

from torch import nn

from gradwatch.config import Options
from gradwatch.detectors.units import resolve_modules
from gradwatch.errors import GradwatchWarning
from gradwatch.params import ParamTable

__all__ = ["check_complex", "check_model", "check_module_names"]


def check_module_names(model: nn.Module, options: Options) -> None:
    """Raise now, not at ``with``, if a module name in the options matches nothing."""
    resolve_modules(model, options.watch_outputs)
    resolve_modules(model, tuple(options.unit_groups))


def check_complex(model: nn.Module, table: ParamTable) -> None:
    """Raise for a trainable complex parameter that ``ignore`` does not skip."""
    found = [
        (name, param)
        for name, param in model.named_parameters()
        if param.is_complex() and param.requires_grad and not table.ignores(name)
    ]
    if not found:
        return
    name, param = found[0]
    module = name.rpartition(".")[0]
    pattern = f"{module}.*" if module else name
    msg = (
        f"parameter {name!r} has dtype {param.dtype}; gradwatch watches real "
        f"floating-point parameters only ({len(found)} complex parameter(s) "
        f"found). Skip them with ignore=[{pattern!r}], or hold them as real "
        f"pairs (torch.view_as_real) in the model"
    )
    raise TypeError(msg)


def check_model(model: object) -> None:
    if isinstance(model, type) and issubclass(model, nn.Module):
        msg = (
            f"gradwatch() takes a module instance, got the class {model.__name__}; "
            f"instantiate it first: gradwatch({model.__name__}(...))"
        )
        raise TypeError(msg)
    if not isinstance(model, nn.Module):
        msg = (
            f"gradwatch() takes a torch.nn.Module, got {type(model).__name__}; pass "
            f"the model whose parameters you train"
        )
        raise TypeError(msg)
    params = list(model.parameters())
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        msg = (
            f"parameter {meta[0]!r} is on the meta device and has no data to watch; "
            f"materialise the model first (model.to_empty(device=...) and "
            f"initialise it, or load a checkpoint)"
        )
        raise ValueError(msg)
    if not any(p.requires_grad for p in params):
        warnings.warn(
            f"{type(model).__name__} has no trainable parameters "
            f"(requires_grad=True); gradwatch has nothing to watch",
            GradwatchWarning,
            stacklevel=3,
        )
