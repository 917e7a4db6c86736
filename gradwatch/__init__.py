"""gradwatch: find the parts of a PyTorch model that learn nothing.

Wrap an unchanged training loop in ``with gradwatch(model) as gw:`` and read
``gw.alerts`` or ``gw.report()`` afterwards.
"""

from gradwatch.alerts import CHECKS, Alert
from gradwatch.errors import (
    CollapseWarning,
    DisconnectWarning,
    GradwatchError,
    GradwatchWarning,
    MaskWarning,
    NumericWarning,
)
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
