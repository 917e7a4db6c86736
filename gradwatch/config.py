"""Session options, validated once when the session is built."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gradwatch.alerts import CHECKS

__all__ = ["ON_ALERT_POLICIES", "UNIT_GROUP_KINDS", "Options", "as_pairs", "as_tuple"]

ON_ALERT_POLICIES = ("warn", "raise", "ignore")

#: Values of ``unit_groups``: ``"children"`` makes each child module one unit.
UNIT_GROUP_KINDS = ("children",)


@dataclasses.dataclass(frozen=True)
class Options:
    """Settings of one session. See :func:`gradwatch.gradwatch` for each field."""

    logdir: Path | None = None
    on_alert: str | Callable[[Any], None] = "warn"
    patience: int = 3
    ignore: tuple[str, ...] = ()
    checks: tuple[str, ...] | None = None
    zero_tol: float = 1e-6
    stop_confidence: float = 1e-4
    graph_walk_steps: int = 2
    log_every: int = 10
    histogram_every: int = 100
    masks: tuple[tuple[str, Any], ...] = ()
    track_zeros: bool = False
    symmetry_every: int = 100
    symmetry_tol: float = 1e-4
    activations: bool = True
    dead_fraction: float = 0.5
    watch_outputs: tuple[str, ...] = ()
    unit_groups: dict[str, str] = dataclasses.field(default_factory=dict)
    explode_factor: float = 100.0
    vanish_factor: float = 1e-3
    norm_window: int = 50
    update_ratio_bounds: tuple[float, float] | None = None
    image_every: int = 100
    distributed: bool | None = None
    log_all_ranks: bool = False

    def __post_init__(self) -> None:
        _check_on_alert(self.on_alert)
        _check_int("patience", self.patience, minimum=1)
        _check_int("graph_walk_steps", self.graph_walk_steps, minimum=0)
        _check_int("log_every", self.log_every, minimum=1)
        _check_int("histogram_every", self.histogram_every, minimum=0)
        _check_fraction("zero_tol", self.zero_tol)
        _check_fraction("stop_confidence", self.stop_confidence)
        _check_int("symmetry_every", self.symmetry_every, minimum=1)
        _check_fraction("symmetry_tol", self.symmetry_tol)
        _check_dead_fraction(self.dead_fraction)
        _check_bool("activations", self.activations)
        _check_bool("log_all_ranks", self.log_all_ranks)
        if self.distributed is not None and not isinstance(self.distributed, bool):
            msg = f"distributed must be None, True or False, got {self.distributed!r}"
            raise ValueError(msg)
        object.__setattr__(self, "watch_outputs", _check_names(self.watch_outputs))
        object.__setattr__(self, "unit_groups", _check_unit_groups(self.unit_groups))
        _check_numeric_options(self)
        object.__setattr__(self, "ignore", _check_patterns(self.ignore))
        object.__setattr__(self, "checks", _check_checks(self.checks))
        _check_masks(self.masks, self.track_zeros)
        object.__setattr__(self, "logdir", _check_logdir(self.logdir))

    def enabled(self, check: str) -> bool:
        """Return whether ``check`` is switched on."""
        return self.checks is None or check in self.checks


def _check_on_alert(value: object) -> None:
    if callable(value) or value in ON_ALERT_POLICIES:
        return
    valid = ", ".join(repr(p) for p in ON_ALERT_POLICIES)
    msg = (
        f"on_alert must be one of {valid} or a callable taking an Alert, got {value!r}"
    )
    raise ValueError(msg)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        msg = f"{name} must be an int >= {minimum}, got {value!r}"
        raise ValueError(msg)


def _check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"{name} must be a float in (0, 1), got {value!r}"
        raise ValueError(msg)
    if not 0.0 < value < 1.0:
        msg = f"{name} must be a float in (0, 1), got {value!r}"
        raise ValueError(msg)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        msg = f"{name} must be True or False, got {value!r}"
        raise ValueError(msg)


def _check_dead_fraction(value: object) -> None:
    valid = isinstance(value, int | float) and not isinstance(value, bool)
    if not valid or not 0.0 < value <= 1.0:  # type: ignore[operator]
        msg = f"dead_fraction must be a float in (0, 1], got {value!r}"
        raise ValueError(msg)


def _check_names(names: object) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        msg = (
            "watch_outputs must be a sequence of module qualified names (or glob "
            f"patterns), such as ('encoder', 'projector'), got {names!r}"
        )
        raise ValueError(msg)
    return tuple(names)


def _check_unit_groups(groups: object) -> dict[str, str]:
    valid = ", ".join(repr(k) for k in UNIT_GROUP_KINDS)
    if not isinstance(groups, Mapping) or not all(isinstance(k, str) for k in groups):
        msg = (
            "unit_groups must map module names to a unit kind, such as "
            f"{{'moe.experts': 'children'}}, got {groups!r}"
        )
        raise ValueError(msg)
    for name, kind in groups.items():
        if kind not in UNIT_GROUP_KINDS:
            msg = f"unit_groups[{name!r}] must be one of {valid}, got {kind!r}"
            raise ValueError(msg)
    return dict(groups)


def _check_masks(masks: object, track_zeros: object) -> None:
    if not isinstance(track_zeros, bool):
        msg = f"track_zeros must be True or False, got {track_zeros!r}"
        raise ValueError(msg)
    pairs = isinstance(masks, tuple) and all(
        isinstance(p, tuple) and len(p) == 2 for p in masks
    )
    if not pairs:
        msg = (
            "masks must map parameter qualified names to mask tensors, such as "
            f"{{'fc1.weight': keep}}, got {type(masks).__name__}"
        )
        raise ValueError(msg)
    for name, mask in masks:  # type: ignore[union-attr]
        if not isinstance(name, str) or not isinstance(mask, torch.Tensor):
            msg = (
                "masks must map parameter qualified names (str) to mask tensors, "
                f"got {type(name).__name__} -> {type(mask).__name__}"
            )
            raise ValueError(msg)


def _check_numeric_options(options: Options) -> None:
    factor = options.explode_factor
    number = isinstance(factor, int | float) and not isinstance(factor, bool)
    if not number or not factor > 1:  # ``not >`` also rejects NaN
        msg = f"explode_factor must be a number > 1, got {factor!r}"
        raise ValueError(msg)
    _check_fraction("vanish_factor", options.vanish_factor)
    _check_int("norm_window", options.norm_window, minimum=5)
    _check_int("image_every", options.image_every, minimum=0)
    _check_update_bounds(options.update_ratio_bounds)


def _check_update_bounds(bounds: object) -> None:
    if bounds is None:
        return
    numbers = (
        isinstance(bounds, tuple | list)
        and len(bounds) == 2
        and all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
    )
    if not numbers or not 0 < bounds[0] < bounds[1]:  # type: ignore[index]
        msg = (
            "update_ratio_bounds must be None or a pair (low, high) with "
            f"0 < low < high, such as (1e-5, 1e-1), got {bounds!r}"
        )
        raise ValueError(msg)


def _check_patterns(patterns: object) -> tuple[str, ...]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not isinstance(patterns, Sequence) or not all(
        isinstance(p, str) for p in patterns
    ):
        msg = (
            "ignore must be a sequence of glob patterns of parameter or module "
            f"names, such as ('encoder.*',), got {patterns!r}"
        )
        raise ValueError(msg)
    return tuple(patterns)


def _check_checks(checks: object) -> tuple[str, ...] | None:
    if checks is None:
        return None
    if isinstance(checks, str):
        checks = (checks,)
    if not isinstance(checks, Sequence):
        msg = (
            "checks must be a check id or a sequence of check ids, such as "
            f"('unused_parameter', 'mask_leak'), got {checks!r}"
        )
        raise ValueError(msg)
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        valid = ", ".join(CHECKS)
        msg = f"unknown check id(s) {unknown}; valid check ids are: {valid}"
        raise ValueError(msg)
    return tuple(checks)  # type: ignore[arg-type]


def as_tuple(value: object) -> object:
    """Return a string as a 1-tuple and another iterable (not a mapping) as a tuple.

    Other values are returned unchanged, so that validation in :class:`Options`
    rejects them with a message naming the option.
    """
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable) and not isinstance(value, Mapping | torch.Tensor):
        return tuple(value)
    return value


def as_pairs(mapping: object) -> object:
    """Return a mapping's items as a tuple of pairs; other values unchanged."""
    if mapping is None:
        return ()
    if isinstance(mapping, Mapping):
        return tuple(mapping.items())
    return mapping


def _check_logdir(logdir: object) -> Path | None:
    if logdir is None:
        return None
    if not isinstance(logdir, str | os.PathLike):
        msg = f"logdir must be a path or None, got {type(logdir).__name__}"
        raise ValueError(msg)

    path = Path(logdir)
    if path.exists() and not path.is_dir():
        msg = f"logdir {str(path)!r} is a file; pass a directory for the event files"
        raise ValueError(msg)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        msg = (
            f"logdir {str(path)!r} cannot be created: {str(existing)!r} is a file, "
            f"not a directory; pass a path below a directory"
        )
        raise ValueError(msg)
    if existing is not None and not os.access(existing, os.W_OK):
        msg = f"logdir {str(path)!r} is not writable: {str(existing)!r} denies writing"
        raise ValueError(msg)
    return path
