"""TensorBoard event files, read back with tensorboard's own reader."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from gradwatch import gradwatch


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)
        self.spare = nn.Linear(8, 8)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def train(logdir, steps=12, **options):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch(model, logdir=logdir, on_alert="ignore", **options) as gw:
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(8, 4)).square().mean().backward()
            optimizer.step()
    return gw


def read(logdir):
    accumulator = EventAccumulator(
        str(logdir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator


def test_event_files_have_expected_tags(tmp_path):
    train(tmp_path, log_every=5, histogram_every=5)
    events = read(tmp_path)
    tags = events.Tags()

    assert "gradwatch/grad_norm/global" in tags["scalars"]
    assert "gradwatch/grad_norm/body.weight" in tags["scalars"]
    assert "gradwatch/alerts/unused_parameter" in tags["scalars"]
    assert "gradwatch/grad/head.weight" in tags["histograms"]
    assert "gradwatch/weight/spare.weight" in tags["histograms"]
    assert "gradwatch/grad/spare.weight" not in tags["histograms"]
    assert "gradwatch/alerts/text_summary" in tags["tensors"]


def test_scalars_follow_log_every(tmp_path):
    train(tmp_path, steps=12, log_every=5)
    events = read(tmp_path)

    steps = [e.step for e in events.Scalars("gradwatch/grad_norm/global")]
    assert steps == [0, 5, 10]
    counts = events.Scalars("gradwatch/alerts/unused_parameter")
    assert counts[-1].value == 2


def test_histogram_counts_match_tensor(tmp_path):
    train(tmp_path, steps=1, histogram_every=1)
    events = read(tmp_path)

    (record,) = events.Histograms("gradwatch/weight/body.weight")
    assert record.histogram_value.num == 32
    assert sum(record.histogram_value.bucket) == 32
    assert record.histogram_value.min < record.histogram_value.max


def test_alert_text_and_json_are_written(tmp_path):
    gw = train(tmp_path)
    events = read(tmp_path)

    text = events.Tensors("gradwatch/alerts/text_summary")[-1]
    assert "`spare.weight`" in text.tensor_proto.string_val[0].decode()
    payload = events.Tensors("gradwatch/alerts_json/text_summary")[-1]
    records = json.loads(payload.tensor_proto.string_val[0].decode())
    assert {r["param"] for r in records} == {"spare.weight", "spare.bias"}
    assert records[0]["last_step"] == gw.alerts[0].last_step == 11


def test_no_logdir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(None)

    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_logdir_rejected(tmp_path):
    tmp_path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(ValueError, match="not writable"):
            gradwatch(Net(), logdir=tmp_path / "run")
    finally:
        tmp_path.chmod(stat.S_IRWXU)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_writer_failure_is_logged_once_and_training_goes_on(tmp_path, caplog):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    caplog.set_level(logging.ERROR, logger="gradwatch")
    with gradwatch(model, logdir=tmp_path, on_alert="ignore", log_every=1) as gw:
        event_writer = gw._detectors[-1]._writer.file_writer.event_writer
        for step in range(6):
            if step == 2:
                event_writer._async_writer._writer._writer = _Broken()
            optimizer.zero_grad()
            model(torch.randn(8, 4)).square().mean().backward()
            optimizer.step()

    failures = [r for r in caplog.records if "stopped writing" in r.message]
    assert len(failures) == 1
    assert gw.step == 6
    assert len(gw.alerts) == 2


class _Broken:
    """A file writer that fails like a full disk."""

    def write(self, data):
        raise OSError(28, "No space left on device")

    def flush(self):
        raise OSError(28, "No space left on device")

    def close(self):
        pass
