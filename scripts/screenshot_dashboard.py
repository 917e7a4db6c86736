"""Take a screenshot of gradwatch's TensorBoard dashboard in headless Chromium.

    python scripts/screenshot_dashboard.py                    # docs/dashboard.png
    python scripts/screenshot_dashboard.py --tab images --out /tmp/flow.png

The script trains the digits demo with a planted fault into a temporary
directory, serves it with TensorBoard on 127.0.0.1 at a free port, loads the
requested tab in headless Chromium and saves the picture. It stops the server
and the browser it started, by their process handles, and removes the
temporary directories. It needs Debian's ``chromium`` package
(``apt-get install -y chromium``); nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Chromium switches: headless, no sandbox (root in containers), and no
#: background traffic to Google's services.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fault", default="detach", help="demo fault to plant")
    parser.add_argument("--epochs", type=int, default=3, help="demo epochs to train")
    parser.add_argument(
        "--tab",
        default="custom_scalars",
        help="TensorBoard tab to show (custom_scalars, images, text, histograms)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "docs" / "dashboard.png", help="PNG path"
    )
    parser.add_argument("--width", type=int, default=1400, help="window width, px")
    parser.add_argument("--height", type=int, default=1000, help="window height, px")
    parser.add_argument(
        "--wait", type=int, default=20000, help="virtual time for the page, in ms"
    )
    return parser.parse_args()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_demo(logdir: Path, fault: str, epochs: int) -> None:
    command = [sys.executable, "examples/train_digits.py", "--fault", fault]
    command += ["--logdir", str(logdir), "--epochs", str(epochs)]
    subprocess.run(command, cwd=REPO, check=False, capture_output=True, timeout=600)
    if not list(logdir.glob("events.out.tfevents.*")):
        sys.exit(f"the demo wrote no event file to {logdir}")


def wait_for_server(server: subprocess.Popen, port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"tensorboard exited with code {server.returncode}")
        try:
            url = f"http://127.0.0.1:{port}/data/runs"
            with urllib.request.urlopen(url, timeout=5) as response:
                if json.loads(response.read()):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"tensorboard did not serve the run within {seconds:.0f} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def screenshot(url: str, out: Path, args: argparse.Namespace, profile: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium not found; install it with `apt-get install -y chromium`")
    command = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    command += [
        f"--window-size={args.width},{args.height}",
        f"--virtual-time-budget={args.wait}",
        f"--screenshot={out}",
        url,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        process.wait(timeout=120)
    finally:
        stop(process)
    if not out.exists():
        sys.exit(f"chromium wrote no screenshot to {out}")


def main() -> int:
    args = parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gradwatch-shot-") as scratch:
        logdir = Path(scratch) / args.fault
        profile = Path(scratch) / "chromium-profile"
        profile.mkdir()
        train_demo(logdir, args.fault, args.epochs)

        port = free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                "--logdir",
                str(Path(scratch)),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--load_fast=false",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_server(server, port, seconds=60)
            # Smoothing off: the alert counts are step functions.
            url = f"http://127.0.0.1:{port}/#{args.tab}&_smoothingWeight=0"
            screenshot(url, args.out, args, profile)
        finally:
            stop(server)
    print(f"saved {args.out}")  # noqa: T201 - a command-line script
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
