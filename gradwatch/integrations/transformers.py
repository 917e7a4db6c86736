"""A Hugging Face ``transformers.Trainer`` callback that runs a gradwatch session.

Example::

    from gradwatch.integrations.transformers import GradwatchCallback

    watch = GradwatchCallback(on_alert="warn")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[watch])
    trainer.train()
    print(watch.report())

The session starts at ``on_train_begin`` on the model the Trainer trains (the
module inside any DDP wrapper) and ends at ``on_train_end``; steps are the
Trainer's optimizer steps. When no ``logdir`` is given and the Trainer reports
to TensorBoard, the event files go beside the Trainer's: to
``$TENSORBOARD_LOGGING_DIR`` when it is set, else to ``args.logging_dir``
(Transformers 4), else to ``<output_dir>/runs/gradwatch`` (Transformers 5,
whose own run directory is named by time and host).

Limitations:
    The Trainer calls no callback when training raises, so the session's hooks
    stay on the model until :meth:`GradwatchCallback.close` is called.
"""

from __future__ import annotations

import os
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as err:
    msg = (
        "gradwatch.integrations.transformers needs Hugging Face Transformers; "
        "install it with: pip install 'gradwatch[transformers]'"
    )
    raise ImportError(msg) from err

from gradwatch.integrations.holder import SessionHolder

__all__ = ["GradwatchCallback"]


class GradwatchCallback(SessionHolder, TrainerCallback):
    """Watch the Trainer's model for the whole of ``trainer.train()``.

    Args:
        **options: Keyword options of :func:`gradwatch.gradwatch`.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        if model is None:
            msg = "the Trainer passed no model to on_train_begin; gradwatch cannot run"
            raise RuntimeError(msg)
        logdir = _tensorboard_dir(args) if _reports_to_tensorboard(args) else None
        self._start(model, logdir)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self._finish()


def _tensorboard_dir(args: Any) -> str:
    """Return the directory for gradwatch's event files beside the Trainer's."""
    from_env = os.getenv("TENSORBOARD_LOGGING_DIR")
    if from_env:
        return os.path.expanduser(from_env)
    logging_dir = getattr(args, "logging_dir", None)
    if logging_dir:
        return logging_dir
    return os.path.join(args.output_dir, "runs", "gradwatch")


def _reports_to_tensorboard(args: Any) -> bool:
    report_to = getattr(args, "report_to", None) or []
    if isinstance(report_to, str):
        report_to = [report_to]
    return "tensorboard" in report_to or "all" in report_to
