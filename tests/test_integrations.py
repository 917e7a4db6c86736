"""Trainer callbacks: a real Hugging Face Trainer and a real Lightning Trainer on CPU.

Importing either framework takes seconds, so these tests are marked slow (CI
runs them); each is skipped when its framework is not installed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.slow

STEPS = 6


def _token_batches(count: int, vocab: int = 32, length: int = 8) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (length,), generator=generator)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _hf_train(model, tmp_path, callback, report_to=(), accumulation=1):
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-3,
        report_to=list(report_to),
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_token_batches(4 * STEPS * accumulation),
        callbacks=[callback],
    )
    trainer.train()
    return trainer


def test_transformers_healthy_run_is_silent(tmp_path):
    from gradwatch.integrations.transformers import GradwatchCallback

    callback = GradwatchCallback(on_alert="ignore")
    _hf_train(_tiny_gpt2(), tmp_path, callback)
    assert callback.session.closed
    assert callback.session.step == STEPS
    assert callback.alerts == []


def test_transformers_accumulation_counts_optimizer_steps(tmp_path):
    from gradwatch.integrations.transformers import GradwatchCallback

    callback = GradwatchCallback(on_alert="ignore")
    _hf_train(_tiny_gpt2(), tmp_path, callback, accumulation=2)
    assert callback.session.step == STEPS
    assert callback.alerts == []


def test_transformers_unused_module_reported(tmp_path):
    from gradwatch.integrations.transformers import GradwatchCallback

    model = _tiny_gpt2()
    model.value_head = nn.Linear(16, 1)
    callback = GradwatchCallback(on_alert="ignore")
    _hf_train(model, tmp_path, callback)
    unused = sorted(a.param for a in callback.alerts if a.check == "unused_parameter")
    assert unused == ["value_head.bias", "value_head.weight"]
    print(callback.report())  # noqa: T201


def test_transformers_writes_beside_tensorboard_logs(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from gradwatch.integrations.transformers import GradwatchCallback

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    callback = GradwatchCallback(on_alert="ignore", log_every=1)
    _hf_train(_tiny_gpt2(), tmp_path, callback, report_to=["tensorboard"])
    runs = tmp_path / "out" / "runs"
    ours = list(runs.glob("gradwatch/events.out.tfevents.*"))
    every = list(runs.rglob("events.out.tfevents.*"))
    assert len(ours) == 1
    assert len(every) >= 2


def _lightning_module(unused_head: bool):
    lightning = pytest.importorskip("lightning.pytorch")

    class Classifier(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
            self.head = nn.Linear(3, 3) if unused_head else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

        def training_step(self, batch, batch_index):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    return Classifier()


def _lightning_fit(module, tmp_path, callback, logger=False, precision="32-true"):
    lightning = pytest.importorskip("lightning.pytorch")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16 * STEPS, 8, generator=generator)
    y = torch.randint(0, 3, (16 * STEPS,), generator=generator)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=16
    )
    trainer = lightning.Trainer(
        max_steps=STEPS,
        precision=precision,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[callback],
        default_root_dir=str(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return trainer


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_healthy_run_is_silent(tmp_path, precision):
    module = _lightning_module(unused_head=False)
    from gradwatch.integrations.lightning import GradwatchCallback

    callback = GradwatchCallback(on_alert="ignore")
    _lightning_fit(module, tmp_path, callback, precision=precision)
    assert callback.session.closed
    assert callback.session.step == STEPS
    assert callback.alerts == []


def test_lightning_unused_head_reported(tmp_path):
    module = _lightning_module(unused_head=True)
    from gradwatch.integrations.lightning import GradwatchCallback

    callback = GradwatchCallback(on_alert="ignore")
    _lightning_fit(module, tmp_path, callback)
    unused = sorted(a.param for a in callback.alerts if a.check == "unused_parameter")
    assert unused == ["head.bias", "head.weight"]
    print(callback.report())  # noqa: T201


def test_lightning_logs_through_tensorboard_logger(tmp_path):
    pytest.importorskip("tensorboard")
    module = _lightning_module(unused_head=False)
    from lightning.pytorch.loggers import TensorBoardLogger

    from gradwatch.integrations.lightning import GradwatchCallback

    logger = TensorBoardLogger(str(tmp_path / "tb"), name="run")
    callback = GradwatchCallback(on_alert="ignore", log_every=1)
    _lightning_fit(module, tmp_path, callback, logger=logger)
    log_dir = tmp_path / "tb" / "run" / "version_0"
    assert callback.session.options.logdir == log_dir
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2


def test_lightning_session_ends_when_fit_raises(tmp_path):
    module = _lightning_module(unused_head=False)
    from gradwatch.integrations.lightning import GradwatchCallback

    def failing_step(*args, **kwargs):
        raise RuntimeError("training step failed on purpose")

    module.training_step = failing_step
    callback = GradwatchCallback(on_alert="ignore")
    with pytest.raises(RuntimeError, match="failed on purpose"):
        _lightning_fit(module, tmp_path, callback)
    assert callback.session.closed
