"""Alert policy: what happens when a new alert is recorded."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from gradwatch.alerts import Alert
from gradwatch.errors import GradwatchError, GradwatchWarning, warning_class_for

__all__ = ["dispatch"]

logger = logging.getLogger("gradwatch")

_INTERNAL_DIRS = (str(Path(__file__).parent), str(Path(torch.__file__).parent))


def dispatch(alert: Alert, policy: str | Callable[[Alert], None]) -> None:
    """Act on a new alert as ``policy`` (the session's ``on_alert``) asks.

    Raises:
        GradwatchError: ``policy`` is ``"raise"`` and the alert is an error.
    """
    if callable(policy):
        policy(alert)
    elif policy == "raise" and alert.severity == "error":
        raise GradwatchError(str(alert), alert)
    elif policy in ("warn", "raise"):
        _warn(alert)


def _warn(alert: Alert) -> None:
    if alert.severity == "info":
        logger.info("%s", alert)
        return
    level = logging.ERROR if alert.severity == "error" else logging.WARNING
    logger.log(level, "%s", alert)
    category: type[GradwatchWarning] = warning_class_for(alert.check)
    warnings.warn(str(alert), category, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """Return the stacklevel of the first frame outside gradwatch and torch."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame = frame.f_back
        level += 1
    return level
