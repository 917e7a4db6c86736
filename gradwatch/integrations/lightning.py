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

from gradwatch.integrations.holder import SessionHolder

__all__ = ["GradwatchCallback"]


class GradwatchCallback(SessionHolder, Callback):
    """Watch the LightningModule for the whole of ``trainer.fit()``.

    Args:
        **options: Keyword options of :func:`gradwatch.gradwatch`.
    """

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._start(pl_module, _tensorboard_dir(trainer))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish()

    def on_exception(
        self, trainer: Any, pl_module: Any, exception: BaseException
    ) -> None:
        self._end(exception)


def _tensorboard_dir(trainer: Any) -> str | None:
    """Return the ``log_dir`` of the trainer's first TensorBoardLogger, if any."""
    for candidate in getattr(trainer, "loggers", []):
        if isinstance(candidate, TensorBoardLogger):
            return candidate.log_dir
    return None
