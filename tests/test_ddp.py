"""Sessions under DDP: real two-rank jobs on the gloo backend, on 127.0.0.1.

One job of two forked processes runs every scenario in turn, because forking
pays the cost of starting torch once per job. Each rank writes its alerts to a
JSON file that the tests read. The job takes about 10 s on two CPU cores, so
the tests that read it are marked slow; CI runs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gradwatch import gradwatch
from gradwatch.config import Options
from gradwatch.distributed import SHARDED_CHECKS, sharded_options
from gradwatch.errors import GradwatchWarning

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available",
)

try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    FSDP2_AVAILABLE = True
except ImportError:
    FSDP2_AVAILABLE = False

WORLD_SIZE = 2
STEPS = 4
JOB_TIMEOUT_S = 120


class Net(nn.Module):
    """Two layers, and a branch ``b`` taken when ``use_branch(rank)`` is true."""

    def __init__(self, use_branch) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 1)
        self.use_branch = use_branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.use_branch(dist.get_rank()):
            h = self.b(h)
        return self.c(h)


def _always(rank: int) -> bool:
    return True


def _never(rank: int) -> bool:
    return False


def _on_rank_1(rank: int) -> bool:
    return rank == 1


def _train(ddp: nn.Module, watched: nn.Module, rank: int, **options) -> list[dict]:
    generator = torch.Generator().manual_seed(rank)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    with gradwatch(watched, on_alert="ignore", **options) as gw:
        for _ in range(STEPS):
            x = torch.randn(8, 4, generator=generator)
            optimizer.zero_grad()
            ddp(x).pow(2).mean().backward()
            optimizer.step()
    return [dataclasses.asdict(alert) for alert in gw.alerts]


def _scenario_healthy(rank: int, logdir: Path) -> dict:
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(Net(_always))
    return {"alerts": _train(ddp, ddp, rank, logdir=logdir / "healthy")}


def _scenario_events_per_rank(rank: int, logdir: Path) -> dict:
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(Net(_always))
    return {"alerts": _train(ddp, ddp, rank, logdir=logdir / "all", log_all_ranks=True)}


def _scenario_unused_everywhere(rank: int, logdir: Path) -> dict:
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(Net(_never), static_graph=True)
    return {"alerts": _train(ddp, ddp, rank)}


def _scenario_branch_on_rank_1(rank: int, logdir: Path) -> dict:
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(Net(_on_rank_1), static_graph=True)
    return {"alerts": _train(ddp, ddp, rank)}


def _scenario_zero_filled(rank: int, logdir: Path) -> dict:
    """Rank 0 skips ``b``: DDP fills its gradient there with zeros and averages."""
    torch.manual_seed(0)
    model = Net(_on_rank_1)
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    alerts = _train(ddp, model, rank)
    grad = model.b.weight.grad
    filled = grad is not None and bool(grad.abs().sum() > 0)
    return {"alerts": alerts, "b_has_grad": filled}


def _scenario_unused_find_unused(rank: int, logdir: Path) -> dict:
    torch.manual_seed(0)
    model = Net(_never)
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    return {"alerts": _train(ddp, model, rank)}


def _fully_shard(model: nn.Module, mesh=None) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in (model.a, model.b, model.c):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _scenario_fsdp(use_branch, rank: int, logdir: Path) -> dict:
    torch.manual_seed(0)
    model = _fully_shard(Net(use_branch))
    names = [name for name, _ in model.named_parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alerts = _train(model, model, rank, logdir=logdir / "fsdp")
    warned = [str(w.message) for w in caught if "FSDP2" in str(w.message)]
    return {"alerts": alerts, "names": names, "warnings": warned}


def _scenario_fsdp_healthy(rank: int, logdir: Path) -> dict:
    return _scenario_fsdp(_always, rank, logdir)


def _scenario_fsdp_unused(rank: int, logdir: Path) -> dict:
    return _scenario_fsdp(_never, rank, logdir)


def _scenario_hsdp_rejected(rank: int, logdir: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, WORLD_SIZE), mesh_dim_names=("dp", "fs"))
    model = _fully_shard(Net(_always), mesh=mesh)
    try:
        gradwatch(model)
    except NotImplementedError as err:
        return {"alerts": [], "error": str(err)}
    return {"alerts": [], "error": None}


def _scenario_compiled_ddp(rank: int, logdir: Path) -> dict:
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(Net(_never), static_graph=True)
    runner = torch.compile(ddp, backend="eager")
    return {"alerts": _train(runner, runner, rank)}


SCENARIOS = {
    "healthy": _scenario_healthy,
    "events_per_rank": _scenario_events_per_rank,
    "unused_everywhere": _scenario_unused_everywhere,
    "unused_find_unused": _scenario_unused_find_unused,
    "branch_on_rank_1": _scenario_branch_on_rank_1,
    "zero_filled": _scenario_zero_filled,
    "compiled_ddp": _scenario_compiled_ddp,
}
if FSDP2_AVAILABLE:
    SCENARIOS["fsdp_healthy"] = _scenario_fsdp_healthy
    SCENARIOS["fsdp_unused"] = _scenario_fsdp_unused
    SCENARIOS["hsdp_rejected"] = _scenario_hsdp_rejected


def _rank_main(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {
            name: scenario(rank, Path(out)) for name, scenario in SCENARIOS.items()
        }
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_job(out: Path) -> None:
    """Run every scenario on two forked ranks; kill them after the timeout."""
    context = mp.start_processes(
        _rank_main,
        args=(_free_port(), str(out)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                msg = f"the two-rank DDP job ran past {JOB_TIMEOUT_S} s"
                raise TimeoutError(msg)
    finally:
        for pid in context.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@dataclasses.dataclass
class JobResults:
    out: Path
    by_rank: dict[int, dict]

    def __getitem__(self, rank: int) -> dict:
        return self.by_rank[rank]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> JobResults:
    out = tmp_path_factory.mktemp("ddp")
    run_job(out)
    by_rank = {
        rank: json.loads((out / f"rank{rank}.json").read_text())
        for rank in range(WORLD_SIZE)
    }
    return JobResults(out, by_rank)


def _alerts(results, rank: int, scenario: str, check: str) -> list[dict]:
    found = results[rank][scenario]["alerts"]
    return [a for a in found if a["check"] == check]


def _show(alert: dict) -> None:
    """Print the expected alert, for a reader of ``pytest -s`` output."""
    print(f"[{alert['check']} on ranks {alert['ranks']}] {alert['message']}")  # noqa: T201


@pytest.mark.slow
def test_ddp_healthy_run_is_silent(results):
    for rank in range(WORLD_SIZE):
        assert results[rank]["healthy"]["alerts"] == []


@pytest.mark.slow
def test_ddp_only_rank_0_writes_events(results):
    events = sorted((results.out / "healthy").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    assert events[0].parent == results.out / "healthy"


@pytest.mark.slow
def test_ddp_log_all_ranks_writes_per_rank(results):
    for rank in range(WORLD_SIZE):
        folder = results.out / "all" / f"rank{rank}"
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_ddp_layer_unused_on_every_rank(results):
    for rank in range(WORLD_SIZE):
        unused = _alerts(results, rank, "unused_everywhere", "unused_parameter")
        assert sorted(a["param"] for a in unused) == ["b.bias", "b.weight"]
        for alert in unused:
            assert alert["ranks"] == [0, 1]
            assert "on any of the 2 ranks" in alert["message"]
        assert all("scope" not in a["data"] for a in unused)
    _show(unused[0])


@pytest.mark.slow
def test_ddp_branch_taken_only_on_rank_1(results):
    for rank in range(WORLD_SIZE):
        found = _alerts(results, rank, "branch_on_rank_1", "unused_parameter")
        assert sorted(a["param"] for a in found) == ["b.bias", "b.weight"]
        for alert in found:
            assert alert["ranks"] == [0]
            assert alert["severity"] == "warning"
            assert alert["data"]["scope"] == "some_ranks"
            assert alert["data"]["ranks_with_gradient"] == [1]
    _show(found[0])


@pytest.mark.slow
def test_ddp_zero_filled_gradient_still_reported(results):
    for rank in range(WORLD_SIZE):
        assert results[rank]["zero_filled"]["b_has_grad"]
        found = _alerts(results, rank, "zero_filled", "unused_parameter")
        assert sorted(a["param"] for a in found) == ["b.bias", "b.weight"]
        for alert in found:
            assert alert["ranks"] == [0]
            assert alert["data"]["scope"] == "some_ranks"
        assert not _alerts(results, rank, "zero_filled", "zero_gradient")
    _show(found[0])


@pytest.mark.slow
def test_ddp_unused_layer_with_find_unused_parameters(results):
    for rank in range(WORLD_SIZE):
        unused = _alerts(results, rank, "unused_find_unused", "unused_parameter")
        assert sorted(a["param"] for a in unused) == ["b.bias", "b.weight"]
        for alert in unused:
            assert alert["ranks"] == [0, 1]
    _show(unused[0])


def test_distributed_true_needs_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        gradwatch(nn.Linear(2, 2), distributed=True)


def test_distributed_option_rejects_non_bool():
    with pytest.raises(ValueError, match="distributed must be None, True or False"):
        gradwatch(nn.Linear(2, 2), distributed="yes")


needs_fsdp2 = pytest.mark.skipif(
    not FSDP2_AVAILABLE, reason="torch.distributed.fsdp.fully_shard is missing"
)


@pytest.mark.slow
@needs_fsdp2
def test_fsdp_keeps_names_and_is_silent(results):
    for rank in range(WORLD_SIZE):
        scenario = results[rank]["fsdp_healthy"]
        assert "a.weight" in scenario["names"]
        assert scenario["alerts"] == []
        assert len(scenario["warnings"]) == 1
        assert "symmetric_units" in scenario["warnings"][0]


@pytest.mark.slow
@needs_fsdp2
def test_fsdp_unused_layer_reported(results):
    for rank in range(WORLD_SIZE):
        unused = _alerts(results, rank, "fsdp_unused", "unused_parameter")
        assert sorted(a["param"] for a in unused) == ["b.bias", "b.weight"]
        for alert in unused:
            assert alert["ranks"] == [0, 1]
    # Two FSDP runs wrote into this directory, each from rank 0 only.
    events = list((results.out / "fsdp").glob("events.out.tfevents.*"))
    assert len(events) == 2
    _show(unused[0])


@pytest.mark.slow
@needs_fsdp2
def test_hsdp_mesh_rejected(results):
    for rank in range(WORLD_SIZE):
        error = results[rank]["hsdp_rejected"]["error"]
        assert error is not None
        assert "2-D mesh" in error


def test_sharded_options_reject_unit_checks():
    options = Options(checks=("unused_parameter", "symmetric_units"))
    with pytest.raises(NotImplementedError, match="symmetric_units"):
        sharded_options(options)


def test_sharded_options_keep_arrival_checks():
    with pytest.warns(GradwatchWarning, match="do not run"):
        options = sharded_options(Options())
    assert set(options.checks) == set(SHARDED_CHECKS)
    assert options.histogram_every == 0


@pytest.mark.slow
def test_compiled_ddp_unused_layer_reported(results):
    for rank in range(WORLD_SIZE):
        unused = _alerts(results, rank, "compiled_ddp", "unused_parameter")
        assert sorted(a["param"] for a in unused) == ["b.bias", "b.weight"]
        for alert in unused:
            assert alert["ranks"] == [0, 1]


def test_single_rank_group_runs_no_collective():
    """A one-rank process group has nothing to combine, so nothing can hang."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = Net(_never)
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
        with gradwatch(ddp, on_alert="ignore") as gw:
            assert gw._ranks is None
            for _ in range(STEPS):
                optimizer.zero_grad()
                ddp(torch.randn(8, 4)).sum().backward()
                optimizer.step()
    finally:
        dist.destroy_process_group()
    unused = sorted(a.param for a in gw.alerts if a.check == "unused_parameter")
    assert unused == ["b.bias", "b.weight"]
    assert all(a.ranks == (0,) for a in gw.alerts)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "check"),
    [("unused", "unused_parameter"), ("rank-branch", "unused_parameter")],
)
def test_ddp_example_under_torchrun(fault, check, tmp_path):
    script = Path(__file__).parents[1] / "examples" / "train_ddp.py"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(WORLD_SIZE),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        str(script),
        "--fault",
        fault,
        "--steps",
        "5",
        "--logdir",
        str(tmp_path / "tb"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"] {check} `extra_head.weight`" in done.stdout
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
