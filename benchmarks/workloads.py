"""The benchmark workloads: a model, its optimizer, and one training step each.

Every builder takes a seed and returns a fresh :class:`Workload`, so each variant
owns its own model copy built from the same seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class Workload:
    """A model, its optimizer and a closure that runs one full training step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], None]


def _classifier_step(model, optimizer, x, y):
    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def w1_digits_mlp(seed: int) -> Workload:
    """MLP 64-256-256-10 on scikit-learn's digits, batch 128."""
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images[:128] / 16.0, dtype=torch.float32)
    y = torch.tensor(labels[:128])
    model = nn.Sequential(
        nn.Linear(64, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Workload(model, optimizer, _classifier_step(model, optimizer, x, y))


def w2_cnn(seed: int) -> Workload:
    """CNN: conv 32, conv 64, fc 128, fc 10 on random 1x28x28 images, batch 64."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    return Workload(model, optimizer, _classifier_step(model, optimizer, x, y))


def w3_gpt2(seed: int) -> Workload:
    """GPT-2 from a config (4 layers, width 256, 4 heads, vocab 5000), length 128."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=4,
        n_embd=256,
        n_head=4,
        vocab_size=5000,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    tokens = torch.randint(0, 5000, (8, 128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()

    return Workload(model, optimizer, step)


def w4_deep_mlp(seed: int) -> Workload:
    """48 x Linear(256, 256) with ReLU: many parameter tensors, batch 128."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(48):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(256, 10))
    x, y = torch.randn(128, 256), torch.randint(0, 10, (128,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    return Workload(model, optimizer, _classifier_step(model, optimizer, x, y))


class _ResidualStack(nn.Module):
    """x + 0.1 tanh(layer(x)) per layer: deep, yet gradients reach every layer."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + 0.1 * torch.tanh(layer(x))
        return x


def w5_scaling(tensors: int) -> Callable[[int], Workload]:
    """A residual MLP of ``tensors`` parameter tensors (Linear(16, 16)), batch 32."""

    def build(seed: int) -> Workload:
        torch.manual_seed(seed)
        model = _ResidualStack(tensors // 2)
        x, y = torch.randn(32, 16), torch.randint(0, 16, (32,))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        return Workload(model, optimizer, _classifier_step(model, optimizer, x, y))

    return build


WORKLOADS: dict[str, Callable[[int], Workload]] = {
    "W1": w1_digits_mlp,
    "W2": w2_cnn,
    "W3": w3_gpt2,
    "W4": w4_deep_mlp,
    "W5-10": w5_scaling(10),
    "W5-100": w5_scaling(100),
    "W5-1000": w5_scaling(1000),
}
