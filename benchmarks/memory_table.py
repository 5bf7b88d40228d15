"""The trainer's memory per rank at world 1, 2 and 4, with and without FSDP; FSDP's step time against none.

    python -m benchmarks.memory_table --json benchmarks/memory_table.json
    python -m benchmarks.memory_table --step-time --rounds 3      # dp 2 x ep 2, FSDP against none

Each layout is a fresh `launch.train` run (torchrun for world > 1) of
configs/tiny.toml with experts that are most of the parameters (d_model 256,
d_hidden 1024, 64 experts: 537 MB of experts in fp32), ep = world and then
dp 2 x ep 2, and its
summary.json's memory figures: RSS before the build, the build's peak, the
parameter bytes this rank holds, the run's peak; each the worst rank's.
`--step-time` alternates FSDP and plain runs of tiny.toml at dp 2 x ep 2 round
by round and reports the median step time of each run (first step excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.bench_tools import cpu_model

REPO = Path(__file__).resolve().parent.parent
EXPERT_HEAVY = ["model.d_model=256", "moe.d_hidden=1024", "moe.num_experts=64"]
LAYOUTS = [(1, 1), (2, 2), (4, 4), (4, 2)]  # (world, ep): ep = world, then dp 2 x ep 2
SHORT = ["train.global_batch=8", "train.micro_batch=2", "train.eval_batches=1", "train.checkpoint_every=0"]


def run(world: int, overrides: list[str], out_dir: Path) -> dict:
    """One trainer run; its summary.json and metrics."""
    args = ["-m", "launch.train", "--config", "configs/tiny.toml", f"train.out_dir={out_dir}", *overrides]
    launcher = [sys.executable]
    if world > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([*launcher, *args], cwd=REPO, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(
            f"run failed ({world} ranks, {overrides}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {"summary": json.loads((out_dir / "summary.json").read_text()), "metrics": metrics}


def memory_rows(steps: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world, ep in LAYOUTS:
            for fsdp in (False, True):
                if fsdp and world == 1:
                    continue
                overrides = [*EXPERT_HEAVY, *SHORT, f"train.steps={steps}", f"parallel.ep={ep}"]
                overrides.append(f"parallel.fsdp={str(fsdp).lower()}")
                summary = run(world, overrides, Path(tmp) / f"w{world}_ep{ep}_{fsdp}")["summary"]
                rows.append(
                    {
                        "world": world,
                        "ep": ep,
                        "fsdp": fsdp,
                        **{
                            name: summary[f"worst_{name}"]["value"]
                            for name in (
                                "rss_before_build_mib",
                                "build_peak_rss_mib",
                                "param_bytes_local",
                                "peak_rss_mib",
                            )
                        },
                    }
                )
                print(rows[-1], flush=True)
    return rows


def step_times(rounds: int, steps: int) -> list[dict]:
    """Median step time (s) of each run, FSDP and plain alternating, at dp 2 x ep 2 on tiny.toml."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for fsdp in (False, True) if r % 2 == 0 else (True, False):
                overrides = [f"train.steps={steps}", "parallel.ep=2", f"parallel.fsdp={str(fsdp).lower()}"]
                overrides += ["train.eval_every=1000", "train.checkpoint_every=0"]
                metrics = run(4, overrides, Path(tmp) / f"r{r}_{fsdp}")["metrics"]
                median = statistics.median(row["step_time_s"] for row in metrics[1:])
                results.append({"round": r, "fsdp": fsdp, "median_step_s": median})
                print(results[-1], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--step-time", action="store_true", help="FSDP against plain at dp 2 x ep 2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    machine = {
        "cpu": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }
    print(machine)
    if args.step_time:
        times = step_times(args.rounds, max(args.steps, 10))
        ratios = [
            next(t["median_step_s"] for t in times if t["round"] == r and t["fsdp"])
            / next(t["median_step_s"] for t in times if t["round"] == r and not t["fsdp"])
            for r in range(args.rounds)
        ]
        print(f"FSDP / plain step time per round: {', '.join(f'{x:.3f}' for x in ratios)}")
        result = {"machine": machine, "step_times": times, "fsdp_over_plain": ratios}
    else:
        rows = memory_rows(args.steps)
        print(
            "| world | ep | FSDP | RSS before build | build peak | build − before | params held | run peak |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['world']} | {r['ep']} | {'yes' if r['fsdp'] else 'no'} "
                f"| {r['rss_before_build_mib']:.0f} MiB "
                f"| {r['build_peak_rss_mib']:.0f} MiB "
                f"| {r['build_peak_rss_mib'] - r['rss_before_build_mib']:.0f} MiB "
                f"| {r['param_bytes_local'] / 2**20:.0f} MiB | {r['peak_rss_mib']:.0f} MiB |"
            )
        result = {"machine": machine, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
