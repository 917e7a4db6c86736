"""A Lightning callback that runs a gradwatch session during ``trainer.fit()``.

Example::

    from gradwatch.integrations.lightning import GradwatchCallback

    watch = GradwatchCallback(on_alert="warn")
    trainer = lightning.Trainer(max_epochs=3, callbacks=[watch])
    trainer.fit(module, loader)
    print(watch.report())

The session starts at ``on_fit_start`` on the LightningModule (the module
inside any DDP wrapper the strategy adds) and ends at ``on_fit_end``, or at
``on_exception`` when fitting raises. Steps are the optimizer steps Lightning
runs. When no ``logdir`` is given and the trainer has a ``TensorBoardLogger``,
the event files go to that logger's ``log_dir``, so TensorBoard shows
gradwatch's tags in the same run as the module's own logs.
"""

from __future__ import annotations

import logging
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError as err:
    msg = (
        "gradwatch.integrations.lightning needs Lightning; install it with: "
        "pip install 'gradwatch[lightning]'"
    )
    raise ImportError(msg) from err

from gradwatch.alerts import Alert
from gradwatch.session import Session, gradwatch

__all__ = ["GradwatchCallback"]

logger = logging.getLogger(__name__)


class GradwatchCallback(Callback):
    """Watch the LightningModule for the whole of ``trainer.fit()``.

    Args:
        **options: Keyword options of :func:`gradwatch.gradwatch`.
    """

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.session: Session | None = None

    @property
    def alerts(self) -> list[Alert]:
        """The alerts of the current or last session (empty before fitting)."""
        return self.session.alerts if self.session is not None else []

    def report(self) -> str:
        """Return the session's readable summary of every alert."""
        if self.session is None:
            return "gradwatch: fitting has not started, no session ran."
        return self.session.report()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._end(None)
        options = dict(self.options)
        logdir = _tensorboard_dir(trainer)
        if "logdir" not in options and logdir is not None:
            options["logdir"] = logdir
        self.session = gradwatch(pl_module, **options).__enter__()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._end(None):
            logger.info("%s", self.session.report())

    def on_exception(
        self, trainer: Any, pl_module: Any, exception: BaseException
    ) -> None:
        self._end(exception)

    def _end(self, exception: BaseException | None) -> bool:
        """End the running session; return False when none was running."""
        if self.session is None or self.session.closed:
            return False
        if exception is None:
            self.session.__exit__(None, None, None)
        else:
            self.session.__exit__(type(exception), exception, exception.__traceback__)
        return True


def _tensorboard_dir(trainer: Any) -> str | None:
    """Return the ``log_dir`` of the trainer's first TensorBoardLogger, if any."""
    for candidate in getattr(trainer, "loggers", []):
        if isinstance(candidate, TensorBoardLogger):
            return candidate.log_dir
    return None
