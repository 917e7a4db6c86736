"""Measure gradwatch's overhead against a bare training step, side by side.

    python benchmarks/overhead.py                 # every workload, 5 repetitions
    python benchmarks/overhead.py --workloads W1 W4 --reps 9
    python benchmarks/overhead.py --quick         # a few steps: checks it runs
    python benchmarks/overhead.py --workloads W3 --only "gradwatch default"

Each workload runs in its own process. Every variant owns a model built from the
same seed. After a warm-up, each repetition times a bare block, then a variant
block, then a bare block, in a rotated variant order; the ratio of a repetition is
the variant's time per step over the mean of the bare blocks around it. A table
per workload gives the median ratio, its min-max, the same ratio in process CPU
time, and the extra peak memory of a fresh process running the variant.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from variants import VARIANTS, MissingPeer  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

MIN_BLOCK_SECONDS = 0.25


def block_steps(step_seconds: float, cadence: int, quick: bool) -> int:
    """Return a block length that is a multiple of ``cadence`` and lasts a while."""
    if quick:
        return cadence if cadence <= 10 else 2
    minimum = max(1, math.ceil(MIN_BLOCK_SECONDS / max(step_seconds, 1e-6)))
    return cadence * math.ceil(minimum / cadence)


def time_block(step, steps: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def measure_workload(name: str, variants: list[str], reps: int, quick: bool) -> dict:
    """Time ``variants`` of one workload side by side; return their table rows."""
    build = WORKLOADS[name]
    tmp = Path(tempfile.mkdtemp(prefix=f"gradwatch-bench-{name}-"))
    baseline = build(0)
    for _ in range(2 if quick else 5):
        baseline.step()
    bare_seconds, _ = time_block(baseline.step, 1 if quick else 5)

    contexts, notes = {}, {}
    for variant in variants:
        enter, cadence = VARIANTS[variant]
        workload = build(0)
        try:
            context = enter(workload, tmp / variant.replace(" ", "_"))
            context.__enter__()
        except MissingPeer as err:
            notes[variant] = str(err)
            continue
        except Exception as err:  # noqa: BLE001 - a peer that fails is a finding
            notes[variant] = f"failed: {type(err).__name__}: {err}"[:160]
            continue
        try:
            for _ in range(max(2, cadence if not quick else 2)):
                workload.step()
        except Exception as err:  # noqa: BLE001
            notes[variant] = f"failed: {type(err).__name__}: {err}"[:160]
            context.__exit__(None, None, None)
            continue
        steps = block_steps(bare_seconds, cadence, quick)
        contexts[variant] = (workload, context, steps)

    samples: dict[str, list[tuple[float, float, float, float]]] = {
        v: [] for v in contexts
    }
    order = list(contexts)
    for rep in range(1 if quick else reps):
        rotated = order[rep % len(order) :] + order[: rep % len(order)] if order else []
        for variant in rotated:
            workload, _, steps = contexts[variant]
            before = time_block(baseline.step, steps)
            timed = time_block(workload.step, steps)
            after = time_block(baseline.step, steps)
            samples[variant].append(
                (*timed, (before[0] + after[0]) / 2, (before[1] + after[1]) / 2)
            )

    for variant, (_, context, _) in contexts.items():
        try:
            context.__exit__(None, None, None)
        except Exception as err:  # noqa: BLE001 - a peer that fails is a finding
            notes[variant] = f"failed on exit: {type(err).__name__}: {err}"[:160]

    rows = []
    for variant, values in samples.items():
        ratios = [wall / bare for wall, _, bare, _ in values]
        cpu_ratios = [cpu / bare_cpu for _, cpu, _, bare_cpu in values if bare_cpu > 0]
        rows.append(
            {
                "variant": variant,
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
                "cpu": statistics.median(cpu_ratios) if cpu_ratios else float("nan"),
                "step_ms": statistics.median(w for w, _, _, _ in values) * 1e3,
                "bare_ms": statistics.median(b for _, _, b, _ in values) * 1e3,
                "reps": len(values),
            }
        )
    return {
        "workload": name,
        "rows": rows,
        "notes": notes,
        "bare_ms": bare_seconds * 1e3,
    }


# wandb keeps one run per process, so each wandb cadence gets a process of its own.
GROUPS = [
    [v for v in VARIANTS if v != "bare" and not v.startswith("wandb")],
    *([v] for v in VARIANTS if v.startswith("wandb")),
]


def run_groups(name: str, args: argparse.Namespace) -> dict | None:
    """Measure every variant group of one workload, each in a fresh process."""
    merged: dict = {"workload": name, "rows": [], "notes": {}}
    groups = [[v for v in group if v in args.only] for group in GROUPS]
    for group in filter(None, groups):
        command = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--variants",
            ",".join(group),
        ]
        command += ["--reps", str(args.reps), "--threads", str(args.threads)]
        command += ["--quick"] if args.quick else []
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            print(f"\n## {name}: failed\n\n{done.stderr.strip()[-600:]}")
            return None
        result = json.loads(done.stdout.strip().splitlines()[-1])
        merged["rows"] += result["rows"]
        merged["notes"].update(result["notes"])
        merged.setdefault("bare_ms", result["bare_ms"])
    return merged


def peak_memory_mib(name: str, variant: str, quick: bool) -> float:
    """Return the peak resident memory of a fresh process running one variant."""
    command = [sys.executable, __file__, "--memory", name, variant]
    command += ["--quick"] if quick else []
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    try:
        return float(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return float("nan")


def memory_child(name: str, variant: str, quick: bool) -> None:
    enter, cadence = VARIANTS[variant]
    workload = WORKLOADS[name](0)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with enter(workload, Path(tmp)):
                for _ in range(2 if quick else max(10, cadence)):
                    workload.step()
        except Exception:  # noqa: BLE001 - reported as nan by the parent
            return
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def print_table(result: dict, memory: dict[str, float]) -> None:
    name = result["workload"]
    print(f"\n## {name} (bare step {result['bare_ms']:.2f} ms)\n")
    print("| variant | median ratio | min-max | CPU-time ratio | extra memory (MiB) |")
    print("|---|---|---|---|---|")
    bare_memory = memory.get("bare", float("nan"))
    for row in result["rows"]:
        extra = memory.get(row["variant"], float("nan")) - bare_memory
        print(
            f"| {row['variant']} | {row['median']:.3f} | "
            f"{row['min']:.3f}-{row['max']:.3f} | {row['cpu']:.3f} | {extra:.1f} |"
        )
    if name.startswith("W5-"):
        tensors = int(name.split("-")[1])
        for row in result["rows"]:
            if row["variant"] == "gradwatch default":
                cost = (row["median"] - 1.0) * row["bare_ms"] * 1e3 / tensors
                print(
                    f"\ngradwatch default: {cost:.2f} µs per parameter tensor per step"
                )
    for variant, note in result["notes"].items():
        print(f"\n- {variant}: skipped, {note}")


def processor_name() -> str:
    """Return the CPU model from /proc/cpuinfo, else what ``platform`` reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workloads",
        nargs="+",
        default=list(WORKLOADS),
        choices=list(WORKLOADS),
        help="workloads to run (default: all)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=[v for v in VARIANTS if v != "bare"],
        choices=[v for v in VARIANTS if v != "bare"],
        metavar="VARIANT",
        help="variants to time against the bare loop (default: all)",
    )
    parser.add_argument(
        "--reps", type=int, default=5, help="timed repetitions per variant"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few steps each, to check the script runs",
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the memory processes"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument(
        "--memory", nargs=2, metavar=("WORKLOAD", "VARIANT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--variants", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if args.memory:
        memory_child(*args.memory, args.quick)
        return 0
    if args.one:
        variants = args.variants.split(",")
        print(json.dumps(measure_workload(args.one, variants, args.reps, args.quick)))
        return 0

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{processor_name()}, python {platform.python_version()}"
    )
    print(f"command: python benchmarks/overhead.py {shlex.join(argv or sys.argv[1:])}")
    results = []
    for name in args.workloads:
        result = run_groups(name, args)
        if result is None:
            continue
        memory = {}
        if not args.no_memory:
            for variant in ["bare", *(row["variant"] for row in result["rows"])]:
                memory[variant] = peak_memory_mib(name, variant, args.quick)
        print_table(result, memory)
        results.append({**result, "memory_mib": memory})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
