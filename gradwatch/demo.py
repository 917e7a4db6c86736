"""Train an MLP on scikit-learn's digits under gradwatch, healthy or with a fault.

    gradwatch demo                                       # healthy: no alert
    gradwatch demo --fault detach                        # one of the faults below
    python examples/train_digits.py --fault detach       # the same, from a clone
    tensorboard --logdir runs/digits

The digits data (1,797 8x8 images) ships with scikit-learn, so nothing is
downloaded. Each ``--fault`` plants one bug that users report; gradwatch names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

from gradwatch import gradwatch


@dataclasses.dataclass
class Setup:
    """A model and its optimizer, as one fault builds them."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scale_inputs: bool = True
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


FAULTS: dict[str, tuple[str, Callable[[], Setup]]] = {}


def fault(name: str, help_text: str):
    """Register a builder of a model and optimizer under ``--fault name``."""

    def register(build: Callable[[], Setup]) -> Callable[[], Setup]:
        FAULTS[name] = (help_text, build)
        return build

    return register


class DigitsMLP(nn.Module):
    """64 -> 128 -> 64 -> 10 with ReLU; ``cut`` plants a graph cut after fc1."""

    def __init__(self, cut: str = "none") -> None:
        super().__init__()
        self.cut = cut
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cut == "no-grad":
            with torch.no_grad():
                h = F.relu(self.fc1(x))
        else:
            h = F.relu(self.fc1(x))
        if self.cut == "detach":
            h = h.detach()
        return self.head(F.relu(self.fc2(h)))


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-3)


@fault("none", "healthy training: gradwatch stays silent")
def healthy() -> Setup:
    model = DigitsMLP()
    return Setup(model, adam(model))


@fault("detach", "fc1's output is detached in forward: fc1 never learns")
def detached() -> Setup:
    model = DigitsMLP(cut="detach")
    return Setup(model, adam(model))


@fault("no-grad", "fc1 runs under torch.no_grad() inside forward")
def no_grad() -> Setup:
    model = DigitsMLP(cut="no-grad")
    return Setup(model, adam(model))


@fault("unused", "a projection layer is built in __init__ but never called")
def unused() -> Setup:
    model = DigitsMLP()
    model.proj = nn.Linear(64, 64)
    return Setup(model, adam(model))


@fault("not-in-optimizer", "the optimizer is built without the head's parameters")
def not_in_optimizer() -> Setup:
    model = DigitsMLP()
    body = [p for name, p in model.named_parameters() if not name.startswith("head")]
    return Setup(model, torch.optim.Adam(body, lr=1e-3))


@fault("zero-init", "every layer is zero-initialised: hidden units stay identical")
def zero_init() -> Setup:
    model = DigitsMLP()
    for layer in (model.fc1, model.fc2, model.head):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return Setup(model, adam(model))


@fault("dead-relu", "unscaled inputs and SGD at lr 0.5 kill most ReLU units of fc1")
def dead_relu() -> Setup:
    model = DigitsMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return Setup(model, optimizer, scale_inputs=False)


class MaskedLinear(nn.Linear):
    """A linear layer with a 0/1 ``mask`` buffer; ``apply_mask`` uses it in forward."""

    def __init__(self, keep: torch.Tensor, apply_mask: bool) -> None:
        super().__init__(keep.shape[1], keep.shape[0])
        self.register_buffer("mask", keep.float())
        self.apply_mask = apply_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight * self.mask if self.apply_mask else self.weight
        return F.linear(x, weight, self.bias)


def random_keep(rows: int, cols: int, density: float = 0.2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(rows, cols, generator=generator) < density


@fault("mask-leak", "fc1's forward ignores its mask buffer: masked weights learn")
def mask_leak() -> Setup:
    model = DigitsMLP()
    model.fc1 = MaskedLinear(random_keep(128, 64), apply_mask=False)
    return Setup(model, adam(model))


@fault("mask-revived", "fc1 is pruned once through .data: Adam regrows the zeros")
def mask_revived() -> Setup:
    model = DigitsMLP()
    keep = random_keep(128, 64)
    model.fc1.weight.data.mul_(keep)
    return Setup(model, adam(model), options={"masks": {"fc1.weight": keep}})


@fault("prune-ok", "fc1 and fc2 pruned with torch.nn.utils.prune: stays silent")
def prune_ok() -> Setup:
    model = DigitsMLP()
    prune.l1_unstructured(model.fc1, "weight", amount=0.8)
    prune.ln_structured(model.fc2, "weight", amount=0.25, n=2, dim=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    return Setup(model, optimizer)


def load_data(scale: bool) -> tuple[torch.Tensor, ...]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        msg = (
            "the digits demo needs scikit-learn for its data; install it with "
            "`pip install scikit-learn`"
        )
        raise ImportError(msg) from err

    images, labels = load_digits(return_X_y=True)
    if scale:
        images = images / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=0, stratify=labels
    )
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_x(x_train), torch.tensor(y_train), as_x(x_test), torch.tensor(y_test)


def train(setup: Setup, epochs: int, batch_size: int, seed: int) -> float:
    """Train with plain minibatch SGD steps; return the test accuracy."""
    x_train, y_train, x_test, y_test = load_data(setup.scale_inputs)
    model, optimizer = setup.model, setup.optimizer
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x_train), generator=order).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()

    model.eval()
    with torch.no_grad():
        predicted = model(x_test).argmax(dim=1)
    return (predicted == y_test).float().mean().item()


def parse_args(
    argv: list[str] | None = None, prog: str | None = None
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    choices = "; ".join(f"{name}: {text}" for name, (text, _) in FAULTS.items())
    parser.add_argument(
        "--fault",
        default="none",
        choices=sorted(FAULTS),
        help=f"bug to plant ({choices})",
    )
    parser.add_argument(
        "--logdir",
        type=Path,
        default=None,
        help="directory for TensorBoard event files (default: runs/digits/<fault>)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=20,
        help="number of passes over the training data (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="number of samples per optimizer step (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initialisation and the batch order (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the demo with command-line arguments ``argv``; return the exit status.

    The status is 1 when an error-severity alert was raised, else 0.
    """
    args = parse_args(argv, prog)
    logdir = args.logdir or Path("runs") / "digits" / args.fault
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    warnings.simplefilter("ignore")  # the alerts are logged and reported below

    torch.manual_seed(args.seed)
    setup = FAULTS[args.fault][1]()
    with gradwatch(setup.model, logdir=logdir, **setup.options) as gw:
        accuracy = train(setup, args.epochs, args.batch_size, args.seed)

    # The demo is a command: its output goes to stdout, not through a logger.
    out = sys.stdout
    out.write(
        f"fault: {args.fault}; test accuracy after {args.epochs} epochs: "
        f"{accuracy:.3f}\n"
    )
    out.write(gw.report() + "\n")
    out.write(f"TensorBoard: tensorboard --logdir {logdir}\n")
    return 1 if any(a.severity == "error" for a in gw.alerts) else 0
