"""gradwatch: find the parts of a PyTorch model that learn nothing.

Wrap an unchanged training loop in ``with gradwatch(model) as gw:`` and read
``gw.alerts`` or ``gw.report()`` afterwards.

``gradwatch`` and ``Session`` are imported on first use, so that importing the
package (as pytest does for the plugin) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradwatch.alerts import CHECKS, Alert
from gradwatch.errors import (
    CollapseWarning,
    DisconnectWarning,
    GradwatchError,
    GradwatchWarning,
    MaskWarning,
    NumericWarning,
)

if TYPE_CHECKING:
    from gradwatch.session import Session, gradwatch

__all__ = [
    "CHECKS",
    "Alert",
    "CollapseWarning",
    "DisconnectWarning",
    "GradwatchError",
    "GradwatchWarning",
    "MaskWarning",
    "NumericWarning",
    "Session",
    "gradwatch",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("gradwatch", "Session"):
        from gradwatch import session

        return getattr(session, name)
    msg = f"module 'gradwatch' has no attribute {name!r}"
    raise AttributeError(msg)
