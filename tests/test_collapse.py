"""representation_collapse: outputs that become the same for every sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from gradwatch import gradwatch
from gradwatch.detectors.collapse import batch_diversity


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    images, _ = load_digits(return_X_y=True)
    return torch.tensor(images / 16.0, dtype=torch.float32)


def _loud(gw) -> list:
    return [a for a in gw.alerts if a.severity in ("error", "warning")]


def test_diversity_of_identical_rows_is_zero():
    rows = torch.ones(16, 8) * torch.arange(8.0)
    spread, ratio, width = batch_diversity(rows).tolist()
    assert spread == pytest.approx(0.0, abs=1e-3)
    assert ratio == 0.0
    assert width == 8


def test_diversity_of_random_rows_is_high():
    rows = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    spread, ratio, width = batch_diversity(rows).tolist()
    assert spread > 0.9
    assert ratio > 0.3 * width


def test_diversity_ignores_a_shared_scale():
    rows = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    small = batch_diversity(rows)
    large = batch_diversity(rows * 1000.0)
    assert torch.allclose(small, large, rtol=1e-3)


def test_diversity_subset_of_features():
    rows = torch.randn(8, 4, 5, generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([0, 3, 7])
    expected = batch_diversity(rows.reshape(8, -1)[:, keep])
    assert torch.allclose(batch_diversity(rows, keep), expected)


class Siamese(nn.Module):
    """An encoder and a predictor trained on two masked views of each digit."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 32)
        )
        self.predictor = nn.Sequential(
            nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 32)
        )


def _train_siamese(images: torch.Tensor, stop_gradient: bool, steps: int = 40):
    torch.manual_seed(0)
    model = Siamese()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    views = torch.Generator().manual_seed(1)

    def view(x: torch.Tensor) -> torch.Tensor:
        return x * (torch.rand(x.shape, generator=views) > 0.3)

    with gradwatch(
        model, on_alert="ignore", watch_outputs=["encoder"], symmetry_every=4
    ) as gw:
        for step in range(steps):
            start = (step * 128) % (len(images) - 128)
            x = images[start : start + 128]
            z1, z2 = model.encoder(view(x)), model.encoder(view(x))
            if stop_gradient:
                p1, p2 = model.predictor(z1), model.predictor(z2)
                loss = (
                    -(
                        F.cosine_similarity(p1, z2.detach()).mean()
                        + F.cosine_similarity(p2, z1.detach()).mean()
                    )
                    / 2
                )
            else:
                loss = -F.cosine_similarity(z1, z2).mean()
                # The predictor is unused in this variant; keep it out of the
                # disconnect checks by giving it a zero-weighted term.
                loss = loss + 0.0 * model.predictor(z1).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return gw


def test_siamese_without_stop_gradient_collapses(digits):
    gw = _train_siamese(digits, stop_gradient=False)
    found = [a for a in gw.alerts if a.check == "representation_collapse"]
    assert [a.module for a in found] == ["encoder"]
    assert found[0].severity == "error"
    assert found[0].data["effective_rank"] < 0.05 * found[0].data["width"]
    assert "stop the gradient" in found[0].message


def test_siamese_with_stop_gradient_is_silent(digits):
    gw = _train_siamese(digits, stop_gradient=True)
    assert _loud(gw) == []


def test_zero_output_at_start_is_silent(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    labels = torch.tensor(load_digits().target)
    with gradwatch(model, on_alert="ignore", symmetry_every=1) as gw:
        for step in range(15):
            start = step * 64
            loss = F.cross_entropy(
                model(digits[start : start + 64]), labels[start : start + 64]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert _loud(gw) == []


def test_unknown_watched_module_raises():
    model = nn.Sequential(nn.Linear(4, 4))
    with (
        pytest.raises(ValueError, match="no module of the model is named 'encoder'"),
        gradwatch(model, watch_outputs=["encoder"]),
    ):
        pass


def test_narrow_regression_output_is_not_collapse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    with gradwatch(model, on_alert="ignore") as gw:
        for _ in range(6):
            optimizer.zero_grad()
            model(torch.randn(8, 4, generator=generator)).square().mean().backward()
            optimizer.step()

    assert [a.check for a in gw.alerts] == []
