"""Sparse upcycling against training on dense: val loss per seed on the quick start's corpus.

    python -m benchmarks.upcycle_vs_dense --seeds 0,1,2 --steps 150 --json benchmarks/upcycle_vs_dense.json
    python -m benchmarks.upcycle_vs_dense --dense tiny-dense --moe tiny --seeds 0 --steps 50

Per seed: the dense config trains 2S steps with a checkpoint at step S: (a) is that run's end,
dense trained on for S more steps. (b) upcycles its step-S checkpoint into the MoE config
(`train.init_from`) and trains the same S steps: the same batches and learning-rate schedule
(both runs have train.steps = 2S and continue at step S), the MoE with the dense run's AdamW state
carried over; (c) is (b) with a fresh AdamW (train.init_optimizer=false). The first row of (b) and
(c), the loss of step S + 1's batch before its update, must equal (a)'s (the upcycled model computes
the dense one's function): the table shows all three.

One process per run (parallel.ep=1, one thread), one run at a time. Prints the machine and a
markdown table of val loss at step S and 2S, and the upcycled model's lead over (a) at 2S.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_tools import machine
from benchmarks.tiny_vs_dense import train


def first_loss(out_dir: Path, step: int) -> float:
    """The training loss the run logged for `step` (its batch, before that step's update)."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return next(row["loss"] for row in rows if row["step"] == step)


def run_seed(
    dense: str, moe: str, seed: int, steps: int, tmp: Path, moe_set: list[str], fresh: bool = True
) -> dict:
    dense_dir, moe_dir, fresh_dir = (tmp / f"{run}_{seed}" for run in ("dense", "upcycled", "fresh"))
    both = [f"train.eval_every={steps}"]
    started = time.perf_counter()
    dense_val = train(dense, seed, 2 * steps, [*both, f"train.checkpoint_every={steps}"], dense_dir)
    dense_s = time.perf_counter() - started
    init = f"train.init_from={dense_dir / 'checkpoints' / f'step_{steps}'}"
    moe_val = train(moe, seed, 2 * steps, [*both, init, *moe_set], moe_dir)
    upcycled_s = time.perf_counter() - started - dense_s
    nan = {2 * steps: float("nan")}
    fresh_val = (
        train(moe, seed, 2 * steps, [*both, init, *moe_set, "train.init_optimizer=false"], fresh_dir)
        if fresh
        else nan
    )
    return {
        "seed": seed,
        "val_at_S": dense_val[steps],
        "dense_val_at_2S": dense_val[2 * steps],
        "upcycled_val_at_2S": moe_val[2 * steps],
        "upcycled_fresh_adamw_val_at_2S": fresh_val[2 * steps],
        "first_loss_dense": first_loss(dense_dir, steps + 1),
        "first_loss_upcycled": first_loss(moe_dir, steps + 1),
        "first_loss_upcycled_fresh_adamw": first_loss(fresh_dir, steps + 1) if fresh else float("nan"),
        "dense_seconds": dense_s,
        "upcycled_seconds": upcycled_s,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dense", default="tiny-dense", help="the dense config under configs/")
    parser.add_argument("--moe", default="tiny", help="the MoE config under configs/ to upcycle into")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150, help="S: steps before and after upcycling")
    parser.add_argument(
        "--moe-set", action="append", default=[], metavar="KEY=VALUE", help="an override of the MoE config"
    )
    parser.add_argument("--no-fresh", action="store_true", help="skip (c), the fresh-AdamW run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(machine(), flush=True)
    started, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            rows.append(
                run_seed(args.dense, args.moe, seed, args.steps, Path(tmp), args.moe_set, not args.no_fresh)
            )
            print(json.dumps(rows[-1]), flush=True)
    S = args.steps
    seconds = time.perf_counter() - started
    runs = (2 if args.no_fresh else 3) * len(seeds)
    moe = " ".join([args.moe, *args.moe_set])
    print(f"\n{args.dense} -> {moe}, S = {S}: {runs} runs in {seconds:.0f} s\n")
    print(
        f"| seed | val @ {S} (dense) | dense @ {2 * S} | upcycled @ {2 * S} "
        f"| upcycled, fresh AdamW @ {2 * S} | upcycled's lead "
        f"| loss of step {S + 1}: dense / upcycled / fresh |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        lead = row["dense_val_at_2S"] - row["upcycled_val_at_2S"]
        print(
            f"| {row['seed']} | {row['val_at_S']:.3f} | {row['dense_val_at_2S']:.3f} | "
            f"{row['upcycled_val_at_2S']:.3f} | {row['upcycled_fresh_adamw_val_at_2S']:.3f} | {lead:+.3f} | "
            f"{row['first_loss_dense']:.6f} / {row['first_loss_upcycled']:.6f} / "
            f"{row['first_loss_upcycled_fresh_adamw']:.6f} |"
        )
    if args.json:
        record = {"machine": machine(), "dense": args.dense, "moe": args.moe, "moe_set": args.moe_set}
        record.update({"steps": S, "runs": rows})
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
