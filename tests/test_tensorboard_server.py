"""A real TensorBoard server serves a run the digits demo wrote.

The demo trains for two epochs with a planted ``.detach()``. The server is
started on 127.0.0.1 at a free port and read back through its HTTP data API,
the same API the browser's dashboard reads.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 60

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(port: int, path: str, **query: str):
    url = f"http://127.0.0.1:{port}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read().decode())


def wait_until_serving(server: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"tensorboard exited with code {server.returncode}")
        try:
            if get_json(port, "/data/runs"):
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"tensorboard did not serve a run within {STARTUP_SECONDS} s")


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("digits")
    demo = [sys.executable, "examples/train_digits.py", "--fault", "detach"]
    subprocess.run(
        [*demo, "--logdir", str(logdir), "--epochs", "2"],
        cwd=REPO,
        check=False,
        capture_output=True,
        timeout=300,
    )
    assert list(logdir.glob("events.out.tfevents.*")), "the demo wrote no events"

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(logdir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast=false",
            "--reload_interval=0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_serving(server, port)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def test_scalars_served(served_run):
    tags = get_json(served_run, "/data/plugin/scalars/tags")["."]

    assert "gradwatch/grad_norm/global" in tags
    assert "gradwatch/grad_norm/fc2.weight" in tags
    assert "gradwatch/alerts/unused_parameter" in tags
    assert "gradwatch/update_ratio/head.weight" in tags
    counts = get_json(
        served_run,
        "/data/plugin/scalars/scalars",
        run=".",
        tag="gradwatch/alerts/unused_parameter",
    )
    assert counts[-1][2] == 2  # [wall time, step, value]


def test_histograms_and_distributions_served(served_run):
    histograms = get_json(served_run, "/data/plugin/histograms/tags")["."]
    distributions = get_json(served_run, "/data/plugin/distributions/tags")["."]

    assert "gradwatch/grad/fc2.weight" in histograms
    assert "gradwatch/weight/fc1.weight" in histograms
    assert "gradwatch/weight/fc1.weight" in distributions
    series = get_json(
        served_run,
        "/data/plugin/histograms/histograms",
        run=".",
        tag="gradwatch/weight/fc1.weight",
    )
    _, step, buckets = series[0]
    assert step == 0
    assert 10 <= len(buckets) <= 64
    assert sum(count for _, _, count in buckets) == pytest.approx(128 * 64)


def test_alert_text_served(served_run):
    tags = get_json(served_run, "/data/plugin/text/tags")["."]
    assert "gradwatch/alerts/text_summary" in tags

    records = get_json(
        served_run,
        "/data/plugin/text/text",
        run=".",
        tag="gradwatch/alerts/text_summary",
    )
    html = records[-1]["text"]
    assert "<table>" in html
    assert "unused_parameter" in html
    assert "fc1.weight" in html


def test_custom_scalar_layout_served(served_run):
    layout = get_json(served_run, "/data/plugin/custom_scalars/layout")

    titles = [category["title"] for category in layout["category"]]
    assert titles == ["Alerts", "Gradient flow", "Updates", "Masks", "Symmetry"]
    flow = layout["category"][1]["chart"][0]["multiline"]["tag"]
    assert flow[0] == r"^gradwatch/grad_norm/fc1\.weight$"
    matched = get_json(
        served_run,
        "/data/plugin/custom_scalars/scalars",
        run=".",
        tag=flow[2],
    )
    assert matched["regex_valid"]
    assert "gradwatch/grad_norm/fc2.weight" in matched["tag_to_events"]


def test_gradient_flow_image_served(served_run):
    tags = get_json(served_run, "/data/plugin/images/tags")["."]
    assert "gradwatch/gradient_flow" in tags

    images = get_json(
        served_run,
        "/data/plugin/images/images",
        run=".",
        tag="gradwatch/gradient_flow",
    )
    steps = [image["step"] for image in images]
    assert steps[0] == 0
    assert steps[-1] > 0  # the last one is written when the session closes
    url = f"http://127.0.0.1:{served_run}/data/plugin/images/individualImage?"
    with urllib.request.urlopen(url + images[-1]["query"], timeout=10) as response:
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"
