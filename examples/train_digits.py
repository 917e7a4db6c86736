"""Train an MLP on scikit-learn's digits under gradwatch, healthy or with a fault.

    python examples/train_digits.py                      # healthy: no alert
    python examples/train_digits.py --fault detach       # one of the faults below
    tensorboard --logdir runs/digits

The demo's code is in :mod:`gradwatch.demo`, so that the installed
``gradwatch demo`` command runs it too: add new faults there with ``@fault``.
This script runs the same ``main``, and every name of that module can be
imported from here as well.
"""

from __future__ import annotations

from typing import Any

from gradwatch import demo
from gradwatch.demo import FAULTS, DigitsMLP, Setup, fault, main

__all__ = ["FAULTS", "DigitsMLP", "Setup", "fault", "main"]


def __getattr__(name: str) -> Any:
    return getattr(demo, name)


if __name__ == "__main__":
    raise SystemExit(main())
