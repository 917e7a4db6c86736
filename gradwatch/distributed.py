"""Sessions under ``torch.distributed``: the rank, and arrivals combined across ranks.

Each rank runs its own session and records which parameters received a gradient
in its own backward. At each step end, :class:`RankGroup` combines those records
with one all-reduce of a small integer vector: parameter ``i`` of the watched
table gets bit ``r % 63`` of word ``r // 63`` set by rank ``r``. Bits of
different ranks never overlap, so the sum the all-reduce computes is their
bitwise OR, and every rank learns which ranks each gradient arrived on. The
vector contains ``ceil(world_size / 63)`` int64 words per parameter.

Limitations:
    Every rank must build its session on the same model (as DDP requires) and
    end the same steps, because the all-reduce is a collective call. The step
    that the session's exit ends is judged on local arrivals only, since some
    ranks may have no such step. A process group whose backend has no CPU
    support (NCCL alone) gets the vector on the current CUDA device.
"""

from __future__ import annotations

import dataclasses
import gc
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from gradwatch.alerts import CHECKS
from gradwatch.detectors.base import Detector, StepContext
from gradwatch.errors import GradwatchWarning

if TYPE_CHECKING:
    from gradwatch.config import Options
    from gradwatch.params import ParamTable

__all__ = [
    "SHARDED_CHECKS",
    "RankGraphDetector",
    "RankGroup",
    "current_rank",
    "find_rank_group",
    "is_sharded",
    "sharded_options",
    "unwrap_ddp",
]

_BITS_PER_WORD = 63

#: The checks that run on FSDP2 models: those judged from gradient arrival and
#: gradient norms, which are combined across shards.
SHARDED_CHECKS = (
    "unused_parameter",
    "gradient_stopped",
    "zero_gradient",
    "graph_cut",
    "not_in_optimizer",
    "unregistered_parameter",
)


def unwrap_ddp(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """Return the user's module, and the DDP wrapper (None when there is none).

    Sessions watch the module that DDP and ``torch.compile`` wrap, so parameter
    names are those of the user's model (``fc.weight``, not ``module.fc.weight``
    or ``_orig_mod.fc.weight``), whether the session is given a wrapper or the
    module inside it. Wrappers nest in either order.
    """
    wrapper = None
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            wrapper = model
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod
        else:
            return model, wrapper


def is_sharded(model: nn.Module) -> bool:
    """Return whether ``model`` has FSDP2 (``fully_shard``) parameters.

    Raises:
        NotImplementedError: The model is sharded in a way gradwatch cannot
            combine: FSDP1 (``FullyShardedDataParallel``), or DTensor
            parameters on a mesh of more than one dimension (HSDP, tensor
            parallel) or not sharded on dim 0.
    """
    fsdp1 = _fsdp1_class()
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
        msg = (
            "gradwatch does not support FSDP1 (FullyShardedDataParallel), whose "
            "flat parameters hide the names of the model's parameters; shard the "
            "model with torch.distributed.fsdp.fully_shard (FSDP2) instead"
        )
        raise NotImplementedError(msg)
    sharded = False
    for name, param in model.named_parameters():
        mesh = getattr(param, "device_mesh", None)
        if mesh is None:
            continue
        placements = tuple(str(p) for p in param.placements)
        if mesh.ndim != 1 or placements != ("S(0)",):
            msg = (
                f"gradwatch supports FSDP2 on a 1-D device mesh with parameters "
                f"sharded on dim 0; parameter {name!r} has placements "
                f"{placements} on a {mesh.ndim}-D mesh (HSDP, tensor or "
                f"context parallel are not supported)"
            )
            raise NotImplementedError(msg)
        sharded = True
    return sharded


def sharded_options(options: Options) -> Options:
    """Return ``options`` restricted to the checks that run on FSDP2 shards.

    The unit, mask and numeric checks index rows and elements of parameters
    and gradients, which FSDP2 splits across ranks, so they do not run; a
    :class:`GradwatchWarning` lists them when ``checks`` is left at None.
    Histograms, which would show only this rank's shard, are switched off.

    Raises:
        NotImplementedError: ``checks``, ``masks`` or ``track_zeros`` requests a
            check that does not run on FSDP2 models.
    """
    # TODO: run the unit, mask and numeric checks on shards; they need per-row
    # and per-element figures combined across ranks, which are not built yet.
    if options.masks or options.track_zeros:
        msg = "masks and track_zeros do not support FSDP2 (fully_shard) models yet"
        raise NotImplementedError(msg)
    requested = options.checks if options.checks is not None else tuple(CHECKS)
    skipped = [check for check in requested if check not in SHARDED_CHECKS]
    if options.checks is not None and skipped:
        msg = (
            f"check(s) {skipped} do not support FSDP2 (fully_shard) models yet; "
            f"the checks that do are: {', '.join(SHARDED_CHECKS)}"
        )
        raise NotImplementedError(msg)
    if skipped:
        warnings.warn(
            f"gradwatch runs only {', '.join(SHARDED_CHECKS)} on FSDP2 "
            f"(fully_shard) models; {', '.join(skipped)} do not run",
            GradwatchWarning,
            stacklevel=4,
        )
    kept = tuple(check for check in requested if check in SHARDED_CHECKS)
    return dataclasses.replace(options, checks=kept, histogram_every=0)


def _fsdp1_class() -> type | None:
    import torch.distributed as dist

    if not dist.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def _is_compiled(model: nn.Module) -> bool:
    """Return whether ``model`` is the wrapper that ``torch.compile`` returns."""
    return type(model).__name__ == "OptimizedModule" and isinstance(
        getattr(model, "_orig_mod", None), nn.Module
    )


@dataclasses.dataclass(frozen=True)
class RankGroup:
    """The ranks of the default process group that combine arrivals each step."""

    rank: int
    world_size: int

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(range(self.world_size))

    def combine(self, table: ParamTable) -> dict[int, frozenset[int]]:
        """Return, per watched tensor id, the ranks its gradient arrived on.

        Calls one all-reduce on every rank; each rank must call it at the same
        step. The table's own ``arrived`` set gains the tensors whose gradient
        arrived on any rank, because DDP averages such a gradient into every
        rank's ``.grad``.
        """
        import torch.distributed as dist

        infos = [info for info in table if info.tensor.requires_grad]
        words = -(-self.world_size // _BITS_PER_WORD)
        flags = torch.zeros(len(infos), words, dtype=torch.int64)
        word, bit = divmod(self.rank, _BITS_PER_WORD)
        local = [i for i, info in enumerate(infos) if id(info.tensor) in table.arrived]
        flags[local, word] = 1 << bit
        flags = flags.to(_collective_device())
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        masks = flags.cpu().tolist()

        combined: dict[int, frozenset[int]] = {}
        for info, mask in zip(infos, masks, strict=True):
            ranks = frozenset(
                rank
                for rank in range(self.world_size)
                if mask[rank // _BITS_PER_WORD] >> (rank % _BITS_PER_WORD) & 1
            )
            combined[id(info.tensor)] = ranks
            if ranks:
                table.arrived.add(id(info.tensor))
        return combined


def find_rank_group(
    model: nn.Module,
    wrapper: nn.Module | None,
    option: bool | None,
    sharded: bool = False,
) -> RankGroup | None:
    """Return the rank group a session combines arrivals over, or None.

    ``option`` is the session's ``distributed`` option: None combines them when
    ``torch.distributed`` is initialised with more than one rank and the model
    is wrapped in DDP (given as the wrapper or as its ``.module``) or
    ``sharded`` by FSDP2; True combines them whenever the process group has
    more than one rank; False never does.

    Raises:
        RuntimeError: ``option`` is True but ``torch.distributed`` is not
            initialised.
        ValueError: ``option`` is False for a ``sharded`` model.
    """
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if option is True and not initialised:
        msg = (
            "gradwatch(..., distributed=True) needs an initialised process group; "
            "call torch.distributed.init_process_group() before the session starts"
        )
        raise RuntimeError(msg)
    if option is False and sharded:
        msg = (
            "gradwatch(..., distributed=False) cannot watch an FSDP2 model, because "
            "its gradient norms are combined across ranks at every step; leave "
            "distributed at None"
        )
        raise ValueError(msg)
    if option is False or not initialised or dist.get_world_size() < 2:
        return None
    automatic = sharded or wrapper is not None
    if option is None and not automatic and not _wrapped_by_ddp(model):
        return None
    return RankGroup(dist.get_rank(), dist.get_world_size())


def current_rank() -> int | None:
    """Return this process's rank, or None outside an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return None


def _wrapped_by_ddp(model: nn.Module) -> bool:
    """Return whether a live DDP wrapper contains ``model`` (walks gc's objects)."""
    ddp = nn.parallel.DistributedDataParallel
    return any(
        type(candidate) is ddp and candidate.module is model
        for candidate in gc.get_objects()
    )


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclasses.dataclass
class _RankStreak:
    steps: int = 0
    missing: frozenset[int] = frozenset()
    alerted: bool = False


class RankGraphDetector(Detector):
    """Flag parameters whose gradient arrives on some ranks and not on others.

    Check: ``unused_parameter`` as a warning with ``data["scope"] ==
    "some_ranks"`` and ``ranks`` naming the ranks without a gradient. DDP raises
    a reducer error on such a graph unless ``find_unused_parameters`` or
    ``static_graph`` is set; with either, it averages zeros from the ranks that
    skipped the parameter into its gradient.

    Limitations:
        A mixture of experts whose routing leaves an expert without tokens on
        some ranks for ``patience`` steps in a row is reported too.
    """

    def __init__(self, options: Options, group: RankGroup) -> None:
        super().__init__(options)
        self._group = group

    def analyse(self, ctx: StepContext) -> None:
        if ctx.arrival_ranks is None:
            return
        for info in ctx.judged:
            state = info.state.setdefault("rank_streak", _RankStreak())
            assert isinstance(state, _RankStreak)
            arrived = ctx.arrival_ranks.get(id(info.tensor), frozenset())
            if not arrived or len(arrived) == self._group.world_size:
                state.steps = 0
                state.alerted = False
                continue
            missing = frozenset(self._group.ranks) - arrived
            state.steps = state.steps + 1 if missing == state.missing else 1
            state.missing = missing
            if state.steps >= self.options.patience and not state.alerted:
                state.alerted = True
                self._alert(ctx, info, arrived, missing, state.steps)

    def _alert(self, ctx, info, arrived, missing, steps) -> None:
        message = (
            f"Parameter {info.describe()} in module `{info.module or '<root>'}` "
            f"received a gradient on rank(s) {_listed(arrived)} but none on rank(s) "
            f"{_listed(missing)} for {steps} step(s) up to step {ctx.step}: the "
            f"graph depends on the rank. DDP raises a reducer error on such a "
            f"graph unless find_unused_parameters or static_graph is set, and with "
            f"them it averages zeros from rank(s) {_listed(missing)} into the "
            f"gradient. Make the forward take the same "
            f"branches on every rank, or freeze the parameter if it is not meant "
            f"to learn."
        )
        ctx.alert(
            "unused_parameter",
            message,
            param=info,
            step=ctx.step - steps + 1,
            severity="warning",
            ranks=tuple(sorted(missing)),
            data={
                "scope": "some_ranks",
                "ranks_with_gradient": sorted(arrived),
                "steps": steps,
            },
        )


def _listed(ranks: frozenset[int]) -> str:
    return ", ".join(str(r) for r in sorted(ranks))
