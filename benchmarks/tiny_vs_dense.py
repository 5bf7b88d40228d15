"""The quick start's claim over seeds: tiny.toml's MoE against tiny-dense.toml, val loss per seed.

    python -m benchmarks.tiny_vs_dense --seeds 0,1,2 --steps 300 --json benchmarks/tiny_vs_dense.json
    python -m benchmarks.tiny_vs_dense --seeds 0 --extra dense1024:tiny-dense:model.d_ff_dense=1024

Each run is the trainer in one process (parallel.ep=1, one thread), two runs at a time on two
cores. The layouts compute the same losses (tests/test_train.py), so this is the README's 2-rank
job without its all-to-all. `--extra name:config:key=value,...` adds a variant (run per seed).
Prints a markdown table of val loss at every eval and the MoE's lead at the last step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.bench_tools import machine

REPO = Path(__file__).resolve().parent.parent


def train(
    config: str, seed: int, steps: int, overrides: list[str], out_dir: Path, timeout: float | None = None
) -> dict[int, float]:
    """{step: val loss} of one run (killed after `timeout` seconds, None: no limit)."""
    cmd = [
        sys.executable,
        "-m",
        "launch.train",
        "--config",
        f"configs/{config}.toml",
        "parallel.ep=1",
        f"train.seed={seed}",
        f"train.steps={steps}",
        "train.checkpoint_every=0",
        f"train.out_dir={out_dir}",
        *overrides,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if run.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["val_loss"] for row in rows if "val_loss" in row}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--extra", action="append", default=[], help="name:config:key=value,...")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    variants = {"moe": ("tiny", []), "dense": ("tiny-dense", [])}
    for extra in args.extra:
        name, config, overrides = (extra.split(":", 2) + [""])[:3]
        variants[name] = (config, [o for o in overrides.split(",") if o])
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(name, seed) for seed in seeds for name in variants]
    print(machine(), flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:
        futures = {
            job: pool.submit(
                train,
                *variants[job[0]][:1],
                job[1],
                args.steps,
                variants[job[0]][1],
                Path(tmp, f"{job[0]}_{job[1]}"),
            )
            for job in jobs
        }
        curves = {job: future.result() for job, future in futures.items()}
    steps = sorted(set.intersection(*(set(curve) for curve in curves.values())))  # evaluated in every run
    print(f"\n{len(jobs)} runs in {time.perf_counter() - started:.0f} s\n")
    print("| run | seed | " + " | ".join(f"val @ {s}" for s in steps) + " |")
    print("|---|---|" + "---|" * len(steps))
    for (name, seed), curve in curves.items():
        print(f"| {name} | {seed} | " + " | ".join(f"{curve[s]:.3f}" for s in steps) + " |")
    last = steps[-1]
    leads = [curves["dense", seed][last] - curves["moe", seed][last] for seed in seeds]
    print(f"\nthe MoE's lead over dense at step {last}: " + ", ".join(f"{lead:+.3f}" for lead in leads))
    if args.json:
        record = {
            "machine": machine(),
            "steps": args.steps,
            "variants": {n: list(v) for n, v in variants.items()},
        }
        record["runs"] = [
            {"run": n, "seed": s, "val_loss": {str(k): v for k, v in c.items()}}
            for (n, s), c in curves.items()
        ]
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
