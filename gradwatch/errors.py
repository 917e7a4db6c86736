"""Exceptions and the warning hierarchy.

Every warning gradwatch emits is a :class:`GradwatchWarning`, so one filter silences
or escalates all of them. Each subclass also inherits the standard category that
fits it, so ``-W error::RuntimeWarning`` catches disconnects too.
"""

from __future__ import annotations

__all__ = [
    "CollapseWarning",
    "DisconnectWarning",
    "GradwatchError",
    "GradwatchWarning",
    "MaskWarning",
    "NumericWarning",
    "warning_class_for",
]


class GradwatchError(RuntimeError):
    """An error-severity alert, raised when a session runs with ``on_alert="raise"``.

    The alert that caused it is on :attr:`alert`.
    """

    def __init__(self, message: str, alert: object | None = None) -> None:
        super().__init__(message)
        self.alert = alert


class GradwatchWarning(UserWarning):
    """Base class of every warning gradwatch emits."""


class DisconnectWarning(GradwatchWarning, RuntimeWarning):
    """A parameter receives no gradient, or is not updated by any optimizer."""


class MaskWarning(GradwatchWarning, RuntimeWarning):
    """Masked entries receive gradients or come back to life."""


class CollapseWarning(GradwatchWarning, RuntimeWarning):
    """Units that cannot be told apart, dead units, or collapsed representations."""


class NumericWarning(GradwatchWarning, RuntimeWarning):
    """Non-finite, exploding or vanishing gradients."""


_CATEGORY_BY_PREFIX = {
    "mask_": MaskWarning,
    "symmetric_": CollapseWarning,
    "dead_": CollapseWarning,
    "representation_": CollapseWarning,
    "nonfinite_": NumericWarning,
    "exploding_": NumericWarning,
    "vanishing_": NumericWarning,
}


def warning_class_for(check: str) -> type[GradwatchWarning]:
    """Return the warning category used for alerts of ``check``."""
    for prefix, category in _CATEGORY_BY_PREFIX.items():
        if check.startswith(prefix):
            return category
    return DisconnectWarning
