"""The session a training-framework callback starts and ends."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from gradwatch.alerts import Alert
from gradwatch.session import Session, gradwatch

__all__ = ["SessionHolder"]

logger = logging.getLogger("gradwatch.integrations")


class SessionHolder:
    """Run one gradwatch session from a framework's begin and end events.

    Args:
        **options: Keyword options of :func:`gradwatch.gradwatch`.
    """

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.session: Session | None = None

    @property
    def alerts(self) -> list[Alert]:
        """The alerts of the current or last session (empty before training)."""
        return self.session.alerts if self.session is not None else []

    def report(self) -> str:
        """Return the session's readable summary of every alert."""
        if self.session is None:
            return "gradwatch: training has not started, no session ran."
        return self.session.report()

    def close(self) -> None:
        """End a session that training left running (after an exception)."""
        self._end(None)

    def _start(self, model: nn.Module, logdir: str | None) -> None:
        """End any running session, then watch ``model``.

        ``logdir`` is where the framework keeps its TensorBoard runs; it is used
        unless the options name a ``logdir`` themselves.
        """
        self._end(None)
        options = dict(self.options)
        if "logdir" not in options and logdir is not None:
            options["logdir"] = logdir
        self.session = gradwatch(model, **options).__enter__()

    def _end(self, exception: BaseException | None) -> bool:
        """End the running session; return False when none was running."""
        if self.session is None or self.session.closed:
            return False
        if exception is None:
            self.session.__exit__(None, None, None)
        else:
            self.session.__exit__(type(exception), exception, exception.__traceback__)
        return True

    def _finish(self) -> None:
        """End the session at the end of training and log its report."""
        if self._end(None):
            logger.info("%s", self.session.report())
