"""Train a small classifier with DDP under gradwatch, on CPU with the gloo backend.

Launch it with torchrun::

    torchrun --nproc-per-node 2 examples/train_ddp.py
    torchrun --nproc-per-node 2 examples/train_ddp.py --fault rank-branch

``--fault unused`` adds a head that no rank calls (an ``unused_parameter``
alert on every rank); ``--fault rank-branch`` calls it on rank 1 only (a
``unused_parameter`` warning on rank 0 only, scope ``some_ranks``). Both
faults need ``find_unused_parameters=True``, without which DDP itself stops
with a reducer error. Rank 0 writes the
TensorBoard event files under ``--logdir``.
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.distributed as dist
from torch import nn

from gradwatch import gradwatch

FAULTS = ("none", "unused", "rank-branch")


class Classifier(nn.Module):
    def __init__(self, fault: str) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.extra_head = nn.Linear(4, 4)
        self.fault = fault

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.body(x)
        if self.fault == "rank-branch" and dist.get_rank() == 1:
            logits = logits + self.extra_head(logits)
        return logits


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fault", choices=FAULTS, default="none")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--logdir", default=None, help="TensorBoard directory")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    try:
        torch.manual_seed(0)
        model = Classifier(args.fault)
        find_unused = args.fault != "none"
        ddp = nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=find_unused
        )
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        data = torch.Generator().manual_seed(rank)

        with gradwatch(ddp, logdir=args.logdir) as gw:
            for _ in range(args.steps):
                x = torch.randn(32, 16, generator=data)
                y = torch.randint(0, 4, (32,), generator=data)
                optimizer.zero_grad()
                nn.functional.cross_entropy(ddp(x), y).backward()
                optimizer.step()
        if rank == 0:
            print(gw.report())
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
