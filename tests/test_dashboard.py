"""The TensorBoard dashboard: layout, gradient-flow image and alert table."""

from __future__ import annotations

import io
import math
import re
import types

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn

from gradwatch import gradwatch
from gradwatch.alerts import Alert
from gradwatch.sinks.dashboard import MAX_COLUMNS, Dashboard, alerts_markdown
from gradwatch.sinks.flow_image import render_flow

LAYOUT_TAG = "custom_scalars__config__"


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
    events = EventAccumulator(
        str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0}
    )
    events.Reload()
    return events


def summary_tags_in_file_order(logdir):
    (path,) = logdir.glob("events.out.tfevents.*")
    tags = []
    for event in EventFileLoader(str(path)).Load():
        tags.extend(value.tag for value in event.summary.value)
    return tags


def read_layout(events):
    (record,) = events.Tensors(LAYOUT_TAG)
    return layout_pb2.Layout.FromString(record.tensor_proto.string_val[0])


def test_layout_sections_and_model_order(tmp_path):
    train(tmp_path)
    layout = read_layout(read(tmp_path))

    titles = [category.title for category in layout.category]
    assert titles == ["Alerts", "Gradient flow", "Updates", "Masks", "Symmetry"]
    flow = layout.category[1].chart[0]
    assert flow.title == "gradient norm per parameter (model order)"
    assert list(flow.multiline.tag) == [
        r"^gradwatch/grad_norm/body\.weight$",
        r"^gradwatch/grad_norm/body\.bias$",
        r"^gradwatch/grad_norm/head\.weight$",
        r"^gradwatch/grad_norm/head\.bias$",
        r"^gradwatch/grad_norm/spare\.weight$",
        r"^gradwatch/grad_norm/spare\.bias$",
    ]
    alert_tags = [
        tag for chart in layout.category[0].chart for tag in chart.multiline.tag
    ]
    assert r"^gradwatch/alerts/nonfinite_gradient$" in alert_tags
    assert r"^gradwatch/alerts/vanishing_gradient$" in alert_tags


def test_layout_written_once_before_alerts(tmp_path):
    train(tmp_path)
    tags = summary_tags_in_file_order(tmp_path)

    assert tags.count(LAYOUT_TAG) == 1
    assert tags.index(LAYOUT_TAG) < tags.index("gradwatch/alerts/unused_parameter")
    assert tags.index(LAYOUT_TAG) < tags.index("gradwatch/alerts/text_summary")


def test_layout_chart_tags_match_written_scalars(tmp_path):
    train(tmp_path, log_every=1)
    events = read(tmp_path)
    layout = read_layout(events)
    scalars = events.Tags()["scalars"]

    patterns = layout.category[1].chart[0].multiline.tag
    norms = [t for t in scalars if t.startswith("gradwatch/grad_norm/")]
    norms.remove("gradwatch/grad_norm/global")
    assert len(norms) == 4  # spare.* never get a gradient
    for tag in norms:
        assert any(re.match(pattern, tag) for pattern in patterns), tag
    updates = layout.category[2].chart[0].multiline.tag[0]
    assert any(tag.startswith("gradwatch/update_ratio/") for tag in scalars)
    assert updates == "^gradwatch/update_ratio/"


def test_flow_image_written_on_schedule(tmp_path):
    train(tmp_path, steps=12, log_every=2, image_every=5)
    events = read(tmp_path)

    images = events.Images("gradwatch/gradient_flow")
    assert [image.step for image in images] == [0, 5, 10]
    picture = Image.open(io.BytesIO(images[-1].encoded_image_string))
    assert picture.mode == "RGB"
    assert picture.width > 200
    assert picture.height > 100
    legend = events.Tensors("gradwatch/gradient_flow_rows/text_summary")[-1]
    text = legend.tensor_proto.string_val[0].decode()
    assert "| 0 | `body.weight` |" in text
    assert "| 4 | `spare.weight` |" in text  # a grey row: it never gets a gradient


def test_flow_image_off_with_zero(tmp_path):
    train(tmp_path, image_every=0)

    assert "gradwatch/gradient_flow" not in read(tmp_path).Tags()["images"]


def count_colour(image, rgb):
    return int((image.reshape(-1, 3) == np.array(rgb)).all(axis=1).sum())


def test_render_flow_marks_missing_and_nonfinite():
    healthy = render_flow(["a.weight", "b.weight"], [0, 10], [[1.0, 0.5], [1e-3, 2.0]])
    broken = render_flow(
        ["a.weight", "b.weight"], [0, 10], [[1.0, None], [1e-3, math.nan]]
    )

    assert healthy.dtype == np.uint8
    assert healthy.shape[2] == 3
    assert healthy.shape == broken.shape
    # The legend shows both swatches, so compare pixel counts of each colour.
    for rgb in ((120, 120, 120), (230, 25, 25)):
        assert count_colour(broken, rgb) > count_colour(healthy, rgb) > 0


def test_flow_columns_thin_out_past_limit():
    dashboard = Dashboard(types.SimpleNamespace(image_every=0, log_every=1))
    info = types.SimpleNamespace(name="w", tensor=torch.zeros(1))
    for step in range(MAX_COLUMNS + 10):
        ctx = types.SimpleNamespace(
            step=step, judged=[info], grad_norms={id(info.tensor): 1.0}, final=False
        )
        if step % dashboard._stride == 0:
            dashboard._add_column(ctx)

    assert len(dashboard._steps) <= MAX_COLUMNS
    assert dashboard._stride == 2
    assert dashboard._steps[:3] == [0, 2, 4]


def alert(check, severity, step, message="m", **fields):
    return Alert(
        check,
        severity,
        step,
        fields.get("param"),
        None,
        message,
        **{k: v for k, v in fields.items() if k != "param"},
    )


def test_alert_table_sorted_worst_first():
    alerts = [
        alert("zero_gradient", "warning", 1, param="a.weight"),
        alert("nonfinite_gradient", "info", 0),
        alert("unused_parameter", "error", 5, param="b.weight", last_step=9, count=5),
    ]
    text = alerts_markdown(alerts, step=9)
    lines = text.splitlines()

    assert lines[0] == "**3 alert(s)** at step 9: 1 error, 1 warning, 1 info."
    rows = [line for line in lines if line.startswith("| ") and "`" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["error", "warning", "info"]
    assert "| 5-9 (5 times) |" in rows[0]
    assert "`b.weight`" in rows[0]


def test_alert_table_escapes_pipes_and_newlines():
    text = alerts_markdown([alert("graph_cut", "error", 2, "a | b\nc")], step=2)

    row = text.splitlines()[-1]
    assert "a \\| b c" in row
    assert row.count("\n") == 0


def test_alert_table_without_alerts():
    assert (
        alerts_markdown([], step=3)
        == "**0 alert(s)** at step 3: 0 error, 0 warning, 0 info."
    )
