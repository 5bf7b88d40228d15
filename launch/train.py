"""Train a byte-level MoE language model on the Python standard library, data x expert parallel.

    torchrun --standalone --nproc-per-node 2 -m launch.train --config configs/tiny.toml [key=value ...]
    python -m launch.train --config configs/tiny.toml parallel.ep=1          # one process, no torchrun

The trainer itself is expert_parallel.training (Trainer, RunConfig,
run_training): world = dp x ep ranks, experts sharded over ep, every rank
reading different micro-batches of the same global batch. Writes
<out_dir>/metrics.jsonl (a line per step), <out_dir>/summary.json,
<out_dir>/expert_load.png and checkpoints under <out_dir>/checkpoints.
Overrides are dotted TOML keys (command line > TOML > defaults); see
docs/training.md.
"""

from __future__ import annotations

import sys

from expert_parallel.config_file import command_line
from expert_parallel.training import RunConfig, run_training


def main(argv: list[str]) -> int:
    return run_training(RunConfig.from_tree(command_line(__doc__, argv)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
