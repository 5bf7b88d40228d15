"""The trainer under forced routing: every MoE layer's experts chosen by a fixed law, not by its router.

    torchrun --standalone --nproc-per-node 2 -m benchmarks.train_forced --routing zipf \\
        --config configs/tiny.toml train.steps=50 [parallel.redundant_experts=2 parallel.replan_every=10]

--routing: "uniform" (K distinct experts uniformly at random), "zipf" (Zipf(1)
over expert ids) or "one" (all-to-one); see bench_tools.forced_expert_ids.
For measuring placement and replicas under a known skew: the losses mean
little, since the experts a token reaches do not depend on it. Training
forwards only; evaluation routes by the router. Everything else is
launch.train: the same config, overrides and outputs.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.bench_tools import forced_expert_ids
from expert_parallel.config_file import load_toml
from expert_parallel.training import BeforeForward, RunConfig, run_training

ROUTINGS = ("uniform", "zipf", "one")


def forced_routing(kind: str, seed: int) -> BeforeForward:
    """A Trainer before_forward hook that sets each MoE layer's forced expert ids for the next forward.

    The ids depend on (seed, step, rank, micro-batch) only, so a resumed run forces the same loads.
    """
    if kind not in ROUTINGS:
        raise ValueError(f"--routing must be one of {ROUTINGS}, got {kind!r}")

    def before_forward(moe_layers: list, num_tokens: int, micro: int, step: int, rank: int) -> None:
        generator = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + rank) * 101 + micro)
        for layer in moe_layers:
            ids_TK = forced_expert_ids(
                kind, num_tokens, layer.config.num_experts, layer.config.top_k, generator
            )
            layer.forced_expert_ids = ids_TK.to(next(layer.parameters()).device)

    return before_forward


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--routing", required=True, choices=ROUTINGS)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for launch.train")
    args = parser.parse_args(argv)
    config = RunConfig.from_tree(load_toml(args.config, args.overrides))
    return run_training(config, before_forward=forced_routing(args.routing, config.train.seed))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
