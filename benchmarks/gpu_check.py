"""Count device-to-host synchronisations of gradwatch's default mode on a GPU.

    python benchmarks/gpu_check.py                 # CUDA: GPT-2 small size
    python benchmarks/gpu_check.py --device cpu --layers 2 --steps 6   # dry run

It trains W3 (GPT-2 from a config, no downloads) scaled to GPT-2 small (12 layers,
width 768, 12 heads) on CUDA, first bare, then under ``gradwatch(model)``, with
``torch.cuda.set_sync_debug_mode("warn")`` switched on around the measured steps.
Every synchronisation then issues a warning, which this script counts per step,
split into those raised from gradwatch's code and the rest. It prints the count
per step and the ratio of the timed steps to the bare ones. gradwatch's target is
at most one synchronisation per analysed step in default mode.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

import gradwatch as package
from gradwatch import gradwatch

PACKAGE_DIR = str(Path(package.__file__).parent)


def build(layers: int, width: int, heads: int, device: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=heads,
        vocab_size=5000,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).to(device)
    tokens = torch.randint(0, 5000, (8, 128), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()

    return model, step


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(step, steps: int, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def count_syncs(step, steps: int, device: str) -> list[tuple[int, int]]:
    """Return ``(from gradwatch, other)`` synchronisation warnings per step."""
    counts = []
    for _ in range(steps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.startswith("cuda"):
                torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                if device.startswith("cuda"):
                    torch.cuda.set_sync_debug_mode("default")
        ours = sum(1 for w in caught if w.filename.startswith(PACKAGE_DIR))
        counts.append((ours, len(caught) - ours))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--layers", type=int, default=12, help="transformer layers")
    parser.add_argument("--width", type=int, default=768, help="embedding width")
    parser.add_argument("--heads", type=int, default=12, help="attention heads")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per block")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available; pass --device cpu for a dry run")

    _, bare_step = build(args.layers, args.width, args.heads, args.device)
    model, watched_step = build(args.layers, args.width, args.heads, args.device)
    for _ in range(3):
        bare_step()
    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(12):  # past the first steps, which trace the forward
            watched_step()
        syncs = count_syncs(watched_step, args.steps, args.device)
        ratios = []
        for _ in range(5):
            before = timed(bare_step, args.steps, args.device)
            during = timed(watched_step, args.steps, args.device)
            after = timed(bare_step, args.steps, args.device)
            ratios.append(during / ((before + after) / 2))

    ours = [o for o, _ in syncs]
    print(f"torch {torch.__version__}, device {args.device}")
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"model: GPT-2, {args.layers} layers, width {args.width}, {args.heads} heads")
    print(f"steps watched: {int(gw.step)}; alerts: {len(gw.alerts)}")
    print(
        f"syncs per step from gradwatch: median {statistics.median(ours)}, "
        f"max {max(ours)}; from the training step itself: "
        f"median {statistics.median(o for _, o in syncs)}"
    )
    print(
        f"time ratio to bare: median {statistics.median(ratios):.3f}, "
        f"min-max {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} repetitions"
    )
    return 0 if max(ours) <= 1 or not args.device.startswith("cuda") else 1


if __name__ == "__main__":
    raise SystemExit(main())
