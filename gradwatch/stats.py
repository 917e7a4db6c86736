"""Per-step gradient and weight norms, computed with foreach ops on the device."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from gradwatch.detectors.base import Detector, StepContext
from gradwatch.transfer import Pending

__all__ = ["GradientNorms", "foreach_norms"]

# On CPU, torch._foreach_norm runs one kernel per tensor, about 1.4 us each for
# 16x16 tensors (torch 2.13, one thread of a 2-core AMD EPYC), and stacking
# the 0-d results costs another 0.4 us each. Small tensors that share a shape
# are instead copied into one stack, at most _STACK_BUDGET elements at a time,
# and measured by one vector_norm call: a few kernels for the whole group.
_MIN_STACKED = 8
_STACKED_NUMEL = 4096
_STACK_BUDGET = 1 << 20


def foreach_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return the L2 norm of each tensor as one float32 vector, in input order.

    Norms are accumulated in float32 whatever the tensors' dtype. Tensors are
    grouped by device and dtype for ``torch._foreach_norm``; a sparse tensor's
    norm is that of its stored values.
    """
    if not tensors:
        return torch.zeros(0)
    if any(_is_dtensor(t) for t in tensors):
        return _combined_shard_norms(tensors)
    keys = [(t.device, t.dtype, t.is_sparse) for t in tensors]
    with torch.no_grad():
        if not keys[0][2] and keys.count(keys[0]) == len(keys):
            return _dense_norms(tensors)
        return _grouped_norms(tensors, keys)


def _grouped_norms(
    tensors: Sequence[torch.Tensor], keys: list[tuple[torch.device, torch.dtype, bool]]
) -> torch.Tensor:
    """Return the norms of tensors of several devices, dtypes or layouts."""
    groups: dict[tuple[torch.device, torch.dtype, bool], list[int]] = defaultdict(list)
    for index, key in enumerate(keys):
        groups[key].append(index)

    device = tensors[0].device
    norms = torch.empty(len(tensors), dtype=torch.float32, device=device)
    for (_, _, sparse), indices in groups.items():
        members = [tensors[i] for i in indices]
        if sparse:
            members = [t._values() for t in members]
        group_norms = _dense_norms(members)
        position = torch.tensor(indices, device=device)
        norms.index_copy_(0, position, group_norms.to(device))
    return norms


def _dense_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return the float32 norms of dense tensors of one device and dtype."""
    if tensors[0].device.type != "cpu" or len(tensors) < _MIN_STACKED:
        return torch.stack(_float32_norms(list(tensors)))

    by_shape: dict[torch.Size, list[int]] = defaultdict(list)
    for index, tensor in enumerate(tensors):
        by_shape[tensor.shape].append(index)
    order: list[int] = []
    parts: list[torch.Tensor] = []
    alone: list[int] = []
    for shape, indices in by_shape.items():
        if len(indices) < _MIN_STACKED or shape.numel() > _STACKED_NUMEL:
            alone.extend(indices)
            continue
        for chunk in _chunks(indices, _STACK_BUDGET // max(shape.numel(), 1)):
            stacked = torch.stack([tensors[i] for i in chunk]).flatten(1)
            parts.append(torch.linalg.vector_norm(stacked, dim=1, dtype=torch.float32))
            order.extend(chunk)
    if alone:
        parts.append(torch.stack(_float32_norms([tensors[i] for i in alone])))
        order.extend(alone)

    norms = torch.empty(len(tensors), dtype=torch.float32)
    return norms.index_copy_(0, torch.tensor(order), torch.cat(parts))


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    size = max(size, 1)
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def _combined_shard_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return full-tensor norms of FSDP2 shards: local norms, one all-reduce.

    Every rank must call this with the same tensors in the same order, because
    an all-reduce over the process group of the first DTensor's device mesh
    sums the squared norms of the shards. The session checks when it starts
    that the mesh is 1-D and that every DTensor is sharded on dim 0.
    """
    import torch.distributed as dist

    sharded = [_is_dtensor(t) for t in tensors]
    local = [t.to_local() if s else t for t, s in zip(tensors, sharded, strict=True)]
    squares = foreach_norms(local).square()
    mask = torch.tensor(sharded, device=squares.device)
    summed = torch.where(mask, squares, torch.zeros_like(squares))
    mesh = next(t for t, s in zip(tensors, sharded, strict=True) if s).device_mesh
    dist.all_reduce(summed, group=mesh.get_group())
    return torch.where(mask, summed, squares).sqrt()


def _float32_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Return the L2 norms accumulated and returned in float32.

    A float16 gradient whose elements are all finite can have a norm above
    65504, the largest float16 value, so its norm must not be rounded to float16.
    """
    try:
        return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    except TypeError:
        # NOTE: older torch releases lack the dtype argument; upcasting copies.
        return list(torch._foreach_norm([t.float() for t in tensors]))


class GradientNorms(Detector):
    """Fill ``ctx.grad_norms`` and ``ctx.param_norms`` for the judged parameters.

    Gradient norms are measured at every step, in one foreach call. Weights change
    slowly, so their norms are measured on the first steps and every
    ``log_every`` steps; other steps see the last measured value. This detector
    must run before the detectors that read those figures.
    """

    def __init__(self, options) -> None:
        super().__init__(options)
        self._pending: tuple[list[int], Pending, bool] | None = None
        self._generation = -1
        self._weight_norms: dict[int, float] = {}

    def _measures_weights(self, step: int) -> bool:
        return step < self.options.patience or step % self.options.log_every == 0

    def collect(self, ctx: StepContext) -> None:
        if ctx.table.generation != self._generation:
            # The model was rescanned: forget the norms of tensors that left it.
            self._generation = ctx.table.generation
            present = {id(info.tensor) for info in ctx.table}
            self._weight_norms = {
                key: norm for key, norm in self._weight_norms.items() if key in present
            }
        tensors, grads = self._arrived(ctx)
        if not tensors:
            self._pending = None
            return
        norms = foreach_norms(grads)
        measure = self._measures_weights(ctx.step)
        if measure:
            weights = [tensor.detach() for tensor in tensors]
            norms = torch.cat([norms, foreach_norms(weights)])
        keys = [id(tensor) for tensor in tensors]
        self._pending = (keys, ctx.batch.add(norms), measure)

    @staticmethod
    def _arrived(ctx: StepContext) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Return the judged tensors whose gradient arrived, and those gradients."""
        arrived = ctx.table.arrived
        tensors, grads = [], []
        for info in ctx.judged:
            tensor = info.tensor
            grad = tensor.grad
            if grad is not None and id(tensor) in arrived:
                tensors.append(tensor)
                grads.append(grad)
        return tensors, grads

    def analyse(self, ctx: StepContext) -> None:
        ctx.param_norms = self._weight_norms
        if self._pending is None:
            return
        keys, pending, measure = self._pending
        self._pending = None
        count = len(keys)
        values = pending.values
        ctx.grad_norms.update(zip(keys, values[:count], strict=True))
        if measure:
            self._weight_norms.update(zip(keys, values[count:], strict=True))
