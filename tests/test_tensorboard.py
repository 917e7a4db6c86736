"""TensorBoard event files, read back with tensorboard's own reader."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import (
    RawEventFileLoader,
)
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from gradwatch import gradwatch
from gradwatch.sinks import records
from gradwatch.sinks.histograms import histogram_proto, histogram_summaries


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


def raw_events(logdir):
    (path,) = logdir.glob("events.out.tfevents.*")
    return [Event.FromString(raw) for raw in RawEventFileLoader(str(path)).Load()]


def train_one_step(logdir, **options):
    """Run one step and return the gradient norms and the weights after it."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch(model, logdir=logdir, on_alert="ignore", **options):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
    norms = {
        name: p.grad.norm().item()
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    weights = {name: p.detach() for name, p in model.named_parameters()}
    return norms, weights


def test_histogram_fields_match_weights(tmp_path):
    _, weights = train_one_step(tmp_path, histogram_every=1)
    events = read(tmp_path)
    weight = weights["body.weight"].reshape(-1)

    (record,) = events.Histograms("gradwatch/weight/body.weight")
    histogram = record.histogram_value
    assert histogram.min == pytest.approx(weight.min().item())
    assert histogram.max == pytest.approx(weight.max().item())
    assert histogram.num == weight.numel()
    assert histogram.sum == pytest.approx(weight.sum().item(), abs=1e-6)
    assert histogram.sum_squares == pytest.approx(weight.square().sum().item())
    assert sum(histogram.bucket) == weight.numel()
    assert histogram.bucket_limit[-1] == pytest.approx(histogram.max)


def test_scalar_values_match_gradients(tmp_path):
    norms, _ = train_one_step(tmp_path, log_every=1)
    events = read(tmp_path)

    for name, norm in norms.items():
        (record,) = events.Scalars(f"gradwatch/grad_norm/{name}")
        assert record.value == pytest.approx(norm, rel=1e-6)
    (total,) = events.Scalars("gradwatch/grad_norm/global")
    expected = sum(n * n for n in norms.values()) ** 0.5
    assert total.value == pytest.approx(expected, rel=1e-6)


def test_step_scalars_share_one_event(tmp_path):
    train(tmp_path, steps=3, log_every=1, histogram_every=1)

    by_step = {}
    for event in raw_events(tmp_path):
        tags = [value.tag for value in event.summary.value]
        if "gradwatch/grad_norm/global" in tags:
            by_step.setdefault(event.step, []).append(tags)
    assert sorted(by_step) == [0, 1, 2]
    for step_tags in by_step.values():
        assert len(step_tags) == 1
        assert "gradwatch/grad_norm/body.weight" in step_tags[0]
        assert "gradwatch/alerts/unused_parameter" in step_tags[0]
        assert "gradwatch/grad/body.weight" in step_tags[0]
        assert "gradwatch/weight/spare.weight" in step_tags[0]


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


def test_histogram_counts_match_histc():
    torch.manual_seed(0)
    nan, inf = float("nan"), float("inf")
    tensors = [
        torch.randn(300) ** 3,
        torch.full((7,), 2.5),
        torch.zeros(4),
        torch.tensor([1.0, nan, 2.0]),
        torch.tensor([1.0, inf, 2.0]),
        torch.tensor([-inf, 1.0]),
        torch.arange(65.0),
        torch.randn(50).half(),
    ]
    rows = histogram_summaries(tensors, bins=16)

    for tensor, row in zip(tensors, rows, strict=True):
        values = tensor.float().reshape(-1)
        low, high = torch.aminmax(values)
        span = (high - low).clamp_min(torch.finfo(torch.float32).tiny)
        expected = torch.histc((values - low) / span, bins=16, min=0.0, max=1.0)
        assert torch.equal(row[5:], expected), tensor
        assert row[2] == values.numel()


def test_histogram_of_empty_tensor_is_skipped():
    rows = histogram_summaries([torch.zeros(0), torch.ones(3)], bins=4)

    assert histogram_proto(rows[0].tolist()) is None
    assert histogram_proto(rows[1].tolist()).num == 3


def test_empty_bucket_runs_merged():
    # Values at 0, 1 and 8 in 8 buckets of width 1: buckets 2 to 6 are empty.
    values = torch.tensor([0.0, 0.0, 1.0, 8.0])
    (row,) = histogram_summaries([values], bins=8)
    proto = histogram_proto(row.tolist())

    assert list(proto.bucket) == [2, 1, 0, 1]
    assert list(proto.bucket_limit) == [1, 2, 7, 8]


def test_merged_buckets_read_back(tmp_path):
    values = torch.tensor([0.0, 0.0, 1.0, 8.0])
    (row,) = histogram_summaries([values], bins=8)
    with SummaryWriter(str(tmp_path)) as writer:
        records.use_fast_checksums(writer)
        summary = Summary(
            value=[Summary.Value(tag="h", histo=histogram_proto(row.tolist()))]
        )
        writer._get_file_writer().add_summary(summary, 3)

    (record,) = read(tmp_path).Histograms("h")
    assert record.step == 3
    assert list(record.histogram_value.bucket) == [2, 1, 0, 1]
    assert list(record.histogram_value.bucket_limit) == [1, 2, 7, 8]
    assert record.histogram_value.min == 0
    assert record.histogram_value.max == 8


@pytest.mark.parametrize(
    "size", [0, 1, 9, 127, 128, 4095, 4096, 4097, 4096 + 129, 65536 + 3, 300_001]
)
def test_crc32c_matches_tensorboard(size):
    data = os.urandom(size)

    assert records.masked_crc32c(data) == pywrap_tensorflow.masked_crc32c(data)


def test_crc32c_check_value():
    assert records.crc32c(b"123456789") == 0xE3069283


def test_fast_checksums_read_back(tmp_path):
    with SummaryWriter(str(tmp_path)) as writer:
        assert records.use_fast_checksums(writer)
        writer.add_text("long", "x" * 20_000, 0)
        writer.add_scalar("short", 1.5, 0)

    events = read(tmp_path)
    (text,) = events.Tensors("long/text_summary")
    assert text.tensor_proto.string_val[0].decode() == "x" * 20_000
    assert events.Scalars("short")[0].value == 1.5
