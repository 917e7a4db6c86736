"""Per-step gradient and weight norms, computed with foreach ops on the device."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from gradwatch.detectors.base import Detector, StepContext
from gradwatch.params import ParamInfo
from gradwatch.transfer import Pending

__all__ = ["GradientNorms", "foreach_norms"]


def foreach_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return the L2 norm of each tensor as one float32 vector, in input order.

    Tensors are grouped by device and dtype for ``torch._foreach_norm``; a sparse
    tensor's norm is that of its stored values.
    """
    if not tensors:
        return torch.zeros(0)
    groups: dict[tuple[torch.device, torch.dtype, bool], list[int]] = defaultdict(list)
    for index, tensor in enumerate(tensors):
        groups[(tensor.device, tensor.dtype, tensor.is_sparse)].append(index)

    device = tensors[0].device
    norms = torch.empty(len(tensors), dtype=torch.float32, device=device)
    with torch.no_grad():
        for (_, _, sparse), indices in groups.items():
            members = [tensors[i] for i in indices]
            if sparse:
                members = [t._values() for t in members]
            group_norms = torch.stack(torch._foreach_norm(members)).float()
            position = torch.tensor(indices, device=device)
            norms.index_copy_(0, position, group_norms.to(device))
    return norms


class GradientNorms(Detector):
    """Fill ``ctx.grad_norms`` and ``ctx.param_norms`` for the judged parameters.

    It must run before the detectors that read those figures.
    """

    def __init__(self, options) -> None:
        super().__init__(options)
        self._pending: tuple[list[ParamInfo], Pending] | None = None

    def collect(self, ctx: StepContext) -> None:
        infos = [
            info
            for info in ctx.judged
            if ctx.arrived(info) and info.tensor.grad is not None
        ]
        if not infos:
            self._pending = None
            return
        grads = [info.tensor.grad for info in infos]
        weights = [info.tensor.detach() for info in infos]
        norms = torch.cat([foreach_norms(grads), foreach_norms(weights)])
        self._pending = (infos, ctx.batch.add(norms))

    def analyse(self, ctx: StepContext) -> None:
        if self._pending is None:
            return
        infos, pending = self._pending
        self._pending = None
        count = len(infos)
        for index, info in enumerate(infos):
            ctx.grad_norms[id(info.tensor)] = pending.values[index]
            ctx.param_norms[id(info.tensor)] = pending.values[count + index]
