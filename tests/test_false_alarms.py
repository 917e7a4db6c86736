"""False-alarm zoo: healthy, realistic training runs that gradwatch must leave silent.

Each test trains a small model for 20 to 50 steps under the default
configuration and requires zero error or warning alerts and zero gradwatch
warnings. Info alerts are allowed: they record facts that are not faults.
docs/false_alarms.md lists every model here with what makes it hard.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from gradwatch import GradwatchWarning, gradwatch


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits (bundled with the package, no download)."""
    datasets = pytest.importorskip("sklearn.datasets")
    images, labels = datasets.load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0
    return x, torch.tensor(labels)


def batches(data, size=64, seed=0):
    """Yield random mini-batches of ``data`` forever, from a private generator."""
    x, y = data
    generator = torch.Generator().manual_seed(seed)
    while True:
        index = torch.randint(len(x), (size,), generator=generator)
        yield x[index], y[index]


def assert_silent(model, train_step, steps=30, **options):
    """Run ``train_step(step)`` ``steps`` times under gradwatch; require silence.

    Returns the session so a test can check more (step count, info alerts).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch(model, **options) as gw:
            for step in range(steps):
                train_step(step)

    loud = [str(a) for a in gw.alerts if a.severity in ("error", "warning")]
    assert loud == [], "\n".join(loud)
    ours = [str(w.message) for w in caught if issubclass(w.category, GradwatchWarning)]
    assert ours == [], "\n".join(ours)
    return gw


def sgd_step(model, optimizer, loss_fn):
    """Return a ``train_step`` doing zero_grad, ``loss_fn().backward()``, step."""

    def train_step(step):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(step).backward()
        optimizer.step()

    return train_step


# Digits classifiers


def test_mlp_on_digits(digits):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = batches(digits)

    def loss(_step):
        x, y = next(data)
        return F.cross_entropy(model(x), y)

    gw = assert_silent(model, sgd_step(model, optimizer, loss))
    assert gw.step == 30


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(16, 10)

    def forward(self, x):
        return self.classifier(self.features(x.view(-1, 1, 8, 8)).flatten(1))


def test_cnn_on_digits(digits):
    torch.manual_seed(0)
    model = DigitsCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = batches(digits)

    def loss(_step):
        x, y = next(data)
        return F.cross_entropy(model(x), y)

    assert_silent(model, sgd_step(model, optimizer, loss))


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity, the last BN scale set to zero."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


class ResNet(nn.Module):
    def __init__(self, channels=8, blocks=3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(*(ResidualBlock(channels) for _ in range(blocks)))
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x.view(-1, 1, 8, 8)))
        return self.head(x.mean(dim=(2, 3)))


def test_resnet_with_zero_init_last_batch_norm(digits):
    torch.manual_seed(0)
    model = ResNet()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4
    )
    data = batches(digits)

    def loss(_step):
        x, y = next(data)
        return F.cross_entropy(model(x), y)

    assert_silent(model, sgd_step(model, optimizer, loss))


# Language models


def token_batches(vocab, length, size=8, seed=0):
    """Yield next-token batches of a repeating pattern a model can learn."""
    generator = torch.Generator().manual_seed(seed)
    pattern = torch.arange(length + 1) % vocab
    while True:
        shift = torch.randint(vocab, (size, 1), generator=generator)
        tokens = (pattern + shift) % vocab
        yield tokens[:, :-1], tokens[:, 1:]


def test_small_gpt_from_transformers_config():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2
    )
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = token_batches(64, 16)

    def loss(_step):
        inputs, _ = next(data)
        return model(input_ids=inputs, labels=inputs).loss

    assert_silent(model, sgd_step(model, optimizer, loss), steps=20)


class RecurrentLM(nn.Module):
    def __init__(self, cell, vocab=32, width=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = cell(width, width, num_layers=2, batch_first=True)
        self.out = nn.Linear(width, vocab)

    def forward(self, tokens):
        hidden, _ = self.rnn(self.embed(tokens))
        return self.out(hidden)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_recurrent_language_model(cell):
    torch.manual_seed(0)
    model = RecurrentLM(cell)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = token_batches(32, 12)

    def loss(_step):
        inputs, targets = next(data)
        return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())

    assert_silent(model, sgd_step(model, optimizer, loss))


class TiedLM(nn.Module):
    """Embedding and output layer share one weight."""

    def __init__(self, vocab=48, width=24):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.embed(tokens))))


def test_tied_input_and_output_embeddings():
    torch.manual_seed(0)
    model = TiedLM()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = token_batches(48, 10)

    def loss(_step):
        inputs, targets = next(data)
        return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())

    assert_silent(model, sgd_step(model, optimizer, loss))


class SparseBag(nn.Module):
    def __init__(self, vocab=200, width=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width, sparse=True)
        self.head = nn.Linear(width, 2)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(dim=1))


def test_sparse_embedding_with_sparse_adam():
    torch.manual_seed(0)
    model = SparseBag()
    sparse = torch.optim.SparseAdam(list(model.embed.parameters()), lr=1e-2)
    dense = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)

    def train_step(_step):
        tokens = torch.randint(200, (32, 6), generator=generator)
        labels = (tokens < 100).sum(dim=1).gt(3).long()
        sparse.zero_grad()
        dense.zero_grad()
        F.cross_entropy(model(tokens), labels).backward()
        sparse.step()
        dense.step()

    gw = assert_silent(model, train_step)
    assert gw.step == 60


# Training-loop patterns


def test_gradient_accumulation_over_four_micro_batches(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(digits, size=16)

    def train_step(_step):
        optimizer.zero_grad()
        for _ in range(4):
            x, y = next(data)
            (F.cross_entropy(model(x), y) / 4).backward()
        optimizer.step()

    gw = assert_silent(model, train_step, steps=25)
    assert gw.step == 25


def test_gradient_clipping(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    data = batches(digits)

    def train_step(_step):
        x, y = next(data)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
        optimizer.step()

    assert_silent(model, train_step)


class LayerDropMLP(nn.Module):
    """Pre-norm residual blocks, each skipped at random in training."""

    def __init__(self, width=32, depth=6, drop=0.5, seed=0):
        super().__init__()
        self.stem = nn.Linear(64, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU())
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 10)
        self.drop = drop
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            keep = torch.rand((), generator=self.generator).item() >= self.drop
            if not self.training or keep:
                x = x + block(x)
        return self.head(x)


@pytest.mark.parametrize("seed", range(4))
def test_stochastic_depth_with_default_patience(digits, seed):
    torch.manual_seed(seed)
    model = LayerDropMLP(seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = batches(digits, seed=seed)

    def loss(_step):
        x, y = next(data)
        return F.cross_entropy(model(x), y)

    assert_silent(model, sgd_step(model, optimizer, loss), steps=50)


class ScheduledHeads(nn.Module):
    """A trunk and task heads; ``schedule[step]`` lists the heads used at a step."""

    def __init__(self, schedule, heads=3):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(32, 10) for _ in range(heads))
        self.schedule = schedule
        self.calls = 0

    def forward(self, x):
        used = self.schedule[self.calls]
        self.calls += 1
        h = self.trunk(x)
        return sum(self.heads[index](h) for index in used)


def train_scheduled(digits, schedule, heads=3):
    torch.manual_seed(0)
    model = ScheduledHeads(schedule, heads)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = batches(digits)

    def loss(_step):
        x, y = next(data)
        return F.cross_entropy(model(x), y)

    return model, sgd_step(model, optimizer, loss)


def test_sampled_head_first_drawn_late_is_silent(digits):
    # Heads drawn at random: head 1 first comes up at step 6, after two heads
    # have already shown that the forward changes from step to step.
    schedule = [(0,), (2,), (0,), (0,), (2,), (0,), (1,), (2,), (1,), (0,)] * 4
    model, train_step = train_scheduled(digits, schedule)

    assert_silent(model, train_step, steps=len(schedule))


def test_randomly_skipped_layer_long_gap_is_silent(digits):
    # A layer kept with probability 0.7 misses 6 steps in a row after step 36;
    # a run that long comes up within 37 steps about once in 60 runs.
    pattern = "xxxxxxxxx.xxx.xxxxxxx.xx.xxxx.xxx..xx......x.x.xxx"
    schedule = [(0, 1) if used == "x" else (1,) for used in pattern]
    model, train_step = train_scheduled(digits, schedule, heads=2)

    assert_silent(model, train_step, steps=len(schedule))


def test_unused_layer_beside_alternating_heads_is_reported(digits):
    schedule = [(0,), (1,)] * 25
    model, train_step = train_scheduled(digits, schedule, heads=3)
    with gradwatch(model, on_alert="ignore") as gw:
        for step in range(len(schedule)):
            train_step(step)

    unused = [a for a in gw.alerts if a.check == "unused_parameter"]
    assert sorted(a.param for a in unused) == ["heads.2.bias", "heads.2.weight"]
    assert all(a.step == 0 for a in unused)
    assert [a.check for a in gw.alerts if a.severity != "info"] == [
        "unused_parameter"
    ] * 2
    # Reported once both heads have shown their rate of one step in two: the
    # first report holds at about 30 of the 50 steps.
    assert 25 <= unused[0].count <= 35


class TwoTaskNet(nn.Module):
    """A shared trunk with a digit head and a parity head."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.digit = nn.Linear(32, 10)
        self.parity = nn.Linear(32, 2)

    def forward(self, x, task):
        return getattr(self, task)(self.trunk(x))


def test_multi_task_with_alternating_heads(digits):
    torch.manual_seed(0)
    model = TwoTaskNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = batches(digits)

    def loss(step):
        x, y = next(data)
        if step % 2 == 0:
            return F.cross_entropy(model(x, "digit"), y)
        return F.cross_entropy(model(x, "parity"), y % 2)

    assert_silent(model, sgd_step(model, optimizer, loss), steps=40)


class BalancedMoE(nn.Module):
    """Top-1 mixture of experts; the gate probability scales each expert's output."""

    def __init__(self, experts=4, width=32):
        super().__init__()
        self.stem = nn.Linear(64, width)
        self.router = nn.Linear(width, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(experts)
        )
        self.head = nn.Linear(width, 10)
        self.aux_loss = torch.zeros(())

    def forward(self, x):
        h = F.relu(self.stem(x))
        probs = self.router(h).softmax(dim=-1)
        gate, choice = probs.max(dim=-1)
        out = torch.zeros_like(h)
        for index, expert in enumerate(self.experts):
            chosen = choice == index
            if chosen.any():
                out[chosen] = gate[chosen, None] * expert(h[chosen])
        # Switch-style load-balancing loss keeps every expert in use.
        load = F.one_hot(choice, len(self.experts)).float().mean(dim=0)
        self.aux_loss = len(self.experts) * (load * probs.mean(dim=0)).sum()
        return self.head(h + out)


def test_balanced_mixture_of_experts(digits):
    torch.manual_seed(0)
    model = BalancedMoE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = batches(digits)

    def loss(_step):
        x, y = next(data)
        return F.cross_entropy(model(x), y) + 0.01 * model.aux_loss

    assert_silent(model, sgd_step(model, optimizer, loss))


def test_correctly_pruned_model(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    prune.l1_unstructured(model[0], "weight", amount=0.6)
    prune.ln_structured(model[2], "weight", amount=0.25, n=2, dim=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = batches(digits)

    def loss(_step):
        x, y = next(data)
        return F.cross_entropy(model(x), y)

    assert_silent(model, sgd_step(model, optimizer, loss))
    assert (model[0].weight == 0).float().mean() >= 0.6


class Siamese(nn.Module):
    """One tower applied to both inputs: its weights are tied by reuse.

    The last layer has no bias: a contrastive loss sees only the difference of
    the two embeddings, in which such a bias cancels.
    """

    def __init__(self, last_bias=False):
        super().__init__()
        self.tower = nn.Sequential(
            nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16, bias=last_bias)
        )

    def forward(self, a, b):
        return self.tower(a), self.tower(b)


def train_siamese(digits, last_bias=False):
    torch.manual_seed(0)
    model = Siamese(last_bias)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    first, second = batches(digits, seed=1), batches(digits, seed=2)

    def loss(_step):
        (a, ya), (b, yb) = next(first), next(second)
        za, zb = model(a, b)
        distance = (za - zb).norm(dim=1)
        same = (ya == yb).float()
        margin = F.relu(1.0 - distance)
        return (same * distance.square() + (1 - same) * margin.square()).mean()

    return model, sgd_step(model, optimizer, loss)


def test_weight_tied_siamese_towers(digits):
    model, train_step = train_siamese(digits)

    assert_silent(model, train_step)


def test_siamese_bias_that_cancels_is_zero_gradient(digits):
    # Not a false alarm: the loss does not depend on this bias at all, so its
    # gradient is exactly zero at every step and it never learns.
    model, train_step = train_siamese(digits, last_bias=True)
    with gradwatch(model, on_alert="ignore") as gw:
        for step in range(10):
            train_step(step)

    (alert,) = [a for a in gw.alerts if a.severity != "info"]
    assert alert.check == "zero_gradient"
    assert alert.param == "tower.2.bias"
    assert "cancels in the difference" in alert.message


class GAN(nn.Module):
    def __init__(self, noise=8):
        super().__init__()
        self.noise = noise
        self.generator = nn.Sequential(
            nn.Linear(noise, 32), nn.LeakyReLU(0.2), nn.Linear(32, 64), nn.Sigmoid()
        )
        self.discriminator = nn.Sequential(
            nn.Linear(64, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1)
        )


def test_gan_with_alternating_optimizers(digits):
    torch.manual_seed(0)
    model = GAN()
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=2e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(
        model.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.9)
    )
    data = batches(digits)
    generator = torch.Generator().manual_seed(0)

    def train_step(_step):
        real, _ = next(data)
        z = torch.randn(len(real), model.noise, generator=generator)
        fake = model.generator(z)

        opt_d.zero_grad()
        real_logits = model.discriminator(real)
        fake_logits = model.discriminator(fake.detach())
        loss_d = F.binary_cross_entropy_with_logits(
            real_logits, torch.ones_like(real_logits)
        ) + F.binary_cross_entropy_with_logits(
            fake_logits, torch.zeros_like(fake_logits)
        )
        loss_d.backward()
        opt_d.step()

        opt_g.zero_grad()
        fake_logits = model.discriminator(fake)
        F.binary_cross_entropy_with_logits(
            fake_logits, torch.ones_like(fake_logits)
        ).backward()
        opt_g.step()

    gw = assert_silent(model, train_step, steps=25)
    assert gw.step == 50


class GrowingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)
        self.extra = None

    def forward(self, x):
        h = self.body(x)
        if self.extra is not None:
            h = h + F.relu(self.extra(h))
        return self.head(h)


def test_parameters_added_mid_run(digits):
    torch.manual_seed(0)
    model = GrowingNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = batches(digits)

    def train_step(step):
        if step == 10:
            model.extra = nn.Linear(32, 32)
            optimizer.add_param_group({"params": model.extra.parameters()})
        x, y = next(data)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    assert_silent(model, train_step)


# Fine-tuning


class FrozenBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = DigitsCNN().features
        self.head = nn.Linear(16, 10)
        self.backbone.requires_grad_(False)

    def forward(self, x):
        return self.head(self.backbone(x.view(-1, 1, 8, 8)).flatten(1))


def test_frozen_backbone_trainable_head(digits):
    torch.manual_seed(0)
    model = FrozenBackbone()
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1)
    data = batches(digits)

    def loss(_step):
        x, y = next(data)
        return F.cross_entropy(model(x), y)

    assert_silent(model, sgd_step(model, optimizer, loss))


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``B @ A``, B zero."""

    def __init__(self, base, rank=4, alpha=8.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.lora_a.T @ self.lora_b.T)


class TokenClassifier(nn.Module):
    """A frozen transformer encoder with LoRA adapters on its feed-forward layers."""

    def __init__(self, vocab=32, width=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(
            width, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(width, 2)
        self.requires_grad_(False)
        for block in self.encoder.layers:
            block.linear1 = LoRALinear(block.linear1)
            block.linear2 = LoRALinear(block.linear2)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_lora_adapters_on_frozen_transformer():
    torch.manual_seed(0)
    model = TokenClassifier()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 8
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    generator = torch.Generator().manual_seed(0)

    def loss(_step):
        tokens = torch.randint(32, (16, 8), generator=generator)
        labels = (tokens < 16).sum(dim=1).gt(4).long()
        return F.cross_entropy(model(tokens), labels)

    assert_silent(model, sgd_step(model, optimizer, loss))
