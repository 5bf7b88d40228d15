"""Upcycle a dense model into an MoE whose logits start equal to the dense model's, in one process.

    python -m launch.upcycle --dense runs/tiny-dense --config configs/tiny.toml --out runs/tiny-upcycled \\
        [section.key=value ...]
    python -m launch.upcycle --hf path/to/llama --out llama-moe --num-experts 8 --top-k 2 \\
        [--granularity 1] [--seed 0]

--dense: a dense run's out_dir (its latest checkpoint) or one checkpoints/step_<N>, made into the MoE of
--config (with the overrides; its router seeded by train.seed, as the trainer seeds its build). Writes
<out>/config.json and <out>/checkpoints/step_<N>, N the dense step, with the dense run's AdamW state
carried over (train.init_optimizer=false: a fresh one):
`launch.train --config <config> train.out_dir=<out>` resumes from it at any ep size, exactly as
`train.init_from=<dense>` would have started, and `launch.generate --checkpoint <out>` reads it.

--hf: a dense Llama or Qwen2 directory made into a Mixtral or Qwen2-MoE directory at --out, E experts
of width intermediate_size / granularity, top-k of them per token, the router seeded by --seed.

The rules (granularity, scaling, which routing is exact) are in docs/post-training.md#sparse-upcycling.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from expert_parallel import checkpoint, upcycling
from expert_parallel.build import build_model
from expert_parallel.config_file import load_toml
from expert_parallel.parallel import make_layout
from expert_parallel.training import RunConfig


def upcycle_run(dense: Path, config_path: Path, out: Path, overrides: list[str]) -> Path:
    """The --dense mode: the written checkpoint directory."""
    config = RunConfig.from_tree(load_toml(config_path, [*overrides, f"train.out_dir={out}"]))
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, make_layout(1), execution=config.execution)
    optimizer = torch.optim.AdamW(model.parameters())
    carried = optimizer if config.train.init_optimizer else None
    step, granularity = upcycling.load_dense(dense, model, carried)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    saved = checkpoint.save(out / "checkpoints", step, model, optimizer)
    print(f"upcycled {dense} (step {step}, granularity {granularity}) -> {saved}")
    return saved


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dense", type=Path, help="a dense run's out_dir or checkpoint")
    source.add_argument("--hf", type=Path, help="a dense Hugging Face Llama or Qwen2 directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, help="--dense: the MoE run's TOML config")
    parser.add_argument("--num-experts", type=int, help="--hf: E")
    parser.add_argument("--top-k", type=int, help="--hf: experts per token")
    parser.add_argument("--granularity", type=int, default=1, help="--hf: shards per dense MLP")
    parser.add_argument("--seed", type=int, default=0, help="--hf: the router's seed")
    parser.add_argument("overrides", nargs="*", help="--dense: section.key=value for --config")
    args = parser.parse_args(argv)
    if args.dense is not None:
        if args.config is None:
            parser.error("--dense needs --config, the MoE run's config")
        upcycle_run(args.dense, args.config, args.out, args.overrides)
        return 0
    if args.num_experts is None or args.top_k is None or args.overrides:
        parser.error("--hf needs --num-experts and --top-k, and takes no overrides")
    from transformers import AutoModelForCausalLM

    from expert_parallel.hf import upcycling as hf_upcycling

    dense = AutoModelForCausalLM.from_pretrained(args.hf)
    kwargs = dict(
        num_experts=args.num_experts, top_k=args.top_k, granularity=args.granularity, seed=args.seed
    )
    path = hf_upcycling.save_upcycled(dense, args.out, **kwargs)
    print(f"upcycled {args.hf} ({type(dense).__name__}) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
